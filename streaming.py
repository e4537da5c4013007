"""Server-Sent Events: one JSON object per `data:` line, and the rule that a stream
only starts once its first frame is ready.

Routes hand `open_sse` an async generator of ready-made frames. Waiting for its first
frame before answering means a provider that fails up to then gets a real HTTP error
instead of a 200 stream with an error inside; a failure after it becomes an
`event: error` frame wrapped like an HTTP error body, and the stream ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import anyio
from pydantic_core import to_json
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

import llm
from errors import ApiError, error_body, provider_api_error
from requestlog import CALL
from service import Inflight, note, service, since_ms, unless_disconnected

DONE = b"data: [DONE]\n\n"


def sse_frame(data: Mapping[str, Any], event: str | None = None) -> bytes:
    """One SSE event whose data is one line of JSON: newlines in text stay escaped."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + to_json(data) + b"\n\n"


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping")


async def open_sse(request: Request, frames: AsyncGenerator[bytes, None]) -> Response:
    """The stream of `frames`, answered once the first is ready (provider errors before
    it propagate as exceptions, for the HTTP error handlers)."""
    svc = service(request)
    held = _held(svc.inflight, frames)
    started = time.perf_counter()
    stayed, first = await unless_disconnected(request, anext(held))
    if not stayed or first is None:
        await held.aclose()
        return Response(status_code=499)  # the client has gone; nobody reads this
    note(request, ttft_ms=since_ms(started))
    shutdown = anyio.Event()
    grace = svc.settings.shutdown_grace_s
    return EventSourceResponse(
        _relay(request, first, held, shutdown, grace),
        headers={"Cache-Control": "no-cache"},
        ping=svc.settings.ping_interval_s,
        ping_message_factory=_ping,
        sep="\n",
        shutdown_event=shutdown,
        # the hard stop, for a stream whose provider sends nothing in the grace period
        shutdown_grace_period=grace + 2,
    )


async def _held(
    inflight: Inflight, frames: AsyncGenerator[bytes, None]
) -> AsyncGenerator[bytes, None]:
    """`frames`, holding a provider-call slot from the first frame to the last."""
    with inflight.slot():
        try:
            async for frame in frames:
                yield frame
        finally:
            await frames.aclose()


async def _relay(
    request: Request,
    first: bytes,
    frames: AsyncGenerator[bytes, None],
    shutdown: anyio.Event,
    grace_s: float,
) -> AsyncIterator[bytes]:
    """The response body. On server shutdown a stream gets `grace_s` to finish, then
    ends with an `event: error`, so the client knows it was cut."""
    open_streams = service(request).metrics.open_streams
    open_streams.inc()
    deadline: float | None = None
    try:
        yield first
        while True:
            if deadline is None and shutdown.is_set():
                deadline = time.monotonic() + grace_s
            try:
                if deadline is None:
                    frame = await anext(frames)
                else:
                    frame = await asyncio.wait_for(anext(frames), deadline - time.monotonic())
            except StopAsyncIteration:
                return
            except TimeoutError:
                error = ApiError(503, "not_ready", "the service is shutting down; stream cut")
                yield _error_frame(request, error)
                return
            yield frame
    except llm.ProviderError as exc:
        yield _error_frame(request, provider_api_error(exc))
    finally:
        open_streams.dec()
        await frames.aclose()


def _error_frame(request: Request, error: ApiError) -> bytes:
    request.scope[CALL]["error"] = error.type
    return sse_frame(error_body(request.scope, error.type, error.message), "error")
