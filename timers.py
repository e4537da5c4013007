"""Coarse timers: many deadlines on one event-loop timer.

asyncio arms a timer in the event loop for every `call_later` and `asyncio.timeout`:
2-7 us each under uvloop, and every request used two, the deadline of its body and
the start of its disconnect watch (bench/README.md). Deadlines measured in seconds need
no millisecond precision, so they are kept here in slots of `resolution_s`; one loop
timer, armed only while some deadline is pending, fires each slot as it comes due.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable


class Timer:
    """A pending call; `cancel()` drops it (a no-op once it ran)."""

    __slots__ = ("_slot", "_timers")

    def __init__(self, timers: CoarseTimers, slot: int) -> None:
        self._timers = timers
        self._slot = slot

    def cancel(self) -> None:
        slots = self._timers._slots
        pending = slots.get(self._slot)
        if pending is not None:
            pending.pop(self, None)
            if not pending:
                del slots[self._slot]  # so the loop timer stops once nothing is pending


class CoarseTimers:
    def __init__(self, resolution_s: float = 0.05) -> None:
        self.resolution_s = resolution_s
        self._slots: dict[int, dict[Timer, Callable[[], None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._fired = 0  # every slot up to this one has run

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Call `callback` from the event loop `delay_s` or up to `resolution_s` later."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (tests run one each): what was pending belonged to the old one.
            self._loop, self._slots, self._tick_handle = loop, {}, None
        now_slot = math.floor(loop.time() / self.resolution_s)
        if self._tick_handle is None:
            self._fired = now_slot
            self._tick_handle = loop.call_at((now_slot + 1) * self.resolution_s, self._tick)
        slot = max(math.ceil((loop.time() + delay_s) / self.resolution_s), self._fired + 1)
        timer = Timer(self, slot)
        pending = self._slots.get(slot)
        if pending is None:
            pending = self._slots[slot] = {}
        pending[timer] = callback
        return timer

    def _tick(self) -> None:
        loop = self._loop
        if loop is None or asyncio.get_running_loop() is not loop:
            return  # a tick left on a loop these timers have moved on from
        due = math.floor(loop.time() / self.resolution_s)
        for slot in range(self._fired + 1, due + 1):
            for callback in self._slots.pop(slot, {}).values():
                try:
                    callback()
                except Exception as exc:  # one failing callback must not stop the others
                    loop.call_exception_handler(
                        {"message": "a coarse timer's callback failed", "exception": exc}
                    )
        self._fired = max(self._fired, due)
        if self._slots:
            self._tick_handle = loop.call_at((due + 1) * self.resolution_s, self._tick)
        else:
            self._tick_handle = None

    def timeout(self, delay_s: float) -> Deadline:
        """`asyncio.timeout` at this resolution: TimeoutError when the block overruns.
        Like it, a cancellation from anyone else passes through untouched."""
        return Deadline(self, delay_s)


class Deadline:
    """The context manager of `CoarseTimers.timeout`: a class, not @contextmanager,
    which made a generator and three more calls for every request body."""

    __slots__ = ("_cancelling", "_delay_s", "_expired", "_task", "_timer", "_timers")

    def __init__(self, timers: CoarseTimers, delay_s: float) -> None:
        self._timers = timers
        self._delay_s = delay_s
        self._expired = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._timer = self._timers.call_later(self._delay_s, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._timer.cancel()
        if not self._expired:
            return
        # Our cancel is spent: uncancel it whether the block raised it, swallowed it,
        # or ended some other way.
        if self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from None
