"""The outermost middleware: a request id on every response, one access-log line per
request, and the last word on unexpected exceptions.

Starlette's own ServerErrorMiddleware re-raises after answering, which makes the
server print a traceback; here the exception is logged once, as JSON with the request
id, and the client gets the contract's 500 body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth import AUTH
from errors import (
    ERROR_SHAPE,
    REQUEST_ID,
    RESPONSE_HEADERS,
    error_response,
    guessed_shape,
    relative_path,
)
from logs import current_request_id, cut, info_fields
from metrics import OTHER, Metrics
from quotas import RESERVATION

CALL = "text_tool.call"  # a dict the routes fill with model, tokens and cost for the log
_SANE_ID = re.compile(rb"^[A-Za-z0-9._-]{1,128}$")
_LOGGED_FIELDS = (
    "model",
    "upstream_model",
    "deployment",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "finish_reason",
    "error",
    "ttft_ms",
    "provider_ms",
    "dropped",
    "session",
)


def incoming_request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _SANE_ID.match(value):
                return bytes(value).decode("ascii")
            break
    return os.urandom(16).hex()  # as random as uuid4().hex, at a fifth of the cost


def route_label(scope: Scope, known_paths: frozenset[str]) -> str:
    """The matched route's template, else the path if it is one of ours (a request
    refused before routing), else "other": never a raw path a caller chose."""
    route = scope.get("route")
    if isinstance(route, Route):
        return route.path
    path = relative_path(scope)
    return path if path in known_paths else OTHER


class Sampler:
    """At most `burst` log lines an address in any `window_s`: a flood of 401s from one
    address (anyone can send them, thousands a second) must not fill the disk. The
    first line an address gets after a quiet window says how many were not written;
    the metrics count every one. At most `max_addresses` are remembered."""

    def __init__(
        self,
        *,
        burst: int = 10,
        window_s: float = 60.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.window_s, self.max_addresses, self._clock = (
            burst, window_s, max_addresses, clock
        )  # fmt: skip
        self._seen: OrderedDict[str, list[float]] = OrderedDict()  # [since, lines, skipped]

    def admit(self, address: str) -> int | None:
        """None: do not log this one; else how many went unlogged before it."""
        now = self._clock()
        entry = self._seen.get(address)
        if entry is None or now - entry[0] >= self.window_s:
            skipped = int(entry[2]) if entry is not None else 0
            self._seen[address] = [now, 1, 0]
            self._seen.move_to_end(address)
            if len(self._seen) > self.max_addresses:
                self._seen.popitem(last=False)
            return skipped
        if entry[1] < self.burst:
            entry[1] += 1
            return 0
        entry[2] += 1
        return None


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        logger: logging.Logger,
        metrics: Metrics | None = None,
        known_paths: frozenset[str] = frozenset(),
        shapes: Mapping[str, str] | None = None,
        record: Callable[[float, str, dict[str, Any], dict[str, Any]], None] | None = None,
    ) -> None:
        self.app = app
        self.logger = logger
        self.metrics = metrics
        self.known_paths = known_paths
        # The error shape each route's clients read, recorded once for the request.
        self.shapes = dict(shapes or {})
        self.refusals = Sampler()
        # Each admitted call, once answered: (its wall-clock start, request id, the access
        # line's fields, the call's notes) to the ledger (store.py).
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        rid = incoming_request_id(scope)
        scope[REQUEST_ID] = rid
        path = relative_path(scope)
        scope[ERROR_SHAPE] = self.shapes.get(path) or guessed_shape(
            path, any(name == b"anthropic-version" for name, _ in scope["headers"])
        )
        token = current_request_id.set(rid)
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        call: dict[str, Any] = {}
        scope[CALL] = call
        headers = [(b"x-request-id", rid.encode("ascii"))]
        scope[RESPONSE_HEADERS] = headers
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = status or 499  # the client left while sending its body
        except asyncio.CancelledError:
            # uvicorn's graceful shutdown ran out (the only canceller of a request's task)
            # before this answer began: the contract's JSON, not uvicorn's plain-text 500.
            if status:
                raise
            response = error_response(
                scope, 503, "not_ready", "the service shut down before the answer was ready; "
                "retry", headers={"Retry-After": "1"},
            )  # fmt: skip
            await response(scope, receive, send_with_id)
        except Exception:
            self.logger.exception("unhandled error", extra={"event": "error"})
            if status == 0:
                response = error_response(
                    scope, 500, "internal_error", "internal error; see the server log"
                )
                await response(scope, receive, send_with_id)
        finally:
            reservation = scope.get(RESERVATION)
            if reservation is not None:
                reservation.release()  # a no-op once the call was accounted
            seconds = time.perf_counter() - started
            key = getattr(scope.get(AUTH), "name", None)
            client = (scope.get("client") or ("", 0))[0]
            fields: dict[str, Any] = {
                "event": "access",
                "key": key,
                "client": cut(client, 64),
                "method": scope["method"],
                "path": cut(scope["path"]),
                "route": route_label(scope, self.known_paths),
                "status": status or 499,
                "duration_ms": round(seconds * 1000, 2),
            }
            for name in _LOGGED_FIELDS:
                if name in call:
                    fields[name] = call[name]
            skipped = 0 if status != 401 else self.refusals.admit(client)
            if skipped is not None:
                if skipped:
                    fields["unlogged_401s"] = skipped
                info_fields(self.logger, "request", fields)
            if self.record is not None and "call" in call:  # it reached admission
                self.record(time.time() - seconds, rid, fields, call)
            if self.metrics is not None:
                self.metrics.in_flight.dec()
                self.metrics.observe(fields["route"], fields["status"], key, seconds, call)
            current_request_id.reset(token)
