"""Coarse timers: callbacks run once their slot is due (never early, at most one
resolution late), cancelled ones never, and `timeout` behaves as `asyncio.timeout`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from timers import CoarseTimers

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # `timeout` uses asyncio's task cancellation counts


async def test_a_callback_runs_after_its_delay_within_one_resolution() -> None:
    timers, loop = CoarseTimers(resolution_s=0.02), asyncio.get_running_loop()
    started, ran = loop.time(), asyncio.Event()
    timers.call_later(0.1, ran.set)
    await asyncio.wait_for(ran.wait(), 5)
    waited = loop.time() - started
    assert 0.1 <= waited < 0.1 + 0.02 + 0.05  # one resolution, and slack for a busy CI


async def test_callbacks_run_in_the_order_of_their_deadlines() -> None:
    timers, order = CoarseTimers(resolution_s=0.01), []
    done = asyncio.Event()
    timers.call_later(0.08, lambda: order.append("late"))
    timers.call_later(0.02, lambda: order.append("early"))
    timers.call_later(0.05, lambda: order.append("middle"))
    timers.call_later(0.09, done.set)
    await asyncio.wait_for(done.wait(), 5)
    assert order == ["early", "middle", "late"]


async def test_a_cancelled_callback_never_runs() -> None:
    timers, ran = CoarseTimers(resolution_s=0.01), []
    timers.call_later(0.02, lambda: ran.append("cancelled")).cancel()
    kept = asyncio.Event()
    timers.call_later(0.04, kept.set)
    await asyncio.wait_for(kept.wait(), 5)
    assert ran == []


async def test_a_failing_callback_is_reported_and_the_others_still_run() -> None:
    timers, loop = CoarseTimers(resolution_s=0.01), asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    ran = asyncio.Event()
    try:

        def fail() -> None:
            raise ZeroDivisionError

        timers.call_later(0.01, fail)
        timers.call_later(0.01, ran.set)
        await asyncio.wait_for(ran.wait(), 5)
    finally:
        loop.set_exception_handler(None)
    assert isinstance(reported[0]["exception"], ZeroDivisionError)


async def test_timeout_raises_when_the_block_overruns() -> None:
    timers = CoarseTimers(resolution_s=0.01)
    with pytest.raises(TimeoutError):
        with timers.timeout(0.05):
            await asyncio.sleep(5)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # our cancel was taken back


async def test_timeout_leaves_a_block_that_ends_in_time_alone() -> None:
    timers = CoarseTimers(resolution_s=0.01)
    with timers.timeout(0.05):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # past the deadline: nothing fires at this task any more


async def test_timeout_lets_someone_elses_cancel_through() -> None:
    timers = CoarseTimers(resolution_s=0.01)
    inside = asyncio.Event()

    async def guarded() -> None:
        with timers.timeout(5):
            inside.set()
            await asyncio.sleep(5)

    task = asyncio.ensure_future(guarded())
    await asyncio.wait_for(inside.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


def test_the_timers_move_on_to_a_new_event_loop() -> None:
    """Each test (and each TestClient) runs its own loop; one app's timers serve them all."""
    timers = CoarseTimers(resolution_s=0.01)

    async def wait_once() -> None:
        ran = asyncio.Event()
        timers.call_later(0.01, ran.set)
        await asyncio.wait_for(ran.wait(), 5)

    async def leave_one_pending() -> None:
        timers.call_later(10, lambda: None)

    asyncio.run(leave_one_pending())
    asyncio.run(wait_once())
    asyncio.run(wait_once())


async def test_the_loop_timer_stops_once_nothing_is_pending() -> None:
    timers = CoarseTimers(resolution_s=0.01)
    timers.call_later(30, lambda: None).cancel()
    ran = asyncio.Event()
    timers.call_later(0.01, ran.set)
    await asyncio.wait_for(ran.wait(), 5)
    await asyncio.sleep(0.05)  # a tick or two later
    assert timers._tick_handle is None  # no wake-ups every 10 ms for the next 30 s
