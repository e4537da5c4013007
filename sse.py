"""Server-Sent Events, in and out.

In: a provider's `text/event-stream`, parsed as the HTML spec says, in linear time
and bounded memory whatever the provider sends.

A line is held until its newline comes, as pieces (never copied again on each read),
and no event may grow past `max_bytes`: a provider that never sends a newline, or
one endless `data:` line, is an error once it passes the bound, not memory without
end. A provider that trickles bytes without ever finishing an event is timed out
after `idle_s`, which a per-read timeout alone would never do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sse_starlette.sse import AppStatus
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import admission
from dialects import Encoder
from errors import ApiError, ProviderError, provider_api_error, request_id
from metrics import Gauge
from requestlog import CALL


class StreamTooLarge(Exception):
    """An event (or one line of it) passed the bound."""


class StreamStalled(Exception):
    """Bytes kept coming, but no event (nor comment) was finished for `idle_s`."""


async def sse_events(
    chunks: AsyncIterator[bytes],
    *,
    max_bytes: int,
    idle_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each event of a text/event-stream.

    Lines end with LF or CRLF. A bare CR inside a line is kept (the spec would end
    the line there): it can only stand as whitespace between JSON tokens, and
    splitting on it would break JSON that arrived whole. A comment line counts as
    progress for `idle_s`, as servers send them as keep-alives while a model thinks.
    """
    event = ""
    data: list[str] = []
    size = 0  # bytes of the event's finished lines
    pieces: list[bytes] = []  # the unfinished line
    held = 0  # bytes in `pieces`
    last = clock()
    progressed = False
    async for chunk in chunks:
        start = 0
        end = chunk.find(b"\n")
        while end >= 0:
            if pieces:
                pieces.append(chunk[start:end])
                raw = b"".join(pieces)
                pieces, held = [], 0
            else:
                raw = chunk[start:end]
            start = end + 1
            end = chunk.find(b"\n", start)
            if raw.startswith(b"data:"):  # nearly every line: no decoding of the rest
                value = raw[6:] if raw.startswith(b"data: ") else raw[5:]
                data.append(value.rstrip(b"\r").decode("utf-8", "replace"))
                size += len(raw)
                if size > max_bytes:
                    raise StreamTooLarge(f"an event of the stream is over {max_bytes} bytes")
                continue
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data:
                    yield event or "message", data[0] if len(data) == 1 else "\n".join(data)
                    progressed = True
                event, data, size = "", [], 0
                continue
            if line.startswith(":"):
                progressed = True
                continue
            size += len(raw)
            name, _, value_text = line.partition(":")
            if name == "event":
                event = value_text[1:] if value_text.startswith(" ") else value_text
            elif name == "data":  # "data" alone: an empty line of data
                data.append(value_text)
        if start < len(chunk):
            pieces.append(chunk[start:] if start else chunk)
            held += len(chunk) - start
        if size + held > max_bytes:
            raise StreamTooLarge(f"an event of the stream is over {max_bytes} bytes")
        now = clock()
        if progressed:
            last, progressed = now, False
        elif now - last > idle_s:
            raise StreamStalled(f"the stream finished no event for {idle_s:g} s")
    if pieces:
        name, _, text = b"".join(pieces).rstrip(b"\r").decode("utf-8", "replace").partition(":")
        if name == "data":
            data.append(text[1:] if text.startswith(" ") else text)
    if data:
        yield event or "message", "\n".join(data)


# --- SSE out ----------------------------------------------------------------------------
#
# The serving path (gateway.py) hands `EventStream` the first frame of a stream once it
# is ready, so a provider that fails before it gets a real HTTP error instead of a 200
# stream with an error inside; a failure after it becomes an error frame in the
# client's dialect, and the stream ends.

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on as it comes
]


@dataclass
class Streams:
    """What every stream of an app shares, in `app.state.streams`."""

    ping_s: float
    grace_s: float
    open_streams: Gauge
    draining: Draining = field(default_factory=lambda: Draining())


class Draining:
    """Server shutdown, as the open streams learn of it. sse-starlette hooks uvicorn's
    signal handler to set `AppStatus.should_exit`; one task per app looks at it four
    times a second while streams are open, and tells each stream to start its grace."""

    POLL_S = 0.25

    def __init__(self) -> None:
        self._streams: set[EventStream] = set()
        self._poller: asyncio.Task[None] | None = None

    @staticmethod
    def shutting_down() -> bool:
        return AppStatus.should_exit

    def add(self, stream: EventStream) -> None:
        self._streams.add(stream)
        if self.shutting_down():
            stream.drain()
        elif self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def discard(self, stream: EventStream) -> None:
        self._streams.discard(stream)

    async def _poll(self) -> None:
        while self._streams:
            if self.shutting_down():
                for stream in list(self._streams):
                    stream.drain()
                return
            await asyncio.sleep(self.POLL_S)


class EventStream(Response):
    """200 text/event-stream relaying ready-made frames as they come.

    Beside the relay, which runs in the request's own task, one small task per stream
    waits for the client to leave (and then cancels the relay, and with it the provider
    call) and writes a `: ping` comment when nothing was sent for SSE_PING_INTERVAL_S.
    On server shutdown the stream gets SHUTDOWN_GRACE_S to finish, then ends with an
    error frame (`not_ready`), so the client knows it was cut.

    A departure: sse-starlette's EventSourceResponse, which the design names, makes a
    task group of four tasks a stream and a cancel scope an event, measurably more CPU
    an event than this (bench/README.md, "Why the departures"). Its shutdown signal
    (`AppStatus`) is still the one used here.
    """

    def __init__(
        self,
        streams: Streams,
        request: Request,
        first: bytes,
        frames: AsyncGenerator[bytes, None],
        encoder: Encoder,
        done: Callable[[], None] = lambda: None,
    ) -> None:
        self.request = request
        self.done = done  # gives back the provider-call slot
        self.first = first
        self.frames = frames
        self.encoder = encoder
        self.ping_s = streams.ping_s
        self.grace_s = streams.grace_s
        self.draining = streams.draining
        self.open_streams = streams.open_streams
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

        def start_companion() -> None:
            nonlocal companion
            companion = loop.create_task(self._companion(receive, send))

        # The companion starts a moment into the stream: a short one never needs it,
        # and one that starts with many others does not make it in the same turn.
        timer = loop.call_later(admission.WATCH_AFTER_S, start_companion)
        self.draining.add(self)
        self.open_streams.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            self._last_sent = loop.time()
            piece: bytes | None = self.first
            try:
                while piece is not None:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    self._last_sent = loop.time()
                    piece = await anext(self.frames, None)
            except ProviderError as exc:
                await self._send_error(send, provider_api_error(exc))
            except ApiError as exc:  # a refusal found after the first frame
                await self._send_error(send, exc)
            except asyncio.CancelledError:
                if not (self._left or self._cut) or task.uncancel() > cancelling:
                    raise  # not ours: someone else is cancelling this request
                if self._left:
                    return  # nobody is reading
                await self._send_error(
                    send, ApiError(503, "not_ready", "the service is shutting down; stream cut")
                )
            timer.cancel()  # before the last message: no ping may follow it
            if companion is not None:
                companion.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            timer.cancel()
            if companion is not None:
                companion.cancel()
            self.done()
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
                    ping = self.encoder.ping
                    await send({"type": "http.response.body", "body": ping, "more_body": True})
                continue
            if message["type"] == "http.disconnect":
                if not self._cut and self._task is not None:
                    self._left = True
                    self._task.cancel()
                return

    async def _send_error(self, send: Send, error: ApiError) -> None:
        self.request.scope[CALL]["error"] = error.type
        piece = self.encoder.error(error, request_id(self.request.scope))
        await send({"type": "http.response.body", "body": piece, "more_body": True})
