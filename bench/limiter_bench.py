"""Micro-benchmark of the in-memory sliding-window limiter.

    uv run python bench/limiter_bench.py [--redis redis://127.0.0.1:6379/0]

Prints checks per second for one hot key and for 100,000 distinct keys, and the
memory held per tracked key. Figures are per check of `MemoryLimiter.check`, the
synchronous core that the middleware awaits through `hit`.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Rate
from ratelimit import MemoryLimiter


def rate_per_s(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} checks/s ({seconds / n * 1e6:.2f} µs/check)"


def hot_key(n: int = 500_000) -> None:
    limiter = MemoryLimiter()
    rate = Rate(600, 60)  # a full window: every check trims and most are denied
    check = limiter.check
    start = time.perf_counter()
    for _ in range(n):
        check("hot", rate)
    print(f"one hot key, 600/minute:      {rate_per_s(n, time.perf_counter() - start)}")


def distinct_keys(n: int = 100_000) -> None:
    limiter = MemoryLimiter()
    rate = Rate(60, 60)
    keys = [f"key-{i:08x}" for i in range(n)]
    check = limiter.check
    start = time.perf_counter()
    for key in keys:
        check(key, rate)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for key in keys:
        check(key, rate)
    again = time.perf_counter() - start
    print(f"{n:,} distinct keys, first hit: {rate_per_s(n, first)}")
    print(f"{n:,} distinct keys, second:    {rate_per_s(n, again)}")


def bytes_per_key(n: int = 100_000, hits: int = 1) -> None:
    keys = [f"key-{i:08x}" for i in range(n)]  # the key strings are the caller's
    gc.collect()
    tracemalloc.start()
    limiter = MemoryLimiter()
    rate = Rate(60, 60)
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(hits):
        for key in keys:
            limiter.check(key, rate)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"memory per tracked key with {hits} request(s) in its window: {held / n:.0f} bytes")


async def redis_checks(url: str, n: int = 20_000, concurrency: int = 32) -> None:
    """The shared store's cost: one Lua call a check, over loopback."""
    import asyncio
    import logging

    from redis_store import RedisLimiter, SharedStore

    store = SharedStore(url, fail_open=False, logger=logging.getLogger("bench"))
    limiter = RedisLimiter(store, MemoryLimiter())
    rate = Rate(1_000_000_000, 60)
    left = n

    async def worker(i: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await limiter.hit(f"key-{i}", rate)

    await limiter.hit("warm", rate)
    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    seconds = time.perf_counter() - start
    await store.aclose()
    print(f"Redis ({url}), {concurrency} at once: {rate_per_s(n, seconds)}")


if __name__ == "__main__":
    hot_key()
    distinct_keys()
    bytes_per_key(hits=1)
    bytes_per_key(hits=10)
    if len(sys.argv) > 2 and sys.argv[1] == "--redis":
        import uvloop

        uvloop.run(redis_checks(sys.argv[2]))
