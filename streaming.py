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
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import jsonio
import llm
from errors import ApiError, error_body, provider_api_error
from requestlog import CALL
from service import Inflight, note, service, since_ms, unless_disconnected

DONE = b"data: [DONE]\n\n"


def sse_frame(data: Mapping[str, Any], event: str | None = None) -> bytes:
    """One SSE event whose data is one line of JSON: newlines in text stay escaped."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + jsonio.dumps(data) + b"\n\n"


PING = b": ping\n\n"
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on as it comes
]


async def open_sse(request: Request, frames: AsyncGenerator[bytes, None]) -> Response:
    """The stream of `frames`, answered once the first is ready (provider errors before
    it propagate as exceptions, for the HTTP error handlers)."""
    svc = service(request)
    held = _held(svc.inflight, frames)
    started = time.perf_counter()
    stayed, first = await unless_disconnected(request, anext(held), svc.timers)
    if not stayed or first is None:
        await held.aclose()
        return Response(status_code=499)  # the client has gone; nobody reads this
    note(request, ttft_ms=since_ms(started))
    return EventStream(request, first, held)


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


class EventStream(Response):
    """200 text/event-stream relaying ready-made frames as they come.

    Beside the relay, which runs in the request's own task, one small task per stream
    waits for the client to leave (and then cancels the relay, and with it the provider
    call) and writes a `: ping` comment when nothing was sent for SSE_PING_INTERVAL_S.
    On server shutdown the stream gets SHUTDOWN_GRACE_S to finish, then ends with an
    `event: error`, so the client knows it was cut.

    (sse-starlette's EventSourceResponse, used before, runs four tasks in an anyio task
    group per stream and a cancel scope per event: 174 us a stream and 6.5 us an event
    more than this, measured in bench/README.md.)"""

    def __init__(self, request: Request, first: bytes, frames: AsyncGenerator[bytes, None]):
        svc = service(request)
        self.request = request
        self.first = first
        self.frames = frames
        self.ping_s = svc.settings.ping_interval_s
        self.grace_s = svc.settings.shutdown_grace_s
        self.draining = svc.draining
        self.open_streams = svc.metrics.open_streams
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_HEADERS)
        self._task: asyncio.Task[Any] | None = None
        self._last_sent = 0.0
        self._left = False  # the client went away
        self._cut = False  # the shutdown grace ran out
        self._deadline: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self._task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        loop = asyncio.get_running_loop()
        companion: asyncio.Task[None] | None = None
        self.draining.add(self)
        self.open_streams.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            self._last_sent = loop.time()
            companion = loop.create_task(self._companion(receive, send))
            frame: bytes | None = self.first
            try:
                while frame is not None:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                    self._last_sent = loop.time()
                    frame = await anext(self.frames, None)
            except llm.ProviderError as exc:
                await self._send_error(send, provider_api_error(exc))
            except asyncio.CancelledError:
                if not (self._left or self._cut) or task.uncancel() > cancelling:
                    raise  # not ours: someone else is cancelling this request
                if self._left:
                    return  # nobody is reading
                await self._send_error(
                    send, ApiError(503, "not_ready", "the service is shutting down; stream cut")
                )
            companion.cancel()  # before the last message: no ping may follow it
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if companion is not None:
                companion.cancel()
            if self._deadline is not None:
                self._deadline.cancel()
            self.draining.discard(self)
            self.open_streams.dec()
            await self.frames.aclose()

    def drain(self) -> None:
        """The server is shutting down: cut the stream if it is still open after the grace."""
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(self.grace_s, self._cut_now)

    def _cut_now(self) -> None:
        if self._task is not None and not self._left:
            self._cut = True
            self._task.cancel()

    async def _companion(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout_at(self._last_sent + self.ping_s):
                    message = await receive()
            except TimeoutError:
                if loop.time() >= self._last_sent + self.ping_s:
                    self._last_sent = loop.time()
                    await send({"type": "http.response.body", "body": PING, "more_body": True})
                continue
            if message["type"] == "http.disconnect":
                if not self._cut and self._task is not None:
                    self._left = True
                    self._task.cancel()
                return

    async def _send_error(self, send: Send, error: ApiError) -> None:
        self.request.scope[CALL]["error"] = error.type
        frame = sse_frame(error_body(self.request.scope, error.type, error.message), "error")
        await send({"type": "http.response.body", "body": frame, "more_body": True})
