"""Provider faults, overload, slow clients and shutdown, injected for real: the mock
provider process fails, stalls, truncates or drops per request, and the service
process is signalled with streams open. Every wait is bounded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    AUTH_HEADERS,
    CLIENT_KEY,
    PROVIDER_KEY,
    Process,
    free_port,
    openai_env,
    start_service,
)
from tests.helpers import directive, events, stats

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def faulty(tmp_path: Path, mock_provider: Process) -> Iterator[Process]:
    """The service with its default retries, a 1 s read timeout and room for 3 calls."""
    proc = start_service(
        tmp_path,
        openai_env(mock_provider, LLM_TIMEOUT_S="1", MAX_INFLIGHT="3", BODY_TIMEOUT_S="1"),
    )
    yield proc
    proc.stop()


async def post(service: Process, route: str, prompt: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15, headers=AUTH_HEADERS) as c:
        return await c.post(service.url + route, json={"prompt": prompt})


@pytest.mark.parametrize("route", ["/complete", "/stream"])
async def test_a_provider_failing_twice_then_answering_is_retried_to_success(
    route: str, faulty: Process, mock_provider: Process
) -> None:
    r = await post(faulty, route, directive(status=503, fail_times=2, id=route))
    assert r.status_code == 200
    assert (await stats(mock_provider))["requests"] == 3


@pytest.mark.parametrize(
    ("options", "status", "type_", "message"),
    [
        ({"status": 500}, 502, "upstream_error", "HTTP 500"),
        ({"status": 529}, 502, "upstream_error", "HTTP 529"),
        ({"status": 401}, 502, "upstream_error", "refused our provider key"),
        ({"status": 400}, 400, "invalid_request", "rejected the request"),
        ({"status": 429, "retry_after": 60}, 429, "rate_limit_exceeded", "rate limiting"),
        ({"garbage": True}, 502, "upstream_error", "sent an answer that is not"),
        ({"hang": True}, 504, "upstream_timeout", "did not answer in time"),
        ({"ttft_ms": 5000}, 504, "upstream_timeout", "did not answer in time"),
    ],
)
@pytest.mark.parametrize("route", ["/complete", "/stream"])
async def test_each_provider_fault_has_a_defined_answer(
    route: str, options: dict[str, object], status: int, type_: str, message: str, faulty: Process
) -> None:
    started = time.monotonic()
    r = await post(faulty, route, directive(**options))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == type_ and message in error["message"]
    assert PROVIDER_KEY not in r.text and "sk-mock" not in r.text
    if status == 429:
        assert r.headers["retry-after"] == "60"
    if status == 504:
        assert time.monotonic() - started < 4  # the 1 s read timeout, not retried


async def test_an_empty_stream_is_a_502_before_any_token(faulty: Process) -> None:
    r = await post(faulty, "/stream", directive(empty=True))
    assert r.status_code == 502 and "ended before" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tokens": 5, "drop_after": 2}, "connection to the provider failed"),
        ({"tokens": 5, "malformed_after": 2}, "not JSON"),
        ({"tokens": 5, "error_after": 2}, "failed mid-stream"),
    ],
)
async def test_a_stream_broken_after_its_first_token_ends_with_an_error_event(
    options: dict[str, object], message: str, faulty: Process
) -> None:
    r = await post(faulty, "/stream", directive(**options))
    assert r.status_code == 200
    got = events(r.text)
    assert [json.loads(d)["text"] for e, d in got[:-1]] == ["tok0 ", "tok1 "]
    event, data = got[-1]
    assert event == "error" and message in json.loads(data)["error"]["message"]
    assert json.loads(data)["error"]["request_id"] == r.headers["x-request-id"]


async def test_sse_lines_split_across_tcp_reads_arrive_intact(faulty: Process) -> None:
    text = "Ünïcödé 🙂 lines\nsplit across reads"
    r = await post(faulty, "/stream", directive(text=text, split=3))
    assert (
        "".join(
            json.loads(d)["text"] for e, d in events(r.text) if e == "message" and d != "[DONE]"
        )
        == text
    )


async def test_a_refused_connection_is_retried_then_a_502(tmp_path: Path) -> None:
    closed = free_port()
    service = start_service(
        tmp_path,
        {
            "API_KEYS": CLIENT_KEY,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{closed}/v1",
        },
    )
    try:
        r = await post(service, "/complete", "hi")
    finally:
        service.stop()
    assert r.status_code == 502 and "could not connect" in r.json()["error"]["message"]
    retries = [x for x in service.output().splitlines() if '"provider_retry"' in x]
    assert len(retries) == 2


async def test_past_max_inflight_requests_are_refused_at_once_with_503(
    faulty: Process, mock_provider: Process
) -> None:
    slow = directive(tokens=10, token_delay_ms=100)
    async with httpx.AsyncClient(timeout=15, headers=AUTH_HEADERS) as c:
        streams = [
            asyncio.ensure_future(c.post(faulty.url + "/stream", json={"prompt": slow}))
            for _ in range(3)
        ]
        deadline = time.monotonic() + 5
        while (await stats(mock_provider))["open"] < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        started = time.monotonic()
        refused = await c.post(faulty.url + "/complete", json={"prompt": "hi"})
        assert time.monotonic() - started < 0.5
        done = await asyncio.gather(*streams)
        after = await c.post(faulty.url + "/complete", json={"prompt": "hi"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    assert [r.status_code for r in done] == [200, 200, 200]
    assert after.status_code == 200


def test_a_client_trickling_its_body_gets_408_and_frees_the_worker(faulty: Process) -> None:
    with socket.create_connection(("127.0.0.1", faulty.port), timeout=10) as sock:
        head = (
            "POST /complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {CLIENT_KEY}\r\nContent-Length: 100\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"prompt": ')
        started = time.monotonic()
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            part = sock.recv(4096)  # headers and body may come in separate segments
            if not part:
                break
            raw += part
        answer = raw.decode()
    assert answer.startswith("HTTP/1.1 408")
    assert '"request_timeout"' in answer
    assert time.monotonic() - started < 3


async def test_sigterm_lets_open_streams_finish_within_the_grace_period(
    tmp_path: Path, mock_provider: Process
) -> None:
    service = start_service(tmp_path, openai_env(mock_provider, SHUTDOWN_GRACE_S="1.5"))

    async def read(prompt: str) -> list[tuple[str, str]]:
        async with (
            httpx.AsyncClient(timeout=15, headers=AUTH_HEADERS) as c,
            c.stream("POST", service.url + "/stream", json={"prompt": prompt}) as r,
        ):
            return events("".join([chunk async for chunk in r.aiter_text()]))

    short = asyncio.ensure_future(read(directive(tokens=8, token_delay_ms=100)))
    long = asyncio.ensure_future(read(directive(tokens=200, token_delay_ms=50)))
    deadline = time.monotonic() + 5
    while (await stats(mock_provider))["open"] < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    service.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    finished, cut = await asyncio.wait_for(asyncio.gather(short, long), timeout=15)
    service.proc.wait(timeout=15)
    exited = time.monotonic() - signalled
    service.stop()
    assert finished[-1] == ("message", "[DONE]")  # finished within the grace period
    assert len([e for e in finished if e[0] == "message"]) == 9
    assert cut[-1][0] == "error"  # cut at its end, and told so
    assert json.loads(cut[-1][1])["error"]["type"] == "not_ready"
    assert exited < 6
    assert "Traceback" not in service.output()
    after = await stats(mock_provider)
    assert after["open"] == 0


async def test_a_dead_provider_falls_back_and_the_answer_names_the_model(
    tmp_path: Path, mock_provider: Process
) -> None:
    dead = free_port()
    service = start_service(
        tmp_path,
        {
            "API_KEYS": CLIENT_KEY,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{dead}/v1",
            "LLM_MAX_RETRIES": "0",
            "LLM_FALLBACK_PROVIDER": "echo",
        },
    )
    try:
        done = await post(service, "/complete", "still answered")
        streamed = await post(service, "/stream", "still streamed")
    finally:
        service.stop()
    assert done.status_code == 200
    assert done.json()["text"] == "still answered" and done.json()["model"] == "echo"
    assert events(streamed.text)[-1] == ("message", "[DONE]")
    assert '"provider_fallback"' in service.output()


async def test_sigterm_drains_first_saying_503_while_it_still_accepts(
    tmp_path: Path, mock_provider: Process
) -> None:
    service = start_service(
        tmp_path, openai_env(mock_provider, SHUTDOWN_DRAIN_S="2", SHUTDOWN_GRACE_S="1.5")
    )
    async with httpx.AsyncClient(timeout=15, headers=AUTH_HEADERS) as c:

        async def read() -> list[tuple[str, str]]:
            prompt = directive(tokens=30, token_delay_ms=50)
            async with c.stream("POST", service.url + "/stream", json={"prompt": prompt}) as r:
                return events("".join([chunk async for chunk in r.aiter_text()]))

        open_stream = asyncio.ensure_future(read())
        deadline = time.monotonic() + 5
        while (await stats(mock_provider))["open"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        service.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (await c.get(service.url + "/ready")).status_code != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503"
            await asyncio.sleep(0.02)
        refused = await c.post(service.url + "/complete", json={"prompt": "hi"})
        alive = await c.get(service.url + "/health")
        assert service.proc.poll() is None  # still accepting, and answering
        streamed = await asyncio.wait_for(open_stream, timeout=15)
    service.proc.wait(timeout=15)
    service.stop()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "not_ready"
    assert alive.status_code == 200
    assert streamed[-1] == ("message", "[DONE]")  # begun before: served to its end
    assert '"event":"draining"' in service.output()
    assert "Traceback" not in service.output()


def test_an_answer_still_awaited_when_uvicorn_gives_up_is_the_contracts_json(
    tmp_path: Path, mock_provider: Process
) -> None:
    service = start_service(tmp_path, openai_env(mock_provider, SHUTDOWN_GRACE_S="0.5"))
    answers: list[httpx.Response] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            httpx.post, service.url + "/complete",
            json={"prompt": directive(ttft_ms=30_000)}, headers=AUTH_HEADERS, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while httpx.get(mock_provider.url + "/_stats", timeout=5).json()["requests"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        service.proc.send_signal(signal.SIGTERM)  # uvicorn waits 0.5 + 5 s, then cancels
        answers.append(waiting.result(timeout=20))
    service.proc.wait(timeout=15)
    service.stop()
    (answer,) = answers
    assert answer.status_code == 503
    assert answer.json()["error"]["type"] == "not_ready"
    assert answer.headers["x-request-id"]
    assert "Traceback" not in service.output()
