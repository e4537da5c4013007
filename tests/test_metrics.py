"""GET /metrics: parses as Prometheus text, moves with traffic, cannot be flooded."""

from __future__ import annotations

import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from config import Rate, Settings
from metrics import Metrics
from server import create_app
from tests.conftest import AUTH_HEADERS, CLIENT_KEY, Process

pytestmark = pytest.mark.anyio


def app(rate: str = "100000/minute") -> Starlette:
    return create_app(
        Settings(api_keys=(CLIENT_KEY,), models=("echo", "echo-2"), rate_limit=Rate.parse(rate))
    )


def client(asgi: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://t", headers=AUTH_HEADERS
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_parse_and_move_when_requests_are_served() -> None:
    async with client(app()) as c:
        before = (await c.get("/metrics")).text
        await c.post("/complete", json={"prompt": "one two three"})
        await c.post("/stream", json={"prompt": "four five", "model": "echo-2"})
        await c.post("/complete", json={"prompt": "x"}, headers={"X-API-Key": "wrong"})
        r = await c.get("/metrics", headers={"X-API-Key": ""})  # public
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    key = "key-" + __import__("hashlib").sha256(CLIENT_KEY.encode()).hexdigest()[:8]
    assert value(after, "text_tool_requests_total", route="/complete", status="200", key=key) == 1
    assert value(before, "text_tool_requests_total", route="/complete", status="200", key=key) == 0
    assert (
        value(after, "text_tool_requests_total", route="/complete", status="401", key="none") == 1
    )
    assert value(after, "text_tool_tokens_total", direction="output", model="echo", key=key) == 3
    assert value(after, "text_tool_tokens_total", direction="input", model="echo-2", key=key) == 2
    assert value(after, "text_tool_request_seconds_count", route="/stream") == 1
    assert value(after, "text_tool_provider_first_token_seconds_count", model="echo-2") == 1
    assert value(after, "text_tool_provider_seconds_count", model="echo") == 1
    assert value(after, "text_tool_in_flight_requests") == 1  # this very request
    assert value(after, "text_tool_open_streams") == 0


async def test_a_flood_of_random_paths_models_and_keys_adds_no_series() -> None:
    async def flood(c: httpx.AsyncClient, noise: str) -> None:
        await c.get(f"/{noise}")
        await c.get(f"/{noise}", headers={"X-API-Key": noise})
        await c.post("/complete", json={"prompt": "x", "model": noise})
        await c.post("/v1/chat/completions", json={"model": noise, "messages": []})
        await c.post("/v1/chat/completions", json={"model": noise, "messages": [{"role": "user"}]})

    async with client(app()) as c:
        await flood(c, "first")
        await c.get("/metrics")
        baseline_keys = samples((await c.get("/metrics")).text)
        baseline = len(baseline_keys)
        for _ in range(50):
            noise = uuid.uuid4().hex
            await flood(c, noise)
        after = samples((await c.get("/metrics")).text)
    assert len(after) == baseline, sorted(set(after) - set(baseline_keys))
    assert not any(noise in str(labels) for _, labels in after)


async def test_429s_are_counted_by_key() -> None:
    asgi = create_app(
        Settings(api_keys=(CLIENT_KEY,), rate_limit=Settings().rate_limit.parse("2/minute"))
    )
    async with client(asgi) as c:
        for _ in range(4):
            await c.get("/usage")
        text = (await c.get("/metrics")).text
    key = "key-" + __import__("hashlib").sha256(CLIENT_KEY.encode()).hexdigest()[:8]
    assert value(text, "text_tool_rate_limited_total", key=key) == 2


@pytest.mark.e2e
async def test_open_streams_and_in_flight_show_a_stream_in_progress(
    openai_service: Process,
) -> None:
    prompt = 'mock:{"tokens": 30, "token_delay_ms": 50}\nhi'
    async with (
        httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c,
        c.stream("POST", openai_service.url + "/stream", json={"prompt": prompt}) as r,
    ):
        await r.aiter_lines().__anext__()
        during = (await c.get(openai_service.url + "/metrics")).text
    assert value(during, "text_tool_open_streams") == 1
    assert value(during, "text_tool_in_flight_requests") == 2


@pytest.mark.e2e
async def test_access_log_lines_carry_the_request_id_ttft_and_no_key(
    openai_service: Process,
) -> None:
    async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
        await c.post(
            openai_service.url + "/stream",
            json={"prompt": "a b c"},
            headers={"X-Request-ID": "ttft-1"},
        )
    line = openai_service.access_lines("ttft-1")["ttft-1"]
    assert line["route"] == "/stream"
    assert line["ttft_ms"] > 0 and line["provider_ms"] >= line["ttft_ms"]
    assert (line["input_tokens"], line["output_tokens"]) == (3, 3)
    assert CLIENT_KEY not in openai_service.output()


def test_log_format_text_is_for_humans() -> None:
    import logging

    from logs import TextFormatter, current_request_id

    record = logging.LogRecord("text_tool", logging.INFO, "", 0, "request", None, None)
    record.event, record.status = "access", 200
    token = current_request_id.set("r-1")
    try:
        line = TextFormatter().format(record)
    finally:
        current_request_id.reset(token)
    assert " info    request request_id=r-1 event=access status=200" in line
    assert not line.startswith("{")


def test_histogram_buckets_count_up_and_a_value_on_a_bound_is_in_it() -> None:
    metrics = Metrics(models=("echo",), keys=())
    for seconds in (0.005, 0.007, 200.0):
        metrics.duration.observe(("/complete",), seconds)
    text = bytes(metrics.response().body).decode()

    def bucket(le: str) -> float:
        return value(text, "text_tool_request_seconds_bucket", route="/complete", le=le)

    assert (bucket("0.005"), bucket("0.01"), bucket("120.0"), bucket("+Inf")) == (1, 2, 2, 3)
    assert value(text, "text_tool_request_seconds_count", route="/complete") == 3
    assert value(text, "text_tool_request_seconds_sum", route="/complete") == pytest.approx(200.012)
    assert value(text, "text_tool_rate_limit_store_up") == 1
    metrics.store_up.set_function(lambda: 0.0)
    assert value(bytes(metrics.response().body).decode(), "text_tool_rate_limit_store_up") == 0


def test_a_dated_snapshot_of_a_model_is_counted_under_the_model() -> None:
    metrics = Metrics(models=("gpt-4o-mini", "claude-haiku-4-5"), keys=())
    call = {"model": "", "input_tokens": 1, "output_tokens": 1}
    for model in ("gpt-4o-mini-2024-07-18", "claude-haiku-4-5-20251001", "gpt-9-2031-01-01"):
        metrics.observe("/complete", 200, None, 0.01, {**call, "model": model})
    text = bytes(metrics.response().body).decode()
    assert 'direction="input",key="none",model="gpt-4o-mini"} 1.0' in text
    assert 'direction="input",key="none",model="claude-haiku-4-5"} 1.0' in text
    assert 'direction="input",key="none",model="other"} 1.0' in text
