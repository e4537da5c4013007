"""Token limits and budgets: reserved at admission, settled with the real usage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from auth import ApiKey, digest
from config import Rate, Settings
from errors import ApiError
from quotas import Quotas, period_bucket
from server import create_app

pytestmark = pytest.mark.anyio

KEYS = """
[[keys]]
name = "tokens"
key = "tokens-key"
token_limit = "100/minute"

[[keys]]
name = "budget"
key = "budget-key"
budget_usd = 0.0001
"""


def app(tmp_path: Path, delay_s: float = 0.0, fail: bool = False) -> Starlette:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)

    async def provider(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(delay_s)
        if fail:
            return httpx.Response(500)
        return httpx.Response(
            200,
            json={
                "id": "c",
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5},
            },
        )

    settings = Settings(
        provider="openai",
        openai_api_key="sk-x",
        openai_base_url="http://provider.test/v1",
        api_keys_file=path,
        max_retries=0,
    )
    return create_app(settings, transport=httpx.MockTransport(provider))


def client(asgi: Starlette, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://t", headers={"X-API-Key": key}
    )


def tokens_in_window(asgi: Starlette) -> float:
    quotas: Quotas = asgi.state.admission.quotas
    return sum(entry[1] for entry in quotas.windows.get("tokens", ()))


async def test_concurrent_requests_cannot_slip_under_the_token_limit_together(
    tmp_path: Path,
) -> None:
    asgi = app(tmp_path, delay_s=0.2)
    async with client(asgi, "tokens-key") as c:
        answers = await asyncio.gather(
            *(c.post("/complete", json={"prompt": "hello", "max_tokens": 40}) for _ in range(5))
        )
    # each reserves 2 (the prompt) + 40: two fit in 100 while they are in flight
    assert sorted(r.status_code for r in answers) == [200, 200, 429, 429, 429]
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert tokens_in_window(asgi) == 30  # settled with the provider's 10 + 5, twice


async def test_after_settling_the_real_usage_frees_the_rest(tmp_path: Path) -> None:
    asgi = app(tmp_path)
    async with client(asgi, "tokens-key") as c:
        statuses = [
            (await c.post("/complete", json={"prompt": "hi", "max_tokens": 40})).status_code
            for _ in range(5)
        ]
    # each reserves 41 and settles at 15: four fit in 100 (two would, unsettled)
    assert statuses == [200, 200, 200, 200, 429]
    assert tokens_in_window(asgi) == 60


async def test_a_failed_call_gives_its_reservation_back(tmp_path: Path) -> None:
    asgi = app(tmp_path, fail=True)
    async with client(asgi, "tokens-key") as c:
        r = await c.post("/complete", json={"prompt": "hi", "max_tokens": 90})
    assert r.status_code == 502
    assert tokens_in_window(asgi) == 0


async def test_a_key_over_its_budget_gets_429_budget_exceeded_before_any_call(
    tmp_path: Path,
) -> None:
    asgi = app(tmp_path)
    async with client(asgi, "budget-key") as c:
        # worst case of 4096 output tokens at $0.60 a million: over $0.0001
        big = await c.post("/complete", json={"prompt": "hi", "max_tokens": 4096})
        small = [
            (await c.post("/complete", json={"prompt": "hi", "max_tokens": 20})).status_code
            for _ in range(40)
        ]
    assert big.status_code == 429 and big.json()["error"]["type"] == "budget_exceeded"
    assert 1 <= int(big.headers["retry-after"]) <= 86400
    # each call reserves up to 1 x 0.15 + 20 x 0.60 = 12.15e-6 and really costs
    # 10 x 0.15 + 5 x 0.60 = 4.5e-6: admitted while 4.5e-6 n + 12.15e-6 <= 1e-4, so 20
    assert small.count(200) == 20 and set(small[20:]) == {429}


async def test_token_window_slides_and_the_retry_after_is_the_true_wait() -> None:
    now = [1000.0]
    quotas = Quotas(clock=lambda: now[0])
    key = ApiKey(name="k", digest=digest("k"), token_limit=Rate(100, 60))
    (await quotas.reserve(key, 60, 0.0)).settle(60, 0.0)
    now[0] += 30
    (await quotas.reserve(key, 30, 0.0)).settle(30, 0.0)
    with pytest.raises(ApiError) as info:
        await quotas.reserve(key, 50, 0.0)
    assert info.value.headers["Retry-After"] == "30"  # when the first 60 leave
    now[0] += 30
    await quotas.reserve(key, 50, 0.0)


@pytest.mark.parametrize(
    ("when", "bucket", "left"),
    [
        (1795824000.0, "2026-11-28", 86400),  # 2026-11-28 00:00:00 UTC
        (1795910399.0, "2026-11-28", 1),
    ],
)
def test_a_day_budget_resets_at_utc_midnight(when: float, bucket: str, left: float) -> None:
    assert period_bucket("day", when) == (bucket, left)
    month, month_left = period_bucket("month", when)
    assert month == "2026-11" and month_left > 0


def test_keys_file_quota_fields_are_read_and_checked(tmp_path: Path) -> None:
    from auth import KeyRing
    from config import SettingsError

    path = tmp_path / "keys.toml"
    path.write_text(KEYS + 'budget_period = "month"\n')
    ring = KeyRing.from_settings(Settings(api_keys_file=path))
    tokens, budget = ring.lookup("tokens-key"), ring.lookup("budget-key")
    assert tokens is not None and tokens.token_limit == Rate(100, 60)
    assert budget is not None and (budget.budget_usd, budget.budget_period) == (0.0001, "month")
    path.write_text('[[keys]]\nkey = "k"\nbudget_period = "week"\n')
    with pytest.raises(SettingsError, match="budget_period"):
        KeyRing.from_settings(Settings(api_keys_file=path))
    assert Settings.from_env({"TOKEN_LIMIT": "5000/minute"}, None).token_limit == Rate(5000, 60)
