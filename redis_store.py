"""Limits, token budgets and usage shared by replicas through Redis
(`RATE_LIMIT_STORE=redis://...`).

The sliding window is decided inside Redis by one Lua script per check (loaded once,
then called by its SHA), on Redis's own clock, so replicas with skewed clocks still
agree and exactly N requests are admitted in any window across all of them.

A key's slots for calls in flight are leases in a sorted set per key, scored by
when they lapse (on Redis's clock): taken by a script that first drops the lapsed,
renewed by the replica that holds them every third of `CONCURRENCY_LEASE_S`, removed
when the call ends. A replica that dies stops renewing, so its slots free themselves.

Token limits and budgets are reserved and settled by two more scripts, and usage is
counted in a hash per key. When Redis cannot be reached the service keeps serving on
this replica's in-memory limiter, quotas and usage (`RATE_LIMIT_STORE_FAIL=open`, the
default) or answers 503 `store_unavailable` (`closed`). It logs the incident once,
shows it in `/ready` and in the metrics, and tries Redis again every `retry_s`, so it
is back on Redis within seconds of its return; what it admitted meanwhile is not
replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from auth import ApiKey
from config import Rate
from quotas import Hold, Quotas, period_bucket
from ratelimit import Decision, Lease, MemoryLimiter, MemorySlots, StoreBusy, StoreUnavailable
from usage import Usage, UsageBook

T = TypeVar("T")
PREFIX = "text-tool:"

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


# Connections to Redis a replica keeps. Redis runs one script at a time, each a few
# tens of microseconds, so more connections add no throughput; a request that finds
# them all in use waits for one (as long as a command may take) instead of opening another.
# What a ledger gives a store found empty: the period's spend by (key, bucket), and the
# last hour's calls as (key, wall-clock time, tokens).
Books = tuple[dict[tuple[str, str], float], list[tuple[str, float, int]]]
# How long the other replicas wait for the one refilling an empty store.
SEED_WAIT_S = 10.0
POOL_SIZE = 64
# A store whose TCP handshake takes longer than this is not there.
CONNECT_S = 2.0


class _Down(Exception):
    """The store did not answer (SharedStore's own signal, never raised out of it)."""


class SharedStore:
    """One Redis for every replica, and what this replica does while it is unreachable:
    its own memory (fail open) or `StoreUnavailable` (fail closed).

    Only a failure to reach Redis counts as Redis being down. A full pool is
    back-pressure: the call waits for a connection, and past `wait_s` it is refused
    with `StoreBusy` (503 overloaded); it never falls back to this replica's memory,
    where every replica would admit the whole limit again."""

    def __init__(
        self,
        url: str,
        *,
        fail_open: bool,
        logger: logging.Logger,
        retry_s: float = 2.0,
        pool_size: int = POOL_SIZE,
        wait_s: float | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        import redis.asyncio as redis
        from redis.exceptions import MaxConnectionsError

        # Slow is not dead. A store that answers, however slowly, is waited for: its
        # answer is exact, and memory would let every replica admit the whole limit
        # again. It is down only when it cannot be connected to (refused, or no
        # handshake within CONNECT_S) or leaves a command unanswered for `timeout_s`.
        self.redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=min(CONNECT_S, timeout_s),
            socket_timeout=timeout_s,
            retry_on_timeout=False,
            max_connections=pool_size,
        )
        self._down_errors: tuple[type[BaseException], ...] = (
            redis.RedisError, OSError, asyncio.TimeoutError
        )  # fmt: skip
        self._full_pool = MaxConnectionsError  # cannot happen past `_slots`; if it did
        self._slots = asyncio.Semaphore(pool_size)
        # A full pool is waited for as long as a command is: on a slow store the
        # connections are busy longer, which is no reason to refuse.
        self.wait_s = timeout_s if wait_s is None else wait_s
        self.fail_open = fail_open
        self.logger = logger
        self.retry_s = retry_s
        self.down_since: float | None = None
        self._next_try = 0.0
        self._probing = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def healthy(self) -> bool:
        return self.down_since is None

    async def call(
        self, shared: Callable[[], Awaitable[T]], local: Callable[[], T], *, wait: bool = False
    ) -> T:
        """`shared()` on a connection of the pool; `local()` (fail open) or
        `StoreUnavailable` (fail closed) while Redis cannot be reached. `wait`: take as
        long as a connection takes to come free (writes nobody waits for)."""
        now = time.monotonic()
        # While it is down, one call at a time finds out whether it is back; the others
        # do not wait on a store that has not answered for seconds.
        if self.down_since is None or (now >= self._next_try and not self._probing):
            probing = self.down_since is not None
            self._probing = self._probing or probing
            try:
                return await self._shared(shared, wait)
            except _Down:
                pass
            finally:
                if probing:
                    self._probing = False
        if not self.fail_open:
            raise StoreUnavailable("the shared rate-limit store is unreachable")
        return local()

    async def _shared(self, shared: Callable[[], Awaitable[T]], wait: bool) -> T:
        await self._take_slot(wait)
        try:
            result = await shared()
        except self._down_errors as exc:
            if isinstance(exc, self._full_pool):
                raise StoreBusy("every connection to the shared store is in use") from None
            self._went_down(time.monotonic(), exc)
            # Connections opened before the failure are dead: do not reuse them.
            with contextlib.suppress(*self._down_errors):
                await self.redis.connection_pool.disconnect()
            raise _Down() from None
        finally:
            self._slots.release()
        self._came_back(time.monotonic())
        return result

    async def _take_slot(self, wait: bool) -> None:
        if not self._slots.locked() or wait:
            await self._slots.acquire()  # at once, while a connection is free
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_s)
        except TimeoutError:
            raise StoreBusy(
                f"every connection to the shared store stayed in use for {self.wait_s:g} s"
            ) from None

    def later(self, shared: Callable[[], Awaitable[object]]) -> None:
        """Run a write that nobody waits for (a settlement, a usage count)."""
        if not self.healthy and time.monotonic() < self._next_try:
            return

        async def run() -> None:
            with contextlib.suppress(StoreUnavailable, *self._down_errors):
                await self.call(shared, lambda: None, wait=True)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _went_down(self, now: float, exc: BaseException) -> None:
        self._next_try = now + self.retry_s
        if self.down_since is None:
            self.down_since = now
            mode = "this replica's memory" if self.fail_open else "503 store_unavailable"
            self.logger.error(
                f"rate-limit store unreachable; limits fall back to {mode}",
                extra={"event": "store_down", "error": type(exc).__name__},
            )

    def _came_back(self, now: float) -> None:
        if self.down_since is not None:
            self.logger.warning(
                "rate-limit store is back",
                extra={"event": "store_up", "down_s": round(now - self.down_since, 1)},
            )
            self.down_since = None

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self.redis.aclose()


class RedisLimiter:
    """The sliding window in Redis, or in this replica's memory while Redis is away."""

    def __init__(self, store: SharedStore, local: MemoryLimiter, *, prefix: str = PREFIX) -> None:
        self.store = store
        self.local = local
        self._script: Any = store.redis.register_script(SLIDING_WINDOW)
        self._prefix = prefix + "ratelimit:"

    async def hit(self, key: str, rate: Rate) -> Decision:
        return await self.store.call(
            lambda: self._shared(key, rate), lambda: self.local.check(key, rate)
        )

    async def _shared(self, key: str, rate: Rate) -> Decision:
        allowed, remaining, reset_us = await self._script(
            keys=[f"{self._prefix}{rate.window_s}:{key}"],
            args=[rate.window_s * 1_000_000, rate.count, uuid.uuid4().hex],
        )
        reset_s = int(reset_us) / 1_000_000
        return Decision(
            allowed=bool(allowed),
            limit=rate.count,
            remaining=int(remaining),
            reset_s=reset_s,
            retry_after_s=0.0 if allowed else reset_s,
        )


# KEYS[1]: the key's leases (member -> when it lapses, ms); ARGV: limit, lease ms, member.
TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
"""

# KEYS[1]: the key's leases; ARGV: lease ms, then the members this replica holds.
# A lease that lapsed meanwhile (Redis was away) is not brought back: XX.
RENEW_SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 1
"""


class RedisSlots:
    """Each key's calls in flight counted in Redis across replicas, as leases this
    replica renews while it holds them; this replica's own memory while Redis is away."""

    def __init__(
        self, store: SharedStore, local: MemorySlots, *, lease_s: float, prefix: str = PREFIX
    ) -> None:
        self.store = store
        self.local = local
        self.lease_ms = max(1000, int(lease_s * 1000))
        self._take: Any = store.redis.register_script(TAKE_SLOT)
        self._renew: Any = store.redis.register_script(RENEW_SLOTS)
        from redis.exceptions import NoScriptError

        self._no_script = NoScriptError
        self._prefix = prefix + "inflight:"
        self.held: dict[str, set[str]] = {}  # Redis key -> the members this replica holds
        self._renewing: asyncio.Task[None] | None = None

    async def take(self, key: str, limit: int) -> Lease | None:
        name, member = self._prefix + key, uuid.uuid4().hex

        async def shared() -> Lease | None:
            if not await self._take(keys=[name], args=[limit, self.lease_ms, member]):
                return None
            self.held.setdefault(name, set()).add(member)
            if self._renewing is None:
                self._renewing = asyncio.ensure_future(self._renew_while_held())
            return RedisLease(self, name, member)

        # While Redis is away: this replica's memory, counting the Redis leases it holds.
        return await self.store.call(
            shared, lambda: self.local.grab(key, limit - len(self.held.get(name, ())))
        )

    def free(self, name: str, member: str) -> None:
        members = self.held.get(name)
        if members is not None:
            members.discard(member)
            if not members:
                del self.held[name]
        script = self.store.redis.zrem
        self.store.later(lambda: script(name, member))

    async def _renew_while_held(self) -> None:
        try:
            while self.held:
                await asyncio.sleep(self.lease_ms / 3000)
                with contextlib.suppress(StoreUnavailable, StoreBusy):
                    await self.store.call(self._renew_all, lambda: None, wait=True)
        finally:
            self._renewing = None

    async def _renew_all(self) -> None:
        """Every lease this replica holds renewed in one round trip, however many keys
        (the script by its SHA: redis-py's own scripts in a pipeline ask first whether
        it is loaded, a second round trip; a Redis that lost it gets it back here)."""
        pipe = self.store.redis.pipeline(transaction=False)
        for name, members in list(self.held.items()):
            pipe.evalsha(self._renew.sha, 1, name, self.lease_ms, *members)
        try:
            await pipe.execute()
        except self._no_script:
            await self.store.redis.script_load(RENEW_SLOTS)  # renewed at the next turn

    async def aclose(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing


class RedisLease:
    __slots__ = ("slots", "name", "member")

    def __init__(self, slots: RedisSlots, name: str, member: str) -> None:
        self.slots: RedisSlots | None = slots
        self.name = name
        self.member = member

    def release(self) -> None:
        if self.slots is not None:
            self.slots.free(self.name, self.member)
            self.slots = None


# KEYS: the key's token times (zset), its token amounts (hash), its spend this period.
# ARGV: window µs (0: no token limit), token limit, tokens, member, budget (-1: none),
# cost, the spend key's lifetime in s. Returns {ok, what refused, wait µs, used}.
RESERVE = """
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  return {0, 'unseeded', '0', '0'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local tokens = tonumber(ARGV[3])
if window > 0 then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
  for _, member in ipairs(expired) do redis.call('HDEL', KEYS[2], member) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local used = 0
  for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(amount) end
  local limit = tonumber(ARGV[2])
  if used + tokens > limit then
    local need, wait = used + tokens - limit, window
    local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      need = need - tonumber(redis.call('HGET', KEYS[2], entries[i]) or '0')
      if need <= 0 then
        wait = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    return {0, 'tokens', tostring(wait), tostring(used)}
  end
end
local budget = tonumber(ARGV[5])
if budget >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + tonumber(ARGV[6]) > budget then
    return {0, 'budget', '0', tostring(spent)}
  end
  redis.call('INCRBYFLOAT', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
if window > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[4], tokens)
  redis.call('PEXPIRE', KEYS[1], math.floor(window / 1000) + 1000)
  redis.call('PEXPIRE', KEYS[2], math.floor(window / 1000) + 1000)
end
return {1, 'ok', '0', '0'}
"""

# KEYS: the token amounts (hash), the spend key. ARGV: member, tokens, cost change.
SETTLE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if tonumber(ARGV[3]) ~= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBYFLOAT', KEYS[2], ARGV[3])
end
return 1
"""


class RedisQuotas:
    """Token limits and budgets in Redis, reserved and settled as in `quotas.Quotas`."""

    def __init__(
        self,
        store: SharedStore,
        local: Quotas,
        *,
        prefix: str = PREFIX,
        books: Callable[[], Awaitable[Books]] | None = None,
    ) -> None:
        self.store = store
        self.local = local
        self.applies = local.applies
        self._reserve: Any = store.redis.register_script(RESERVE)
        self._settle: Any = store.redis.register_script(SETTLE)
        self._prefix = prefix + "quota:"
        # With a ledger: what it says was spent this period and the last hour's tokens,
        # to refill a store found empty (restarted without persistence, or flushed)
        # before it admits anything; a key marks a store so refilled.
        self.books = books
        self._seeded = self._prefix + "seeded"

    async def _seed(self) -> None:
        """Refill the store from the ledger, once among the replicas: the one that takes
        the lock writes it all in one transaction, the others wait for its mark."""
        assert self.books is not None
        redis = self.store.redis
        lock = self._prefix + "seeding"
        if not await redis.set(lock, "1", nx=True, px=int(SEED_WAIT_S * 1000)):
            deadline = time.monotonic() + SEED_WAIT_S
            # another process's mark: nothing to wait on but the store itself
            while not await redis.exists(self._seeded) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            return
        try:
            spent, calls = await self.books()
            now = time.time()
            pipe = redis.pipeline(transaction=True)
            for (name, bucket), cost in spent.items():
                period = "month" if len(bucket) == 7 else "day"  # 2026-12 or 2026-12-03
                left_s = period_bucket(period, now)[1]
                pipe.set(f"{self._prefix}spent:{name}:{bucket}", repr(cost), ex=int(left_s) + 3600)
            for name, at, tokens in calls:
                member = uuid.uuid4().hex
                pipe.zadd(f"{self._prefix}tokens:{name}", {member: int(at * 1_000_000)})
                pipe.hset(f"{self._prefix}amounts:{name}", member, tokens)
                pipe.expire(f"{self._prefix}tokens:{name}", 3601)
                pipe.expire(f"{self._prefix}amounts:{name}", 3601)
            pipe.set(self._seeded, "1")
            await pipe.execute()
            logging.getLogger("text_tool").warning(
                "the shared store was empty: refilled from the ledger",
                extra={"event": "store_refilled", "buckets": len(spent), "calls": len(calls)},
            )
        finally:
            await redis.delete(lock)

    async def reserve(self, key: ApiKey, tokens: int, cost: float) -> Hold:
        async def shared(seeded: bool) -> Hold | tuple[str, float, float] | str:
            rate = key.token_limit or self.local.default_token_limit
            bucket, left_s = period_bucket(key.budget_period, time.time())
            keys = [
                f"{self._prefix}tokens:{key.name}",
                f"{self._prefix}amounts:{key.name}",
                f"{self._prefix}spent:{key.name}:{bucket}",
                self._seeded,
            ]
            member = uuid.uuid4().hex
            ok, what, wait_us, used = await self._reserve(
                keys=keys,
                args=[
                    rate.window_s * 1_000_000 if rate else 0,
                    rate.count if rate else 0,
                    tokens,
                    member,
                    key.budget_usd if key.budget_usd is not None else -1,
                    repr(cost),
                    int(left_s) + 3600,
                    "1" if seeded else "0",
                ],
            )
            if what == b"unseeded":
                return "unseeded"
            if not int(ok):
                wait = int(wait_us) / 1_000_000 if what == b"tokens" else left_s
                return (what.decode(), wait, float(used))
            return RedisReservation(self, keys, member, cost)

        # A store found empty is refilled from the ledger before it admits; should that
        # fail (the refilling replica died), the call is admitted on what the store has.
        seeded = self.books is not None
        result = await self.store.call(lambda: shared(seeded), lambda: None)
        if result == "unseeded":
            await self.store.call(self._seed, lambda: None)
            result = await self.store.call(lambda: shared(seeded), lambda: None)
            if result == "unseeded":
                result = await self.store.call(lambda: shared(False), lambda: None)
        if result is None:  # Redis is away: this replica's own memory decides
            return await self.local.reserve(key, tokens, cost)
        if isinstance(result, tuple):
            what, wait, used = result
            raise self.local.refusal(key, what, tokens, cost, used, wait)
        assert not isinstance(result, str)
        return result


@dataclass(eq=False)
class RedisReservation:
    quotas: RedisQuotas
    keys: list[str]
    member: str
    cost: float
    settled: bool = False

    def settle(self, tokens: int, cost: float | None) -> None:
        if self.settled:
            return
        self.settled = True
        delta = (cost or 0.0) - self.cost
        script, keys, member = self.quotas._settle, self.keys[1:], self.member
        self.quotas.store.later(lambda: script(keys=keys, args=[member, tokens, repr(delta)]))

    def release(self) -> None:
        self.settle(0, 0.0)


class RedisUsage:
    """Each key's usage summed in Redis across replicas; this replica's own in memory
    too (for its shutdown line, and while Redis is away)."""

    def __init__(self, store: SharedStore, local: UsageBook, *, prefix: str = PREFIX) -> None:
        self.store = store
        self.local = local
        self._prefix = prefix + "usage:"

    def record(self, key: str, model: str, usage: Usage, cost: float | None) -> None:
        self.local.record(key, model, usage, cost)
        name = self._prefix + key

        async def shared() -> None:
            pipe = self.store.redis.pipeline(transaction=True)
            for scope in ("", f"{model}|"):
                pipe.hincrby(name, scope + "requests", 1)
                pipe.hincrby(name, scope + "input_tokens", usage.input_tokens)
                pipe.hincrby(name, scope + "output_tokens", usage.output_tokens)
                pipe.hincrbyfloat(name, scope + "cost_usd", cost or 0.0)
            if cost is None:
                pipe.hset(name, f"{model}|unpriced", 1)
            await pipe.execute()

        self.store.later(shared)

    async def report(self, key: str) -> dict[str, Any]:
        async def shared() -> dict[str, Any]:
            raw = await self.store.redis.hgetall(self._prefix + key)
            return usage_report(key, {_text(k): _text(v) for k, v in raw.items()})

        return await self.store.call(shared, lambda: self.local.snapshot(key))

    def all(self) -> dict[str, dict[str, Any]]:
        return self.local.all()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def usage_report(key: str, fields: dict[str, str]) -> dict[str, Any]:
    """`/usage`'s answer from the flat hash: `requests`, `gpt-4o|requests`..."""

    def totals(scope: str) -> dict[str, Any]:
        unpriced = fields.get(scope + "unpriced") == "1"
        return {
            "requests": int(fields.get(scope + "requests", 0)),
            "input_tokens": int(fields.get(scope + "input_tokens", 0)),
            "output_tokens": int(fields.get(scope + "output_tokens", 0)),
            "cost_usd": None if unpriced else round(float(fields.get(scope + "cost_usd", 0)), 10),
        }

    models = sorted({name.split("|")[0] for name in fields if "|" in name})
    return {"key": key, **totals(""), "by_model": {m: totals(m + "|") for m in models}}
