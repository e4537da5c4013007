"""The books, asked: `GET /usage` over the ledger (ranges, groupings, CSV), and the
dashboard, a page that draws them (`/dashboard`, its figures at `/dashboard/data`).

Without parameters `/usage` answers as it always has, the key's usage since this process
started, from memory (or Redis). With any of `from`, `to`, `group_by` or `key` it answers
from the ledger (store.py), which outlives restarts: the calling key's calls, or, for a
key marked `admin = true` in the keys file, every key's (or the one `key=` names). A key
that is not an admin never sees another key's rows, and no answer holds a key itself,
only names.

Queries run in a thread: the database is never waited on by the event loop.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from admission import caller
from errors import ApiError
from jsonio import JSONResponse
from quotas import period_bucket
from store import GROUPS, MAX_READ_ROWS, USAGE_FIELDS, Backend, Ledger, usage_lines, usage_query

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
    group_by = params.get("group_by") or ""
    groups = group_by.split(",") if group_by else []
    if len(set(groups)) != len(groups) or not set(groups) <= set(GROUPS):
        raise ApiError(
            400,
            "invalid_request",
            f"group_by: {group_by[:60]!r} is not one or more of {', '.join(GROUPS)}, "
            "comma-separated",
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
    sql, values = usage_query(ledger.db, start, end, groups, keys)

    def read() -> list[tuple[Any, ...]]:
        ledger.flush(FLUSH_WAIT_S)
        return ledger.read(sql, values)

    found = await ledger.reading(read)
    rows = usage_lines(found, groups)
    for line in rows:
        for group in ("day", "hour"):
            if group in line:
                line[group] = _group_label(group, line[group])
    total = _total(rows)
    if "text/csv" in request.headers.get("accept", ""):
        return _csv(rows if groups else [total], groups)
    return JSONResponse(
        {
            "keys": keys if keys is not None else "*",
            "from": _iso(start),
            "to": _iso(end),
            "group_by": group_by or None,
            "rows": rows,
            "total": total,
            # past MAX_READ_ROWS groups, the first of them (and their total) only
            "truncated": len(found) >= MAX_READ_ROWS,
        }
    )


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for name in USAGE_FIELDS:
        summed = sum(line[name] for line in rows)
        total[name] = round(summed, 10) if name == "cost_usd" else summed
    return total


def _csv(rows: list[dict[str, Any]], groups: list[str]) -> Response:
    out = io.StringIO()
    columns = groups + list(USAGE_FIELDS)
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


# --- the dashboard ------------------------------------------------------------------------

PAGES = Path(__file__).resolve().parent / "pages"
# The page and its two assets, read once: no CDN, nothing from another host.
ASSETS = {
    "dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "app.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "app.css": ("dashboard.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    # the page's own script and style only; it talks to this service only
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DAYS = 14  # of spend and tokens
HOURS = 48  # of requests and errors
LATENCY_CALLS = MAX_READ_ROWS  # the latest calls whose times make the percentiles
LAST_CALLS = 50


def _asset(name: str) -> tuple[bytes, str]:
    file, media = ASSETS[name]
    return (PAGES / file).read_bytes(), media


_LOADED = {name: _asset(name) for name in ASSETS}


async def page(request: Request) -> Response:
    """The page (public: it asks for a key, and every figure it shows needs one)."""
    name = request.url.path.rsplit("/", 1)[-1]
    body, media = _LOADED.get(name, _LOADED["dashboard"])
    return Response(body, media_type=media, headers=PAGE_HEADERS)


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of sorted `values`."""
    if not values:
        return None
    rank = max(1, math.ceil(share * len(values)))
    return round(values[rank - 1], 1)


@dataclass(frozen=True)
class View:
    """What the calling key may see: its own rows, or (an admin) every key's."""

    keys: list[str] | None  # None: every key
    admin: bool

    def where(self, db: Backend, start: float) -> tuple[str, list[Any]]:
        sql = f"at >= {db.mark}"
        params: list[Any] = [start]
        if self.keys is not None:
            sql += f" AND key IN ({db.marks(len(self.keys))})"
            params.extend(self.keys)
        return sql, params


def _figures(ledger: Ledger, view: View, now: float, filters: dict[str, str]) -> dict[str, Any]:
    """Every figure the page draws, read in one go (in a thread)."""
    db = ledger.db
    ledger.flush(FLUSH_WAIT_S)
    day0 = math.floor(now / 86400) * 86400 - (DAYS - 1) * 86400
    daily = usage_lines(
        ledger.read(*usage_query(db, day0, now + 1, ["day", "key", "model"], view.keys)),
        ["day", "key", "model"],
    )
    hour0 = math.floor(now / 3600) * 3600 - (HOURS - 1) * 3600
    hourly = usage_lines(
        ledger.read(*usage_query(db, hour0, now + 1, ["hour"], view.keys)), ["hour"]
    )
    where, params = view.where(db, now - 86400)
    times = ledger.read(
        f"SELECT model, duration_ms, ttft_ms FROM calls WHERE {where} AND status < 400 "
        f"ORDER BY at DESC LIMIT {LATENCY_CALLS}",
        params,
    )
    by_model: dict[str, tuple[list[float], list[float]]] = {}
    for model, duration, ttft in times:
        totals, firsts = by_model.setdefault(model or "", ([], []))
        totals.append(float(duration))
        if ttft is not None:
            firsts.append(float(ttft))
    latency = []
    for model, (totals, firsts) in sorted(by_model.items()):
        totals.sort()
        firsts.sort()
        latency.append({
            "model": model, "calls": len(totals),
            "p50_ms": percentile(totals, 0.5), "p95_ms": percentile(totals, 0.95),
            "ttft_p50_ms": percentile(firsts, 0.5), "ttft_p95_ms": percentile(firsts, 0.95),
        })  # fmt: skip
    where, params = view.where(db, now - DAYS * 86400)
    for column in ("key", "model"):
        if filters.get(column):
            where += f" AND {column} = {db.mark}"
            params.append(filters[column])
    if filters.get("status") == "errors":
        where += " AND status >= 400"
    elif filters.get("status", "").isdigit():
        where += f" AND status = {db.mark}"
        params.append(int(filters["status"]))
    names = ("at", "key", "route", "model", "status", "error", "input_tokens",
             "output_tokens", "cost_usd", "duration_ms", "ttft_ms")  # fmt: skip
    calls = [
        dict(zip(names, found, strict=True))
        for found in ledger.read(
            f"SELECT {', '.join(names)} FROM calls WHERE {where} "
            f"ORDER BY at DESC LIMIT {LAST_CALLS}",
            params,
        )
    ]
    spent = ledger.spent_this_period(now)
    return {"daily": daily, "hourly": hourly, "latency": latency, "calls": calls,
            "spent": spent}  # fmt: skip


async def data(request: Request) -> Response:
    """The dashboard's figures for the calling key (an admin: every key), as JSON."""
    ledger: Ledger | None = request.app.state.ledger
    if ledger is None:
        raise ApiError(400, "invalid_request", "the ledger is off (LEDGER_URL=off)")
    key = caller(request)
    own = key.name if key is not None else "anonymous"
    view = View(keys=None if key is not None and key.admin else [own],
                admin=key is not None and key.admin)  # fmt: skip
    filters = {
        name: request.query_params.get(name, "")[:200] for name in ("key", "model", "status")
    }
    now = time.time()
    figures = await ledger.reading(lambda: _figures(ledger, view, now, filters))
    for line in figures["daily"]:
        line["day"] = _group_label("day", line["day"])
    for line in figures["hourly"]:
        line["hour"] = _group_label("hour", line["hour"])
    for call in figures["calls"]:
        call["at"] = _iso(float(call["at"]))
    keys = request.app.state.keys.keys() if view.admin else [key] if key is not None else []
    budgets = []
    for each in keys:
        if each.budget_usd is None:
            continue
        bucket = period_bucket(each.budget_period, now)[0]
        budgets.append({
            "key": each.name, "period": each.budget_period, "budget_usd": each.budget_usd,
            "spent_usd": round(figures["spent"].get((each.name, bucket), 0.0), 6),
        })  # fmt: skip
    open_calls: dict[str, int] = request.app.state.open_calls
    answer = {
        "key": own,
        "admin": view.admin,
        "now": _iso(now),
        "days": DAYS,
        "hours": HOURS,
        "daily": figures["daily"],
        "hourly": figures["hourly"],
        "latency": figures["latency"],
        "budgets": sorted(budgets, key=lambda b: b["key"]),
        "in_flight": {
            name: n
            for name, n in sorted(open_calls.items())
            if view.keys is None or name in view.keys
        },  # fmt: skip
        "deployments": request.app.state.deployments.states() if view.admin else [],
        "calls": figures["calls"],
    }
    return JSONResponse(answer)
