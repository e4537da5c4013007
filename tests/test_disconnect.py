"""`unless_disconnected`: a provider call is dropped when its client leaves, and only then.

The call runs in the request's own task and a watcher, started WATCH_AFTER_S into
the call, cancels it, so these pin down the cancellation bookkeeping: the
client leaving is ClientDisconnect, anyone else's cancel still propagates, and no
cancel request is left behind on the task.
"""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from admission import WATCH_AFTER_S, unless_disconnected

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the function uses asyncio's task cancellation counts


class Client:
    """The ASGI receive channel of one request: the body, then silence until `leave()`."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.body_sent = False

    async def receive(self) -> Message:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.gone.set()

    def request(self) -> Request:
        scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
        return Request(scope, self.receive)


async def _drain_body(request: Request) -> None:
    await request.body()


async def test_a_call_whose_client_stays_returns_its_result() -> None:
    client = Client()
    request = client.request()
    await _drain_body(request)

    async def call() -> str:
        await asyncio.sleep(0.01)
        return "answer"

    assert await unless_disconnected(request.receive, call()) == "answer"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_client_that_leaves_has_the_call_cancelled() -> None:
    client = Client()
    request = client.request()
    await _drain_body(request)
    cancelled = asyncio.Event()

    async def call() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    asyncio.get_running_loop().call_later(0.05, client.leave)
    async with asyncio.timeout(5):
        with pytest.raises(ClientDisconnect):
            await unless_disconnected(request.receive, call())
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # our cancel was taken back


async def _serving_a_call_that_hangs(client: Client) -> asyncio.Task[str]:
    """A request task inside `unless_disconnected`, its provider call under way."""
    request = client.request()
    await _drain_body(request)
    started = asyncio.Event()

    async def call() -> str:
        started.set()
        await asyncio.sleep(30)
        return "never"

    async def serve() -> str:
        return await unless_disconnected(request.receive, call())

    task = asyncio.ensure_future(serve())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(2 * WATCH_AFTER_S)  # the watcher is on
    return task


async def test_someone_elses_cancel_still_cancels_the_request() -> None:
    task = await _serving_a_call_that_hangs(Client())
    task.cancel()  # a server shutting down, say: not the client leaving
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_a_cancel_from_outside_as_the_client_leaves_is_not_swallowed() -> None:
    client = Client()
    task = await _serving_a_call_that_hangs(client)
    client.leave()
    task.cancel()  # both in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_the_watcher_does_not_outlive_the_call() -> None:
    client = Client()
    request = client.request()
    await _drain_body(request)
    before = asyncio.all_tasks()

    async def call() -> tuple[str, int]:
        await asyncio.sleep(2 * WATCH_AFTER_S)
        return "answer", len(asyncio.all_tasks())

    assert await unless_disconnected(request.receive, call()) == (
        "answer",
        len(before) + 1,  # the watcher was running
    )
    await asyncio.sleep(0)  # let the cancelled watcher finish
    assert asyncio.all_tasks() == before


async def test_a_call_answered_quickly_makes_no_watcher_task() -> None:
    client = Client()
    request = client.request()
    await _drain_body(request)
    before = asyncio.all_tasks()

    async def call() -> set[asyncio.Task[object]]:
        await asyncio.sleep(0.01)
        return asyncio.all_tasks()

    during = await unless_disconnected(request.receive, call())
    assert during == before
