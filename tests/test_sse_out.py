"""EventStream, the SSE response, on a fake ASGI channel: pings while idle and never
after the end, the client leaving stops the frames, anyone else's cancel propagates,
and shutdown cuts a stream after its grace with an `event: error`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.requests import Request
from starlette.types import Message

from config import Settings
from dialects import PING
from dialects.ours import StreamEncoder
from server import create_app
from sse import EventStream, Streams

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # EventStream counts cancellations with asyncio's Task.uncancel


class Channel:
    """One client connection: what the app sent, and a way to leave."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.gone = asyncio.Event()

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def stream_for(frames: AsyncGenerator[bytes, None], **settings: float) -> EventStream:
    app = create_app(Settings(**settings))  # type: ignore[arg-type]
    scope = {"type": "http", "app": app, "method": "POST", "path": "/stream", "headers": []}
    scope["text_tool.call"] = {}
    request = Request(scope)
    return EventStream(streams(request), request, b"data: first\n\n", frames, StreamEncoder())


def streams(request: Request) -> Streams:
    shared: Streams = request.app.state.streams
    return shared


async def test_idle_streams_get_pings_and_none_follows_the_end() -> None:
    async def frames() -> AsyncGenerator[bytes, None]:
        await asyncio.sleep(0.25)
        yield b"data: second\n\n"

    channel = Channel()
    stream = stream_for(frames(), ping_interval_s=0.1)
    await asyncio.wait_for(stream(stream.request.scope, channel.receive, channel.send), 5)
    await asyncio.sleep(0.3)  # two more ping intervals: nothing may be sent after the end
    bodies = channel.bodies()
    assert bodies[0] == b"data: first\n\n"
    assert PING in bodies[1:-2] and bodies[-2:] == [b"data: second\n\n", b""]
    assert channel.sent[-1]["more_body"] is False
    assert streams(stream.request).open_streams.value == 0


async def hanging(closed: asyncio.Event) -> AsyncGenerator[bytes, None]:
    """Frames from a provider that has gone quiet; `closed` is set when they are closed."""
    try:
        await asyncio.sleep(30)
        yield b"data: never\n\n"
    finally:
        closed.set()


async def test_a_client_that_leaves_stops_the_frames_at_once() -> None:
    closed = asyncio.Event()
    channel = Channel()
    stream = stream_for(hanging(closed))
    asyncio.get_running_loop().call_later(0.05, channel.gone.set)
    async with asyncio.timeout(5):  # in this task, so that its cancel count can be read
        await stream(stream.request.scope, channel.receive, channel.send)
    assert closed.is_set()
    assert channel.bodies() == [b"data: first\n\n"]  # no end message: nobody reads it
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_someone_elses_cancel_propagates_and_closes_the_frames() -> None:
    closed = asyncio.Event()
    channel = Channel()
    stream = stream_for(hanging(closed))
    task = asyncio.ensure_future(stream(stream.request.scope, channel.receive, channel.send))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert closed.is_set()


async def test_shutdown_cuts_the_stream_after_its_grace_and_says_so() -> None:
    async def frames() -> AsyncGenerator[bytes, None]:
        while True:
            await asyncio.sleep(0.05)
            yield b"data: tick\n\n"

    channel = Channel()
    stream = stream_for(frames(), shutdown_grace_s=0.3)
    task = asyncio.ensure_future(stream(stream.request.scope, channel.receive, channel.send))
    await asyncio.sleep(0.1)
    stream.drain()  # what the app's shutdown watcher does for every open stream
    await asyncio.wait_for(task, 5)
    bodies = channel.bodies()
    assert bodies.count(b"data: tick\n\n") >= 4  # it went on during the grace
    assert bodies[-2].startswith(b"event: error\ndata: ") and b'"not_ready"' in bodies[-2]
    assert channel.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
