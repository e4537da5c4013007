"""End to end: the real service process in front of the real mock provider process,
spoken to over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from config import Settings
from tests.conftest import AUTH_HEADERS, CLIENT_KEY, PROVIDER_KEY, ROOT, Process
from upstream import SharedClient

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def directive(**options: object) -> str:
    """A prompt whose first line tells the mock provider how to behave."""
    return "mock:" + json.dumps(options) + "\nhello"


async def stats(mock: Process) -> dict[str, int]:
    async with httpx.AsyncClient() as c:
        data: dict[str, int] = (await c.get(mock.url + "/_stats")).json()
        return data


async def wait_for_stats(mock: Process, timeout_s: float, **expected: int) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        current = await stats(mock)
        if all(current[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return current
        await _sleep(0.02)


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def read_stream(url: str, prompt: str) -> list[tuple[float, str]]:
    """Every SSE line with the time it arrived, relative to the request."""
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c,
        c.stream("POST", url + "/stream", json={"prompt": prompt}) as r,
    ):
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line:
                lines.append((time.monotonic() - start, line))
    return lines


def texts(lines: list[tuple[float, str]]) -> str:
    out = []
    for _, line in lines:
        if line.startswith("data: {"):
            data = json.loads(line[6:])
            if "text" in data:
                out.append(data["text"])
    return "".join(out)


@pytest.mark.parametrize("service", ["openai_service", "anthropic_service"])
async def test_stream_is_incremental_when_the_provider_is_slow(
    service: str, request: pytest.FixtureRequest
) -> None:
    svc: Process = request.getfixturevalue(service)
    lines = await read_stream(svc.url, directive(tokens=6, token_delay_ms=150))
    data_times = [t for t, line in lines if line.startswith('data: {"text"')]
    assert len(data_times) == 6
    assert data_times[-1] - data_times[0] > 0.5  # tokens arrive as they are produced
    assert lines[-1][1] == "data: [DONE]"


@pytest.mark.parametrize("service", ["openai_service", "anthropic_service"])
async def test_text_with_newlines_survives_the_sse_framing(
    service: str, request: pytest.FixtureRequest
) -> None:
    svc: Process = request.getfixturevalue(service)
    text = 'Roses\nare red,\n\n"violets"\r\n\tdata: [DONE]\n\nevent: x'
    lines = await read_stream(svc.url, directive(text=text))
    assert texts(lines) == text
    assert [line for _, line in lines if line.startswith("event:")] == ["event: usage"]


async def test_complete_and_stream_through_anthropic(anthropic_service: Process) -> None:
    async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
        r = await c.post(
            anthropic_service.url + "/complete",
            json={"prompt": "one two three four", "max_tokens": 3, "system": "Be short"},
        )
    assert r.status_code == 200
    body = r.json()
    assert body["text"] == "one two three"
    assert body["finish_reason"] == "length"
    assert (body["input_tokens"], body["output_tokens"]) == (6, 3)
    assert body["cost_usd"] == pytest.approx((6 * 1.0 + 3 * 5.0) / 1e6)
    lines = await read_stream(anthropic_service.url, "alpha beta")
    usage = json.loads(next(line for _, line in lines if line.startswith('data: {"id"'))[6:])
    assert texts(lines) == "alpha beta"
    assert (usage["input_tokens"], usage["output_tokens"], usage["finish_reason"]) == (2, 2, "stop")


async def test_disconnect_mid_stream_closes_the_upstream_stream(
    openai_service: Process, mock_provider: Process
) -> None:
    prompt = directive(tokens=100, token_delay_ms=100)
    async with (
        httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c,
        c.stream("POST", openai_service.url + "/stream", json={"prompt": prompt}) as r,
    ):
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data:")
            if seen == 2:
                break
        assert (await stats(mock_provider))["open"] == 1
    left = time.monotonic()
    after = await wait_for_stats(mock_provider, 2.0, open=0, aborted=1)
    assert after["open"] == 0 and after["aborted"] == 1, after
    assert time.monotonic() - left < 1.0


@pytest.mark.parametrize("route", ["/stream", "/complete"])
async def test_disconnect_while_waiting_for_the_first_token_closes_upstream(
    route: str, openai_service: Process, mock_provider: Process
) -> None:
    prompt = directive(ttft_ms=20_000)
    async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
        import anyio

        with anyio.move_on_after(0.7):
            await c.post(openai_service.url + route, json={"prompt": prompt, "max_tokens": 5})
        assert (await stats(mock_provider))["requests"] == 1
    left = time.monotonic()
    after = await wait_for_stats(mock_provider, 2.0, aborted=1)
    assert after["aborted"] == 1, after
    assert time.monotonic() - left < 1.0
    assert (await stats(mock_provider))["finished"] == 0


async def test_idle_stream_gets_keepalive_pings(openai_service: Process) -> None:
    lines = await read_stream(openai_service.url, directive(tokens=2, token_delay_ms=1000))
    assert [line for _, line in lines if line.startswith(":")][:1] == [": ping"]


async def test_provider_key_reaches_no_response_and_no_log_line(
    openai_service: Process, mock_provider: Process
) -> None:
    bodies: list[str] = []
    async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
        for prompt in (
            "plain",
            directive(status=401),
            directive(status=500),
            directive(status=400),
            directive(garbage=True),
            directive(tokens=3, error_after=1),
        ):
            for route in ("/complete", "/stream"):
                r = await c.post(openai_service.url + route, json={"prompt": prompt})
                bodies.append(str(r.headers) + r.text)
        refused = await c.post(
            openai_service.url + "/complete", json={"prompt": directive(status=401)}
        )
        last = (await c.get(mock_provider.url + "/_last")).json()
    assert last["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"  # the key was used...
    assert refused.status_code == 502
    assert "provider key" in refused.json()["error"]["message"]
    assert "sk-mock" not in refused.text  # ...the provider's message quoting it is not passed on
    for text in bodies:
        assert PROVIDER_KEY not in text
    assert PROVIDER_KEY not in openai_service.output()
    assert CLIENT_KEY not in openai_service.output()
    assert "Traceback" not in openai_service.output()


async def test_a_cookie_the_provider_sets_is_not_sent_on_later_calls(
    mock_provider: Process,
) -> None:
    # By host name: aiohttp's cookie jar ignores cookies from bare IP addresses anyway.
    url = f"http://localhost:{mock_provider.port}/v1/chat/completions"
    shared = SharedClient(Settings())  # the default transport, aiohttp's pool
    try:
        for prompt in (directive(set_cookie="session=caller-one; Path=/"), "hi"):
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            answer = await shared.get().post(url, json=body)
            assert answer.status_code == 200
    finally:
        await shared.aclose()
    async with httpx.AsyncClient(timeout=10) as c:
        last = (await c.get(mock_provider.url + "/_last")).json()
    assert "hi" in json.dumps(last["body"])
    assert "cookie" not in last["headers"]


async def test_request_id_is_forwarded_to_the_provider(
    openai_service: Process, mock_provider: Process
) -> None:
    async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
        r = await c.post(
            openai_service.url + "/complete",
            json={"prompt": "hi"},
            headers={"X-Request-ID": "trace-42"},
        )
        last = (await c.get(mock_provider.url + "/_last")).json()
    assert r.headers["x-request-id"] == "trace-42"
    assert last["headers"]["x-request-id"] == "trace-42"


async def test_access_log_has_one_json_line_per_request(openai_service: Process) -> None:
    async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
        await c.post(
            openai_service.url + "/complete",
            json={"prompt": "a b c"},
            headers={"x-request-id": "log-1"},
        )
        await c.get(openai_service.url + "/nope", headers={"x-request-id": "log-2"})
    access = openai_service.access_lines("log-1", "log-2")
    assert access["log-1"]["status"] == 200
    assert access["log-1"]["model"] == "gpt-4o-mini"
    assert (access["log-1"]["input_tokens"], access["log-1"]["output_tokens"]) == (3, 3)
    assert access["log-2"]["status"] == 404 and access["log-2"]["path"] == "/nope"


def test_a_bad_setting_stops_the_process_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "RATE_LIMIT": "lots", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "server:app", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "RATE_LIMIT" in done.stderr
    assert "Traceback" not in done.stderr
