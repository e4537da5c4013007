"""Coarse timers: many deadlines on one event-loop timer.

asyncio arms a timer in the event loop for every `call_later` and `asyncio.timeout`:
2-7 us each under uvloop, and every request used two, the deadline of its body and
the start of its disconnect watch (bench/README.md). Deadlines measured in seconds need
no millisecond precision, so they are kept here in slots of `resolution_s`; one loop
timer, armed only while some deadline is pending, fires each slot as it comes due.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterator


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

    @contextlib.contextmanager
    def timeout(self, delay_s: float) -> Iterator[None]:
        """`asyncio.timeout` at this resolution: TimeoutError when the block overruns.
        Like it, a cancellation from anyone else passes through untouched."""
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = self.call_later(delay_s, expire)
        try:
            yield
        except asyncio.CancelledError:
            if expired:
                expired = False
                if task.uncancel() <= cancelling:
                    raise TimeoutError from None
            raise
        finally:
            timer.cancel()
            if expired:
                task.uncancel()  # the block swallowed our cancel, or ended another way
