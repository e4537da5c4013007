"""Per-key concurrency, on real processes: at most N calls of a key in flight, in one
replica's memory and across two replicas on one real redis-server; a slot held by a
replica that dies frees itself within its lease."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    AUTH_HEADERS,
    CLIENT_KEY,
    Process,
    openai_env,
    start_mock,
    start_service,
)
from tests.helpers import REDIS, Redis, directive, stats

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SLOW = {"prompt": directive(tokens=60, token_delay_ms=100)}  # a stream of 6 s


@pytest.fixture
def mock(tmp_path: Path) -> Iterator[Process]:
    proc = start_mock(tmp_path)
    yield proc
    proc.stop()


def limited(tmp_path: Path, mock: Process, **extra: str) -> Process:
    env = openai_env(mock, **{"KEY_MAX_CONCURRENT": "8", "RATE_LIMIT": "100000/minute", **extra})
    return start_service(tmp_path, env)


async def stream_all(urls: list[str]) -> list[httpx.Response]:
    """One /stream per URL, all at once, each read to its end."""
    async with httpx.AsyncClient(
        timeout=30, headers=AUTH_HEADERS, limits=httpx.Limits(max_connections=len(urls))
    ) as c:

        async def one(url: str) -> httpx.Response:
            response = await c.post(url + "/stream", json=SLOW)
            assert response.status_code != 200 or response.text.endswith("data: [DONE]\n\n")
            return response

        return list(await asyncio.gather(*(one(url) for url in urls)))


def assert_refusals(responses: list[httpx.Response]) -> None:
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "concurrency_limit_exceeded"


async def test_100_simultaneous_streams_on_a_limit_of_8_run_exactly_8(
    tmp_path: Path, mock: Process
) -> None:
    service = limited(tmp_path, mock)
    try:
        responses = await stream_all([service.url] * 100)
        assert Counter(r.status_code for r in responses) == {200: 8, 429: 92}
        assert_refusals(responses)
        assert (await stats(mock))["peak"] == 8
        # Every slot came back when its stream ended.
        async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
            again = await c.post(service.url + "/complete", json={"prompt": "hi"})
        assert again.status_code == 200
    finally:
        service.stop()


async def test_a_call_past_the_limit_is_refused_before_its_body_is_read(
    tmp_path: Path, mock: Process
) -> None:
    service = limited(tmp_path, mock, KEY_MAX_CONCURRENT="1")
    try:
        async with httpx.AsyncClient(timeout=30, headers=AUTH_HEADERS) as c:
            holder = asyncio.ensure_future(c.post(service.url + "/stream", json=SLOW))
            deadline = time.monotonic() + 10
            while (await stats(mock))["open"] < 1:
                assert time.monotonic() < deadline, "the first stream never opened"
                await asyncio.sleep(0.02)
            # A head that promises a body it never sends: answered at once all the same.
            with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100000\r\n"
                    + f"X-API-Key: {CLIENT_KEY}\r\n\r\n".encode()
                )
                head = read_answer(sock)
            assert head.startswith("HTTP/1.1 429 ")
            assert "retry-after: 1\r\n" in head.lower()
            assert '"code":"concurrency_limit_exceeded"' in head.replace(" ", "")
            assert (await holder).status_code == 200
    finally:
        service.stop()


def read_answer(sock: socket.socket) -> str:
    """One whole HTTP answer (head and body, by its Content-Length) from a socket."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        next(line.split(b":")[1] for line in data.split(b"\r\n")
             if line.lower().startswith(b"content-length:"))
    ):  # fmt: skip
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before the answer was whole"
        data += chunk
    return data.decode()


async def test_a_keys_file_limit_applies_to_its_key_and_the_default_to_the_rest(
    tmp_path: Path, mock: Process
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "batch"\nkey = "batch-key"\nmax_concurrent = 2\n')
    service = limited(tmp_path, mock, KEY_MAX_CONCURRENT="3", API_KEYS_FILE=str(keys))
    try:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as c:

            async def burst(key: str) -> Counter[int]:
                calls = [
                    c.post(service.url + "/stream", json=SLOW, headers={"X-API-Key": key})
                    for _ in range(6)
                ]
                return Counter(r.status_code for r in await asyncio.gather(*calls))

            batch, other = await asyncio.gather(burst("batch-key"), burst(CLIENT_KEY))
        assert batch == {200: 2, 429: 4}
        assert other == {200: 3, 429: 3}
    finally:
        service.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (.ci/run does it)")
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_two_replicas_on_one_redis_run_exactly_8_of_100_streams(
    tmp_path: Path, mock: Process, redis: Redis
) -> None:
    # Leases of 1 s that the streams (6 s) outlive: only renewals keep them.
    env = {"RATE_LIMIT_STORE": redis.url, "CONCURRENCY_LEASE_S": "1"}
    one, two = limited(tmp_path, mock, **env), limited(tmp_path, mock, **env)
    try:
        first = asyncio.ensure_future(stream_all([one.url, two.url] * 50))
        deadline = time.monotonic() + 10
        while (await stats(mock))["open"] < 8:
            assert time.monotonic() < deadline, "the 8 streams never opened"
            await asyncio.sleep(0.02)
        await asyncio.sleep(2.5)  # two and a half leases, while the 8 streams (6 s) run
        late = await stream_all([one.url, two.url] * 5)
        responses = await first
    finally:
        one.stop()
        two.stop()
    assert Counter(r.status_code for r in responses) == {200: 8, 429: 92}
    assert Counter(r.status_code for r in late) == {429: 10}
    assert_refusals(responses + late)
    assert (await stats(mock))["peak"] == 8


async def test_the_slots_of_a_replica_that_dies_free_within_their_lease(
    tmp_path: Path, mock: Process, redis: Redis
) -> None:
    env = {"RATE_LIMIT_STORE": redis.url, "CONCURRENCY_LEASE_S": "1", "KEY_MAX_CONCURRENT": "2"}
    doomed, survivor = limited(tmp_path, mock, **env), limited(tmp_path, mock, **env)
    long_ = {"prompt": directive(tokens=300, token_delay_ms=100)}  # 30 s, cut short below
    try:
        async with httpx.AsyncClient(timeout=30, headers=AUTH_HEADERS) as c:
            held = [
                asyncio.ensure_future(c.post(doomed.url + "/stream", json=long_)) for _ in range(2)
            ]
            deadline = time.monotonic() + 10
            while (await stats(mock))["open"] < 2:
                assert time.monotonic() < deadline, "the streams never opened"
                await asyncio.sleep(0.02)
            refused = await c.post(survivor.url + "/complete", json={"prompt": "hi"})
            assert refused.status_code == 429
            doomed.proc.kill()  # no shutdown, no release: only the lease can end it
            killed_at = time.monotonic()
            while True:
                answer = await c.post(survivor.url + "/complete", json={"prompt": "hi"})
                if answer.status_code == 200:
                    break
                assert answer.status_code == 429
                assert time.monotonic() - killed_at < 10, "the dead replica's slots never freed"
                await asyncio.sleep(0.1)
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
    finally:
        doomed.stop()
        survivor.stop()
    # The survivor's log says nothing of the store going down: Redis never did.
    assert "store_down" not in survivor.output()
    assert json.loads(refused.text)["error"]["type"] == "concurrency_limit_exceeded"
