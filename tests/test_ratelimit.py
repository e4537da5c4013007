"""The sliding-window limiter against a brute-force model, and its middleware."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from auth import AUTH, ApiKey, digest
from config import Rate
from errors import REQUEST_ID, whole_seconds
from ratelimit import MemoryLimiter, RateLimitMiddleware


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reference(admitted: list[float], now: float, rate: Rate) -> tuple[bool, int, float]:
    """Brute force "at most N in any window of W": (allowed, remaining, retry_after)."""
    in_window = sorted(t for t in admitted if t > now - rate.window_s)
    if len(in_window) < rate.count:
        return True, rate.count - len(in_window) - 1, 0.0
    return False, 0, in_window[0] + rate.window_s - now


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 8),
    window=st.sampled_from([1, 60, 3600]),
    steps=st.lists(
        st.tuples(st.floats(0, 2.0, allow_nan=False), st.sampled_from(["a", "b"])),
        min_size=1,
        max_size=80,
    ),
)
def test_every_decision_matches_the_brute_force_model(
    count: int, window: int, steps: list[tuple[float, str]]
) -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock)
    rate = Rate(count, window)
    admitted: dict[str, list[float]] = {"a": [], "b": []}
    for gap, key in steps:
        clock.now += gap * window  # arrivals from bursts to longer than a window apart
        decision = limiter.check(key, rate)
        allowed, remaining, retry_after = reference(admitted[key], clock.now, rate)
        assert decision.allowed == allowed
        assert decision.remaining == remaining
        assert decision.retry_after_s == pytest.approx(retry_after, abs=1e-9)
        if allowed:
            admitted[key].append(clock.now)
        in_window = [t for t in admitted[key] if t > clock.now - window]
        assert len(in_window) <= count


def test_retry_after_is_the_true_wait_until_a_slot_frees() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock)
    rate = Rate(2, 60)
    assert limiter.check("k", rate).allowed
    clock.now += 10
    assert limiter.check("k", rate).allowed
    clock.now += 5
    denied = limiter.check("k", rate)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(45)
    clock.now += 44.9
    assert not limiter.check("k", rate).allowed
    clock.now += 0.1
    assert limiter.check("k", rate).allowed  # the first request left the window


def test_idle_keys_are_dropped_and_a_flood_of_keys_stays_bounded() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock, max_keys=1000)
    rate = Rate(5, 60)
    for i in range(5000):
        limiter.check(f"flood-{i}", rate)
    assert len(limiter) == 1000
    clock.now += 61
    for i in range(10):
        limiter.check(f"late-{i}", rate)
    assert len(limiter) < 1000  # each check sweeps idle keys off the front
    for _ in range(1000):
        limiter.check("hot", rate)
    assert len(limiter) <= 11


@pytest.mark.parametrize(("seconds", "header"), [(0.01, 1), (1.0, 1), (1.2, 2), (59.5, 60)])
def test_header_seconds_are_whole_rounded_up_and_at_least_one(seconds: float, header: int) -> None:
    assert whole_seconds(seconds) == header


async def call(app: RateLimitMiddleware, key: ApiKey | None) -> tuple[int, dict[str, str], bytes]:
    scope: Scope = {"type": "http", "method": "POST", "path": "/complete", "headers": []}
    scope[REQUEST_ID] = "rid"
    if key is not None:
        scope[AUTH] = key
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body must not be read")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def ok_app() -> tuple[list[int], RateLimitMiddleware]:
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return calls, RateLimitMiddleware(app, limiter=MemoryLimiter(), default_rate=Rate(2, 60))


@pytest.mark.anyio
async def test_middleware_answers_429_before_the_app_or_the_body() -> None:
    calls, app = ok_app()
    key = ApiKey(name="alice", digest=digest("a"))
    first = await call(app, key)
    assert first[0] == 200
    assert (first[1]["ratelimit-limit"], first[1]["ratelimit-remaining"]) == ("2", "1")
    assert first[1]["ratelimit-reset"] == "60"
    await call(app, key)
    status, headers, body = await call(app, key)
    assert status == 429 and len(calls) == 2
    assert headers["retry-after"] == "60" and headers["ratelimit-remaining"] == "0"
    error = json.loads(body)["error"]
    assert error["type"] == "rate_limit_exceeded" and error["request_id"] == "rid"
    assert error["message"] == "2 per 1 minute; retry in 60 s"


@pytest.mark.anyio
async def test_middleware_uses_the_keys_own_rate_and_isolates_keys() -> None:
    calls, app = ok_app()
    generous = ApiKey(name="big", digest=digest("b"), rate_limit=Rate(5, 60))
    statuses = [(await call(app, generous))[0] for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    other = ApiKey(name="small", digest=digest("s"))
    assert [(await call(app, other))[0] for _ in range(3)] == [200, 200, 429]


@pytest.mark.anyio
async def test_requests_without_an_identity_are_not_limited() -> None:
    calls, app = ok_app()
    statuses = [(await call(app, None))[0] for _ in range(5)]
    assert statuses == [200] * 5
