"""Per-key rate limits: an exact sliding window, in memory, behind a small interface;
and per-key concurrency: at most N calls of a key in flight at once.

"At most N requests in any window of W seconds": each key keeps the times of the
requests it was admitted in the last W seconds (never more than N), so a decision
is exact, and the wait until a slot frees is the oldest of them plus W. Every
decision is made without an `await`, so concurrent requests cannot slip in between
a count and its update. The same holds for the count of a key's calls in flight.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth import AUTH, ApiKey
from config import Rate
from errors import RESPONSE_HEADERS, error_response, relative_path, whole_seconds


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # until the oldest counted request leaves the window
    retry_after_s: float  # 0 when allowed


class Limiter(Protocol):
    async def hit(self, key: str, rate: Rate) -> Decision: ...


class StoreUnavailable(Exception):
    """A shared store cannot be reached and RATE_LIMIT_STORE_FAIL is closed."""


class StoreBusy(Exception):
    """Every connection to the shared store is in use, and none came free in time:
    back-pressure (503 overloaded), not an outage."""


def store_error_response(scope: Scope, exc: StoreUnavailable | StoreBusy) -> Response:
    """The 503 for a shared store that is down (fail closed) or busy."""
    type_ = "overloaded" if isinstance(exc, StoreBusy) else "store_unavailable"
    return error_response(scope, 503, type_, str(exc), headers={"Retry-After": "1"})


class MemoryLimiter:
    """The sliding window for one process. Idle keys are dropped as time passes, and
    no more than `max_keys` keys are kept (the least recently seen go first)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 1_000_000
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # key -> (admission times, oldest first; window seconds), least recently hit first
        self._windows: OrderedDict[str, tuple[array[float], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    async def hit(self, key: str, rate: Rate) -> Decision:
        return self.check(key, rate)

    def check(self, key: str, rate: Rate) -> Decision:
        now = self._clock()
        entry = self._windows.get(key)
        if entry is None or entry[1] != rate.window_s:
            times: array[float] = array("d")
            self._windows[key] = (times, rate.window_s)
        else:
            times = entry[0]
            self._windows.move_to_end(key)
        expired = bisect_right(times, now - rate.window_s)
        if expired:
            del times[:expired]
        # A limit lowered since the last request: only its newest N count from here on.
        if len(times) > rate.count:
            del times[: len(times) - rate.count]
        allowed = len(times) < rate.count
        if allowed:
            times.append(now)
        reset = times[0] + rate.window_s - now
        self._evict(now)
        return Decision(
            allowed=allowed,
            limit=rate.count,
            remaining=rate.count - len(times),
            reset_s=reset,
            retry_after_s=0.0 if allowed else reset,
        )

    def _evict(self, now: float) -> None:
        windows = self._windows
        while len(windows) > self._max_keys:
            windows.popitem(last=False)
        # The front is the least recently hit: drop it while its window has passed.
        for _ in range(2):
            if not windows:
                return
            key, (times, window_s) = next(iter(windows.items()))
            if times[-1] > now - window_s:
                return
            del windows[key]


def limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"ratelimit-limit", str(decision.limit).encode()),
        (b"ratelimit-remaining", str(decision.remaining).encode()),
        (b"ratelimit-reset", str(whole_seconds(decision.reset_s)).encode()),
    ]
    if not decision.allowed:
        headers.append((b"retry-after", str(whole_seconds(decision.retry_after_s)).encode()))
    return headers


def describe(rate: Rate) -> str:
    unit = {1: "1 second", 60: "1 minute", 3600: "1 hour"}.get(rate.window_s)
    return f"{rate.count} per {unit or f'{rate.window_s} seconds'}"


class Lease(Protocol):
    """One of a key's slots for calls in flight, held until the call ends."""

    def release(self) -> None: ...


class Slots(Protocol):
    async def take(self, key: str, limit: int) -> Lease | None: ...


class MemorySlots:
    """The calls of each key in flight in this process; a key with none is forgotten."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    async def take(self, key: str, limit: int) -> Lease | None:
        return self.grab(key, limit)

    def grab(self, key: str, limit: int) -> MemoryLease | None:
        count = self.held.get(key, 0)
        if count >= limit:
            return None
        self.held[key] = count + 1
        return MemoryLease(self, key)

    def free(self, key: str) -> None:
        count = self.held[key] - 1
        if count:
            self.held[key] = count
        else:
            del self.held[key]


class MemoryLease:
    __slots__ = ("slots", "key")

    def __init__(self, slots: MemorySlots, key: str) -> None:
        self.slots: MemorySlots | None = slots
        self.key = key

    def release(self) -> None:
        if self.slots is not None:
            self.slots.free(self.key)
            self.slots = None


class ConcurrencyMiddleware:
    """At most a key's `max_concurrent` (else `default_limit`) calls of `paths` in
    flight at once: the slot is taken before the body is read and held until the
    answer has been sent, a stream's last event included. Past it, 429 at once."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        slots: Slots,
        default_limit: int | None,
        paths: frozenset[str],
        open_calls: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.slots = slots
        self.default_limit = default_limit
        self.paths = paths
        # Each key's calls of `paths` in this process now, limited or not (the dashboard
        # shows them); a key with none is not in it.
        self.open_calls: dict[str, int] = {} if open_calls is None else open_calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key: ApiKey | None = scope.get(AUTH) if scope["type"] == "http" else None
        if key is None or relative_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        name, open_calls = key.name, self.open_calls
        open_calls[name] = open_calls.get(name, 0) + 1
        try:
            await self._limited(key, scope, receive, send)
        finally:
            left = open_calls[name] - 1
            if left:
                open_calls[name] = left
            else:
                del open_calls[name]

    async def _limited(self, key: ApiKey, scope: Scope, receive: Receive, send: Send) -> None:
        limit = key.max_concurrent or self.default_limit
        if limit is None:
            await self.app(scope, receive, send)
            return
        try:
            lease = await self.slots.take(key.name, limit)
        except (StoreUnavailable, StoreBusy) as exc:
            await store_error_response(scope, exc)(scope, receive, send)
            return
        if lease is None:
            response = error_response(
                scope,
                429,
                "concurrency_limit_exceeded",
                f"{limit} calls of this key are in flight; retry when one ends",
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            lease.release()


class RateLimitMiddleware:
    """Limits every authenticated request, before its body is read. A path in
    `allowances` (one a client calls often and cheaply, as Claude Code counts tokens
    before each turn) has a window of its own, that many times the key's rate."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: Limiter,
        default_rate: Rate,
        allowances: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.default_rate = default_rate
        self.allowances = dict(allowances or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key: ApiKey | None = scope.get(AUTH) if scope["type"] == "http" else None
        if key is None:
            await self.app(scope, receive, send)
            return
        rate = key.rate_limit or self.default_rate
        name = key.name
        if self.allowances:
            path = relative_path(scope)
            times = self.allowances.get(path)
            if times is not None:
                rate, name = Rate(rate.count * times, rate.window_s), f"{name} {path}"
        try:
            decision = await self.limiter.hit(name, rate)
        except (StoreUnavailable, StoreBusy) as exc:
            await store_error_response(scope, exc)(scope, receive, send)
            return
        headers = limit_headers(decision)
        if not decision.allowed:
            wait = whole_seconds(decision.retry_after_s)
            response = error_response(
                scope, 429, "rate_limit_exceeded", f"{describe(rate)}; retry in {wait} s"
            )
            response.raw_headers.extend(headers)
            await response(scope, receive, send)
            return

        collected = scope.get(RESPONSE_HEADERS)
        if collected is not None:
            collected.extend(headers)
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)
