"""Keys, limits, allowlists and usage through the real service process, with real
concurrency, on the echo provider (no network beyond 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Process, start_service

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

HOT = "hot-key-" + "x" * 24
SLOW = "slow-key-" + "y" * 24
PLAIN = "plain-env-key-" + "z" * 20


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Process]:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f"""
[[keys]]
name = "hot"
key = "sha256:{hashlib.sha256(HOT.encode()).hexdigest()}"

[[keys]]
name = "slow"
key = "sha256:{hashlib.sha256(SLOW.encode()).hexdigest()}"
rate_limit = "3/second"
models = ["echo-b"]
"""
    )
    proc = start_service(
        tmp_path,
        {
            "API_KEYS": PLAIN,
            "API_KEYS_FILE": str(keys),
            "RATE_LIMIT": "60/minute",
            "LLM_PROVIDER": "echo",
            "LLM_MODEL": "echo",
            "LLM_MODELS": "echo,echo-b",
        },
    )
    yield proc
    proc.stop()


async def test_200_concurrent_requests_on_a_limit_of_60_admit_exactly_60(service: Process) -> None:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        responses = await asyncio.gather(
            *(
                c.post(
                    service.url + "/complete", json={"prompt": f"n {i}"}, headers={"X-API-Key": HOT}
                )
                for i in range(200)
            )
        )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 60, 429: 140}
    denied = next(r for r in responses if r.status_code == 429)
    assert denied.json()["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(denied.headers["retry-after"]) <= 60
    assert denied.headers["ratelimit-remaining"] == "0"
    assert all(int(r.headers["ratelimit-limit"]) == 60 for r in responses)
    # another key is not touched by the flood
    async with httpx.AsyncClient(timeout=10) as c:
        other = await c.post(
            service.url + "/complete",
            json={"prompt": "hi"},
            headers={"Authorization": f"Bearer {PLAIN}"},
        )
    assert other.status_code == 200 and other.headers["ratelimit-remaining"] == "59"


async def test_the_window_slides_open_again(service: Process) -> None:
    async with httpx.AsyncClient(timeout=10, headers={"X-API-Key": SLOW}) as c:
        first = [await c.get(service.url + "/usage") for _ in range(3)]
        denied = await c.get(service.url + "/usage")
        assert [r.status_code for r in first] == [200, 200, 200]
        assert denied.status_code == 429 and denied.headers["retry-after"] == "1"
        assert denied.json()["error"]["message"].startswith("3 per 1 second; retry in 1 s")
        started = time.monotonic()
        while (await c.get(service.url + "/usage")).status_code == 429:
            assert time.monotonic() - started < 2.0
            await asyncio.sleep(0.05)
    assert time.monotonic() - started <= 1.1


async def test_the_allowlist_and_llm_models_decide_the_model(service: Process) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        slow = {"X-API-Key": SLOW}
        default = await c.post(service.url + "/complete", json={"prompt": "a"}, headers=slow)
        allowed = await c.post(
            service.url + "/complete", json={"prompt": "a", "model": "echo-b"}, headers=slow
        )
        refused = await c.post(
            service.url + "/complete", json={"prompt": "a", "model": "echo"}, headers=slow
        )
        unknown = await c.post(
            service.url + "/stream",
            json={"prompt": "a", "model": "gpt-4o"},
            headers={"X-API-Key": HOT},
        )
    assert default.status_code == 200 and default.json()["model"] == "echo-b"
    assert allowed.status_code == 200
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "model_not_allowed"
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"


async def test_usage_shows_the_callers_own_totals(service: Process) -> None:
    async with httpx.AsyncClient(timeout=10, headers={"X-API-Key": HOT}) as c:
        await c.post(service.url + "/complete", json={"prompt": "one two three"})
        await c.post(service.url + "/stream", json={"prompt": "four five"})
        await c.post(
            service.url + "/complete", json={"prompt": "six"}, headers={"X-API-Key": PLAIN}
        )
        mine = (await c.get(service.url + "/usage")).json()
    assert mine == {
        "key": "hot",
        "requests": 2,
        "input_tokens": 5,
        "output_tokens": 5,
        "cost_usd": 0.0,
        "by_model": {
            "echo": {"requests": 2, "input_tokens": 5, "output_tokens": 5, "cost_usd": 0.0}
        },
    }


async def test_keys_are_named_in_logs_and_never_logged(service: Process) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        await c.post(service.url + "/complete", json={"prompt": "a"}, headers={"X-API-Key": HOT})
        await c.post(service.url + "/complete", json={"prompt": "a"}, headers={"X-API-Key": PLAIN})
        await c.post(
            service.url + "/complete", json={"prompt": "a"}, headers={"X-API-Key": "wrong-" + HOT}
        )
    service.stop()  # and the shutdown totals are logged
    log = service.output()
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    names = [x["key"] for x in lines if x.get("event") == "access" and x["path"] == "/complete"]
    assert names == ["hot", "key-" + hashlib.sha256(PLAIN.encode()).hexdigest()[:8], None]
    totals = next(x for x in lines if x.get("event") == "usage_totals")
    assert set(totals["keys"]) == {"hot", names[1]}
    for secret in (HOT, PLAIN, SLOW):
        assert secret not in log
