"""The books, asked: `GET /usage` over the ledger (ranges, groupings, CSV).

Without parameters `/usage` answers as it always has, the key's usage since this process
started, from memory (or Redis). With any of `from`, `to`, `group_by` or `key` it answers
from the ledger (store.py), which outlives restarts: the calling key's calls, or, for a
key marked `admin = true` in the keys file, every key's (or the one `key=` names). A key
that is not an admin never sees another key's rows, and no answer holds a key itself,
only names.

Queries run in a thread: the database is never waited on by the event loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from admission import caller
from errors import ApiError
from jsonio import JSONResponse
from store import GROUPS, USAGE_FIELDS, Ledger, usage_lines, usage_query

LEDGER_PARAMS = ("from", "to", "group_by", "key")
DEFAULT_RANGE_S = 30 * 86400
# The rows the ledger still holds in memory are written before a query reads it; a
# database slower than this answers with what it has.
FLUSH_WAIT_S = 2.0


def asks_the_ledger(request: Request) -> bool:
    return any(name in request.query_params for name in LEDGER_PARAMS)


def _instant(request: Request, name: str, default: float) -> float:
    """An ISO 8601 date or date-time (UTC unless it says otherwise) as epoch seconds."""
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ApiError(
            400,
            "invalid_request",
            f"{name}: {text[:40]!r} is not an ISO 8601 date or time (2026-12-03, "
            "2026-12-03T10:00:00Z)",
            param=name,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _group_label(group_by: str, value: Any) -> Any:
    if group_by == "day":
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d")
    if group_by == "hour":
        return _iso(float(value))
    return value


async def ledger_usage(request: Request, ledger: Ledger | None) -> Response:
    """`/usage` with a range, a grouping or a key: the ledger's sums, JSON or CSV."""
    if ledger is None:
        raise ApiError(
            400,
            "invalid_request",
            f"{next(n for n in LEDGER_PARAMS if n in request.query_params)}: the ledger is off "
            "(LEDGER_URL=off); /usage without parameters answers since start",
            param=next(n for n in LEDGER_PARAMS if n in request.query_params),
        )
    params = request.query_params
    unknown = sorted(set(params) - set(LEDGER_PARAMS))
    if unknown:
        raise ApiError(
            400, "invalid_request", f"{unknown[0]}: not a parameter of /usage", param=unknown[0]
        )
    end = _instant(request, "to", time.time())
    start = _instant(request, "from", end - DEFAULT_RANGE_S)
    if start >= end:
        raise ApiError(400, "invalid_request", "from: must be before to", param="from")
    group_by = params.get("group_by") or None
    if group_by is not None and group_by not in GROUPS:
        raise ApiError(
            400,
            "invalid_request",
            f"group_by: {group_by[:40]!r} is not one of {', '.join(GROUPS)}",
            param="group_by",
        )
    key = caller(request)
    own = key.name if key is not None else "anonymous"
    asked = params.get("key")
    keys: list[str] | None
    if key is not None and key.admin:
        keys = None if not asked or asked == "*" else [asked]
    elif asked and asked != own:
        raise ApiError(
            403, "forbidden", "key: only an admin key reads another key's usage", param="key"
        )
    else:
        keys = [own]
    sql, values = usage_query(ledger.db, start, end, group_by, keys)

    def read() -> list[tuple[Any, ...]]:
        ledger.flush(FLUSH_WAIT_S)
        return ledger.read(sql, values)

    rows = usage_lines(await asyncio.to_thread(read), grouped=group_by is not None)
    if group_by is not None:  # the group first, for a reader
        rows = [{group_by: _group_label(group_by, line.pop("group")), **line} for line in rows]
    total = _total(rows)
    if "text/csv" in request.headers.get("accept", ""):
        return _csv(rows if group_by else [total], group_by)
    return JSONResponse(
        {
            "keys": keys if keys is not None else "*",
            "from": _iso(start),
            "to": _iso(end),
            "group_by": group_by,
            "rows": rows,
            "total": total,
        }
    )


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for name in USAGE_FIELDS:
        summed = sum(line[name] for line in rows)
        total[name] = round(summed, 10) if name == "cost_usd" else summed
    return total


def _csv(rows: list[dict[str, Any]], group_by: str | None) -> Response:
    out = io.StringIO()
    columns = ([group_by] if group_by else []) + list(USAGE_FIELDS)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for line in rows:
        writer.writerow([_cell(line[c]) for c in columns])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8")


def _cell(value: Any) -> Any:
    """A cell that a spreadsheet will not run as a formula (a session id is the
    client's text)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return "" if value is None else value
