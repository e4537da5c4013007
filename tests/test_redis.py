"""Limits shared through a real redis-server (started here, on a free port of
127.0.0.1) by two real service processes; Redis killed and restarted mid-run."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config import Rate
from ratelimit import MemoryLimiter
from tests.conftest import AUTH_HEADERS, CLIENT_KEY, Process, start_service
from tests.helpers import REDIS, DelayProxy, Redis

pytestmark = [
    pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (.ci/run does it)"),
    pytest.mark.anyio,
    pytest.mark.e2e,
]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


def service(tmp_path: Path, redis: Redis, **env: str) -> Process:
    return start_service(
        tmp_path,
        {
            "API_KEYS": CLIENT_KEY,
            "LLM_PROVIDER": "echo",
            "RATE_LIMIT": "30/minute",
            "RATE_LIMIT_STORE": redis.url,
            **env,
        },
    )


async def test_two_replicas_sharing_redis_admit_exactly_n_of_3n(
    tmp_path: Path, redis: Redis
) -> None:
    one, two = service(tmp_path, redis), service(tmp_path, redis)
    try:
        async with httpx.AsyncClient(
            timeout=30, headers=AUTH_HEADERS, limits=httpx.Limits(max_connections=100)
        ) as c:
            responses = await asyncio.gather(
                *(
                    c.post((one if i % 2 else two).url + "/complete", json={"prompt": "hi"})
                    for i in range(90)
                )
            )
    finally:
        one.stop()
        two.stop()
    assert Counter(r.status_code for r in responses) == {200: 30, 429: 60}
    denied = [r for r in responses if r.status_code == 429]
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in denied)
    assert {r.headers["ratelimit-limit"] for r in responses} == {"30"}


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_500_concurrent_on_two_replicas_admit_exactly_the_shared_limit(
    tmp_path: Path, redis: Redis, fail: str
) -> None:
    # 250 checks in flight on each replica: past its pool, a check waits for a
    # connection; it must neither fall back to the replica's memory nor answer 503.
    env = {"RATE_LIMIT": "50/minute", "RATE_LIMIT_STORE_FAIL": fail}
    one, two = service(tmp_path, redis, **env), service(tmp_path, redis, **env)
    try:
        async with httpx.AsyncClient(
            timeout=60, headers=AUTH_HEADERS, limits=httpx.Limits(max_connections=500)
        ) as c:
            responses = await asyncio.gather(
                *(
                    c.post((one if i % 2 else two).url + "/complete", json={"prompt": "hi"})
                    for i in range(500)
                )
            )
    finally:
        one.stop()
        two.stop()
    assert Counter(r.status_code for r in responses) == {200: 50, 429: 450}
    assert "store_down" not in one.output() + two.output()


async def test_redis_killed_and_restarted_mid_run_keeps_requests_succeeding(
    tmp_path: Path, redis: Redis
) -> None:
    svc = service(tmp_path, redis, RATE_LIMIT="100000/minute")
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:

            async def burst(n: int) -> None:
                for _ in range(n):
                    r = await c.post(svc.url + "/complete", json={"prompt": "hi"})
                    statuses.append(r.status_code)

            await burst(10)
            assert (await c.get(svc.url + "/ready")).json()["rate_limit_store"] == "redis"
            redis.stop()
            await burst(20)
            down = await c.get(svc.url + "/ready")
            metrics = (await c.get(svc.url + "/metrics")).text
            redis.start()
            deadline = time.monotonic() + 10  # back on Redis within 10 s of its return
            while (await c.get(svc.url + "/ready")).json()["rate_limit_store"] != "redis":
                await burst(1)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            await burst(5)
    finally:
        svc.stop()
    assert set(statuses) == {200}
    assert down.status_code == 200 and down.json()["rate_limit_store"] == "redis unreachable"
    assert "text_tool_rate_limit_store_up 0.0" in metrics
    log = [json.loads(x) for x in svc.output().splitlines() if x.startswith("{")]
    assert [x["event"] for x in log if x.get("event") in ("store_down", "store_up")] == [
        "store_down",
        "store_up",
    ]


async def test_with_fail_closed_an_unreachable_store_is_a_503(tmp_path: Path, redis: Redis) -> None:
    svc = service(tmp_path, redis, RATE_LIMIT_STORE_FAIL="closed")
    redis.stop()
    try:
        async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
            refused = await c.post(svc.url + "/complete", json={"prompt": "hi"})
            ready = await c.get(svc.url + "/ready")
    finally:
        svc.stop()
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "store_unavailable"
    assert ready.status_code == 503


async def test_redis_window_slides_like_the_memory_one(redis: Redis) -> None:
    import logging

    from redis_store import RedisLimiter, SharedStore

    store = SharedStore(redis.url, fail_open=False, logger=logging.getLogger("test"))
    shared, local = RedisLimiter(store, MemoryLimiter()), MemoryLimiter()
    rate = Rate(3, 1)
    try:
        decisions = [await shared.hit("k", rate) for _ in range(4)]
        expected = [local.check("k", rate) for _ in range(4)]
        assert [d.allowed for d in decisions] == [d.allowed for d in expected]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert 0 < decisions[-1].retry_after_s <= 1
        await asyncio.sleep(decisions[-1].retry_after_s + 0.05)
        assert (await shared.hit("k", rate)).allowed
    finally:
        await store.aclose()


QUOTA_KEYS = """
[[keys]]
name = "tokens"
key = "tokens-key"
token_limit = "100/minute"

[[keys]]
name = "budget"
key = "budget-key"
budget_usd = 0.000067
"""


def quota_services(tmp_path: Path, redis: Redis, mock: Process) -> tuple[Process, Process]:
    keys = tmp_path / "quota-keys.toml"
    keys.write_text(QUOTA_KEYS)
    env = {
        "API_KEYS_FILE": str(keys),
        "RATE_LIMIT_STORE": redis.url,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": mock.url + "/v1",
        "LLM_MODEL": "gpt-4o-mini",
    }
    return start_service(tmp_path, env), start_service(tmp_path, env)


async def test_token_reservations_hold_across_replicas(
    tmp_path: Path, redis: Redis, mock_provider: Process
) -> None:
    one, two = quota_services(tmp_path, redis, mock_provider)
    slow = 'mock:{"ttft_ms": 400}\nhello'
    try:
        async with httpx.AsyncClient(timeout=15, headers={"X-API-Key": "tokens-key"}) as c:
            answers = await asyncio.gather(
                *(
                    c.post(s.url + "/complete", json={"prompt": slow, "max_tokens": 40})
                    for s in (one, two, one, two, one, two)
                )
            )
            await asyncio.sleep(0.3)  # the settlements are written in the background
            # settled at the real usage (2 in, 1 out): room again for two more
            again = [
                (await c.post(s.url + "/complete", json={"prompt": "hello", "max_tokens": 40}))
                for s in (one, two)
            ]
            usage = (await c.get(two.url + "/usage")).json()
    finally:
        one.stop()
        two.stop()
    # each reserves about 5 + 40 of 100 while in flight: two fit, across both replicas
    assert sorted(r.status_code for r in answers) == [200, 200, 429, 429, 429, 429]
    assert [r.status_code for r in again] == [200, 200]
    assert usage["requests"] == 4  # the shared totals, whichever replica served


async def test_a_budget_is_crossed_once_across_replicas(
    tmp_path: Path, redis: Redis, mock_provider: Process
) -> None:
    one, two = quota_services(tmp_path, redis, mock_provider)
    statuses = []
    try:
        async with httpx.AsyncClient(timeout=15, headers={"X-API-Key": "budget-key"}) as c:
            for i in range(20):
                r = await c.post(
                    (one, two)[i % 2].url + "/complete", json={"prompt": "hello", "max_tokens": 100}
                )
                statuses.append(r.status_code)
                await asyncio.sleep(0.05)  # the settlement is written in the background
            refused = r.json()["error"]
    finally:
        one.stop()
        two.stop()
    # each call reserves 2 x 0.15 + 100 x 0.60 = 60.3e-6 and really costs
    # 1 x 0.15 + 1 x 0.60 = 0.75e-6: admitted while 0.75e-6 n + 60.3e-6 <= 67e-6, so 9,
    # counted together by both replicas
    assert statuses == [200] * 9 + [429] * 11
    assert refused["type"] == "budget_exceeded"


async def test_a_slow_redis_is_waited_for_not_taken_for_dead(tmp_path: Path, redis: Redis) -> None:
    proxy = DelayProxy(redis.port, 0.4)  # 400 ms a packet, each way
    proxy.start()
    # A wait long enough for 100 calls queued on the pool at 800 ms a round trip, on a
    # machine as loaded as CI's: past it the answer is the 503 of a busy store (back-
    # pressure), which is not what this test is about.
    slow = service(tmp_path, redis, RATE_LIMIT="50/minute", RATE_LIMIT_STORE_TIMEOUT_S="30",
                   RATE_LIMIT_STORE=f"redis://127.0.0.1:{proxy.port}/0")  # fmt: skip
    try:
        async with httpx.AsyncClient(
            timeout=60, headers=AUTH_HEADERS, limits=httpx.Limits(max_connections=100)
        ) as c:
            responses = await asyncio.gather(
                *(c.post(slow.url + "/complete", json={"prompt": "hi"}) for _ in range(100))
            )
    finally:
        slow.stop()
        proxy.stop()
    # every check waited for Redis's exact answer: memory would have admitted all 100
    assert Counter(r.status_code for r in responses) == {200: 50, 429: 50}
    assert "store_down" not in slow.output()


async def test_a_redis_that_stops_answering_is_down_after_the_timeout(
    tmp_path: Path, redis: Redis
) -> None:
    import signal

    hung = service(tmp_path, redis, RATE_LIMIT_STORE_TIMEOUT_S="1")
    assert redis.proc is not None
    try:
        async with httpx.AsyncClient(timeout=30, headers=AUTH_HEADERS) as c:
            assert (await c.post(hung.url + "/complete", json={"prompt": "hi"})).status_code == 200
            redis.proc.send_signal(signal.SIGSTOP)  # connected, and silent
            try:
                answers = await asyncio.gather(
                    *(c.post(hung.url + "/complete", json={"prompt": "hi"}) for _ in range(20))
                )
            finally:
                redis.proc.send_signal(signal.SIGCONT)
        assert [a.status_code for a in answers] == [200] * 20  # fail open: this replica's memory
        assert hung.output().count('"event":"store_down"') == 1
    finally:
        hung.stop()
