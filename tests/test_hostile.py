"""Hostile peers, for real: a provider process that answers without end, bombs, trickles,
redirects or frames oddly, and clients that send endless heads, forged paths and floods
of 401s. The service's resident memory is read from /proc before and after; a request
made meanwhile must still be answered. Everything on 127.0.0.1, bounded in bytes and
time (the mock stops every hostile answer by itself within a minute)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH_HEADERS, CLIENT_KEY, Process, openai_env, start_service
from tests.helpers import directive, events, stats

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
MB = 1 << 20


def rss(process: Process) -> int:
    """The service's resident memory, in bytes."""
    status = Path(f"/proc/{process.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.fixture
def guarded(tmp_path: Path, mock_provider: Process) -> Iterator[Process]:
    """The service with its default bounds, a 1 s per-read (and per-event) timeout, a 2 s
    deadline for a whole answer and a 1 s head timeout."""
    proc = start_service(
        tmp_path,
        openai_env(
            mock_provider,
            LLM_TIMEOUT_S="1",
            LLM_TOTAL_TIMEOUT_S="2",
            LLM_MAX_RETRIES="0",
            HEADER_TIMEOUT_S="1",
        ),
    )
    yield proc
    proc.stop()


async def post(service: Process, route: str, prompt: str, **body: object) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30, headers=AUTH_HEADERS) as c:
        return await c.post(service.url + route, json={"prompt": prompt, **body})


async def while_hostile(service: Process, route: str, options: dict[str, object]) -> httpx.Response:
    """The hostile call, and beside it a plain one that must be answered (within 5 s)."""
    hostile = asyncio.ensure_future(post(service, route, directive(**options)))
    await asyncio.sleep(0.05)
    async with httpx.AsyncClient(timeout=5, headers=AUTH_HEADERS) as c:
        beside = await c.post(service.url + "/complete", json={"prompt": "still here"})
    assert beside.status_code == 200 and beside.json()["text"] == "still here"
    return await hostile


@pytest.mark.parametrize(
    ("route", "options", "message"),
    [
        ("/complete", {"endless_body": 1000}, "over 16777216 bytes"),
        ("/complete", {"gzip_bomb": 500}, "over 16777216 bytes"),
        ("/stream", {"no_newline": 1000}, "over 16777216 bytes"),
    ],
)
async def test_an_answer_without_end_is_cut_at_the_bound_with_memory_to_spare(
    route: str, options: dict[str, object], message: str, guarded: Process
) -> None:
    before = rss(guarded)
    r = await while_hostile(guarded, route, options)
    grown = rss(guarded) - before
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "upstream_error" and message in r.text
    assert grown < 100 * MB  # was 4.5 GB for the endless body, 1.5 GB for the bomb


async def test_an_answer_that_trickles_in_is_cut_at_the_total_deadline(guarded: Process) -> None:
    started = time.monotonic()
    r = await post(guarded, "/complete", directive(trickle_body_ms=300))
    assert r.status_code == 504 and "within 2 s" in r.json()["error"]["message"]
    assert time.monotonic() - started < 10


async def test_a_stream_that_trickles_bytes_but_no_event_times_out(
    guarded: Process, mock_provider: Process
) -> None:
    started = time.monotonic()
    r = await post(guarded, "/stream", directive(trickle_ms=200))
    got = events(r.text)
    assert r.status_code == 200 and json.loads(got[0][1]) == {"text": "tok"}
    assert got[-1][0] == "error" and json.loads(got[-1][1])["error"]["type"] == "upstream_timeout"
    assert time.monotonic() - started < 10
    assert (await stats(mock_provider))["open"] == 0


async def test_one_huge_read_of_small_events_is_relayed_with_memory_to_spare(
    guarded: Process,
) -> None:
    before = rss(guarded)
    r = await post(guarded, "/stream", directive(tokens=200_000, big_chunk=True), max_tokens=4096)
    grown = rss(guarded) - before
    got = events(r.text)
    assert r.status_code == 200 and got[-1] == ("message", "[DONE]")
    assert json.loads(got[-2][1])["finish_reason"] == "length"  # the mock honours max_tokens
    assert grown < 60 * MB


@pytest.mark.parametrize("status", [301, 307])
@pytest.mark.parametrize("route", ["/complete", "/stream"])
async def test_a_redirect_is_a_502_naming_it_and_is_not_followed(
    route: str, status: int, guarded: Process, mock_provider: Process
) -> None:
    elsewhere = mock_provider.url + "/v1/chat/completions"  # a follow would be seen there
    r = await post(guarded, route, directive(status=status, location=elsewhere))
    assert r.status_code == 502 and f"redirect (HTTP {status})" in r.json()["error"]["message"]
    assert (await stats(mock_provider))["requests"] == 1


async def test_odd_provider_framing_reaches_v1_clients_as_one_json_line_an_event(
    guarded: Process,
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": directive(odd_framing=True)}],
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=30, headers=AUTH_HEADERS) as c:
        r = await c.post(guarded.url + "/v1/chat/completions", json=body)
    got = events(r.text)
    assert "\r" not in r.text and got[-1] == ("message", "[DONE]")
    chunks = [json.loads(data) for _, data in got[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "hello there"


@pytest.mark.parametrize("route", ["/stream", "/v1/chat/completions"])
async def test_a_stream_that_ignores_max_tokens_is_stopped_as_length(
    route: str, guarded: Process, mock_provider: Process
) -> None:
    prompt = directive(endless_tokens=True)
    body: dict[str, object] = {"prompt": prompt, "max_tokens": 16}
    if route != "/stream":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                "stream": True}  # fmt: skip
    async with httpx.AsyncClient(timeout=30, headers=AUTH_HEADERS) as c:
        r = await c.post(guarded.url + route, json=body)
    got = events(r.text)
    assert got[-1] == ("message", "[DONE]")
    finishes = [json.loads(d) for _, d in got[:-1]]
    if route == "/stream":
        assert finishes[-1]["finish_reason"] == "length" and finishes[-1]["output_tokens"] <= 96
    else:
        assert finishes[-1]["choices"][0]["finish_reason"] == "length"
        assert len(finishes) <= 2 * 16 + 64 + 2
    deadline = time.monotonic() + 5
    while (await stats(mock_provider))["open"]:  # the provider's stream was closed
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# --- hostile clients ---------------------------------------------------------------------


def answer(sock: socket.socket) -> bytes:
    raw = b""
    while True:
        try:
            part = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return raw
        if not part:
            return raw
        raw += part


def send(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes: once it has answered, it drops the rest."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_a_head_over_the_bound_is_431_and_an_unfinished_one_is_cut_there(
    guarded: Process,
) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        send(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * MB) + b"\r\n\r\n")
        whole = answer(sock)
    assert whole.startswith(b"HTTP/1.1 431 ") and b'"headers_too_large"' in whole
    before = rss(guarded)
    socks = [socket.create_connection(("127.0.0.1", guarded.port), timeout=10) for _ in range(100)]
    try:
        for sock in socks:
            send(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for sock in socks:  # 4 MB each, never finished: refused once past 64 KB
            send(sock, b"b" * (4 * MB))
        assert all(answer(sock).startswith(b"HTTP/1.1 431 ") for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert rss(guarded) - before < 50 * MB  # was 390 MB


def test_a_head_that_trickles_is_408_after_the_header_timeout(guarded: Process) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        got = answer(sock)
    assert got.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in got
    assert time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        assert answer(sock) == b""  # one that sends nothing is closed, not held


def test_what_uvicorn_refuses_is_answered_in_the_error_shape(guarded: Process) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\x00\r\n\r\n")
        got = answer(sock)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head
    assert json.loads(body)["error"]["type"] == "invalid_http"


async def test_a_flood_of_401s_writes_a_few_short_lines(guarded: Process) -> None:
    async with httpx.AsyncClient(timeout=30, headers={"X-API-Key": "wrong"}) as c:
        for _ in range(200):
            r = await c.get(guarded.url + "/" + "p" * 65_000)
            assert r.status_code == 401
        marker = await c.get(guarded.url + "/health", headers={"x-request-id": "after-flood"})
    assert marker.status_code == 200
    lines = guarded.json_lines(lambda xs: any(x.get("request_id") == "after-flood" for x in xs))
    refused = [x for x in lines if x.get("event") == "access" and x["status"] == 401]
    assert len(refused) == 10  # a burst per address and minute, not one a request
    assert all(len(x["path"]) < 300 and x["path"].endswith("...[64745 more]") for x in refused)
    assert max(len(line) for line in guarded.output().splitlines()) < 2000


async def test_a_text_log_line_cannot_be_forged_from_a_url(
    tmp_path: Path, mock_provider: Process
) -> None:
    service = start_service(tmp_path, openai_env(mock_provider, LOG_FORMAT="text"))
    try:
        async with httpx.AsyncClient(timeout=10, headers=AUTH_HEADERS) as c:
            forged = "/x%0a2026-12-01T00:00:00.000Z%20info%20%20%20%20request%20status=200%1b[2J"
            await c.get(service.url + forged, headers={"x-request-id": "forger"})
        deadline = time.monotonic() + 5
        while "forger" not in service.output():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        service.stop()
    log = service.output()
    assert not any(line.startswith("2026-12-01T00:00:00.000Z") for line in log.splitlines())
    assert "\x1b" not in log
    (line,) = [x for x in log.splitlines() if "forger" in x]
    assert r'path="/x\n2026-12-01T00:00:00.000Z info    request status=200\x1b[2J"' in line


async def test_sighup_does_not_stop_the_service_nor_its_open_streams(
    tmp_path: Path, mock_provider: Process
) -> None:
    service = start_service(tmp_path, openai_env(mock_provider))
    try:
        stream = asyncio.ensure_future(
            post(service, "/stream", directive(tokens=10, token_delay_ms=50))
        )
        deadline = time.monotonic() + 5
        while (await stats(mock_provider))["open"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        service.proc.send_signal(signal.SIGHUP)
        r = await stream
        after = await post(service, "/complete", "still serving")
        assert service.proc.poll() is None
    finally:
        service.stop()
    assert events(r.text)[-1] == ("message", "[DONE]")
    assert after.status_code == 200
    assert '"event":"sighup"' in service.output()


async def test_an_empty_x_api_key_does_not_hide_a_bearer_token(guarded: Process) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(
            guarded.url + "/complete",
            json={"prompt": "hi"},
            headers={"X-API-Key": "", "Authorization": f"Bearer {CLIENT_KEY}"},
        )
    assert r.status_code == 200


def raw_post(port: int, version: bytes, path: bytes, body: bytes) -> tuple[list[bytes], bytes]:
    """A POST over a raw socket, read to the close: the answer's head lines and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        send(sock, b"POST " + path + b" HTTP/" + version + b"\r\nHost: x\r\n"
             b"Content-Type: application/json\r\nX-API-Key: " + CLIENT_KEY.encode() + b"\r\n"
             b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
             + body)  # fmt: skip
        got = answer(sock)
    head, _, rest = got.partition(b"\r\n\r\n")
    return head.lower().split(b"\r\n"), rest


def test_an_http_10_stream_is_delimited_by_the_close_not_chunked(guarded: Process) -> None:
    body = json.dumps({"prompt": "one two three", "model": "gpt-4o-mini"}).encode()
    head, rest = raw_post(guarded.port, b"1.0", b"/stream", body)
    assert head[0].startswith(b"http/1.1 200")
    assert [line for line in head if line.startswith(b"connection:")] == [b"connection: close"]
    assert not any(line.startswith(b"transfer-encoding:") for line in head)
    assert rest.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")
    # HTTP/1.1 keeps chunked encoding, and no Connection header of ours
    head, rest = raw_post(guarded.port, b"1.1", b"/stream", body)
    assert b"transfer-encoding: chunked" in head
    assert [line for line in head if line.startswith(b"connection:")] == [b"connection: close"]
    assert rest.endswith(b"0\r\n\r\n")
    # a whole answer to an HTTP/1.0 client keeps its Content-Length
    head, rest = raw_post(guarded.port, b"1.0", b"/complete", body)
    assert any(line.startswith(b"content-length:") for line in head)
    assert json.loads(rest)["text"] == "one two three"
