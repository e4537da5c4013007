"""Rate limits shared by several replicas through Redis (`RATE_LIMIT_STORE=redis://...`).

The sliding window is decided inside Redis by one Lua script per check (loaded once,
then called by its SHA), on Redis's own clock, so replicas with skewed clocks still
agree and exactly N requests are admitted in any window across all of them.

When Redis cannot be reached the service keeps serving on this replica's in-memory
limiter (`RATE_LIMIT_STORE_FAIL=open`, the default) or answers 503
`store_unavailable` (`closed`). It logs the incident once, shows it in `/ready` and
in the metrics, and tries Redis again every `retry_s`, so it is back on Redis within
seconds of its return; what it admitted meanwhile is not replayed.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from config import Rate
from ratelimit import Decision, MemoryLimiter, StoreUnavailable

# KEYS[1]: the key's window; ARGV: window (µs), limit, a unique member.
# Returns {allowed, remaining, microseconds until the oldest entry leaves the window}.
SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  count = count + 1
  allowed = 1
end
redis.call('PEXPIRE', KEYS[1], math.floor(window / 1000) + 1000)
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local remaining = limit - count
if remaining < 0 then remaining = 0 end
return {allowed, remaining, tonumber(oldest[2]) + window - now}
"""


class RedisLimiter:
    def __init__(self, url: str, *, prefix: str = "text-tool:ratelimit:") -> None:
        import redis.asyncio as redis

        # Fail fast: a check waits half a second at most before the fallback decides.
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5, retry_on_timeout=False
        )
        self._script: Any = self._redis.register_script(SLIDING_WINDOW)
        self._prefix = prefix

    async def hit(self, key: str, rate: Rate) -> Decision:
        window_us = rate.window_s * 1_000_000
        allowed, remaining, reset_us = await self._script(
            keys=[f"{self._prefix}{rate.window_s}:{key}"],
            args=[window_us, rate.count, uuid.uuid4().hex],
        )
        reset_s = int(reset_us) / 1_000_000
        return Decision(
            allowed=bool(allowed),
            limit=rate.count,
            remaining=int(remaining),
            reset_s=reset_s,
            retry_after_s=0.0 if allowed else reset_s,
        )

    async def aclose(self) -> None:
        await self._redis.aclose()


class FailoverLimiter:
    """Redis first; this replica's memory, or a 503, while Redis is unreachable."""

    def __init__(
        self,
        shared: RedisLimiter,
        local: MemoryLimiter,
        *,
        fail_open: bool,
        logger: logging.Logger,
        retry_s: float = 2.0,
    ) -> None:
        self.shared = shared
        self.local = local
        self.fail_open = fail_open
        self.logger = logger
        self.retry_s = retry_s
        self.down_since: float | None = None
        self._next_try = 0.0

    @property
    def healthy(self) -> bool:
        return self.down_since is None

    async def hit(self, key: str, rate: Rate) -> Decision:
        now = time.monotonic()
        if self.down_since is None or now >= self._next_try:
            try:
                decision = await self.shared.hit(key, rate)
            except Exception as exc:  # redis' ConnectionError, TimeoutError, OSError...
                self._went_down(now, exc)
            else:
                if self.down_since is not None:
                    self.logger.warning(
                        "rate-limit store is back",
                        extra={"event": "store_up", "down_s": round(now - self.down_since, 1)},
                    )
                    self.down_since = None
                return decision
        if not self.fail_open:
            raise StoreUnavailable("the shared rate-limit store is unreachable")
        return self.local.check(key, rate)

    def _went_down(self, now: float, exc: Exception) -> None:
        self._next_try = now + self.retry_s
        if self.down_since is None:
            self.down_since = now
            mode = "this replica's memory" if self.fail_open else "503 store_unavailable"
            self.logger.error(
                f"rate-limit store unreachable; limits fall back to {mode}",
                extra={"event": "store_down", "error": type(exc).__name__},
            )

    async def aclose(self) -> None:
        await self.shared.aclose()
