"""Server-Sent Events: one JSON object per `data:` line, and the rule that a stream
only starts once its first frame is ready.

Routes hand `open_sse` an async generator of ready-made frames. Waiting for its first
frame before answering means a provider that fails up to then gets a real HTTP error
instead of a 200 stream with an error inside; a failure after it becomes an
`event: error` frame wrapped like an HTTP error body, and the stream ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from pydantic_core import to_json
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

import llm
from errors import error_body, provider_api_error
from requestlog import CALL
from service import note, service, since_ms, unless_disconnected

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
    started = time.perf_counter()
    stayed, first = await unless_disconnected(request, anext(frames))
    if not stayed or first is None:
        await frames.aclose()
        return Response(status_code=499)  # the client has gone; nobody reads this
    note(request, ttft_ms=since_ms(started))
    return EventSourceResponse(
        _relay(request, first, frames),
        headers={"Cache-Control": "no-cache"},
        ping=service(request).settings.ping_interval_s,
        ping_message_factory=_ping,
        sep="\n",
    )


async def _relay(
    request: Request, first: bytes, frames: AsyncGenerator[bytes, None]
) -> AsyncIterator[bytes]:
    open_streams = service(request).metrics.open_streams
    open_streams.inc()
    try:
        yield first
        async for frame in frames:
            yield frame
    except llm.ProviderError as exc:
        error = provider_api_error(exc)
        request.scope[CALL]["error"] = error.type
        yield sse_frame(error_body(request.scope, error.type, error.message), "error")
    finally:
        open_streams.dec()
        await frames.aclose()
