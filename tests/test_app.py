"""The HTTP contract of the app, in process: routes, validation, the error shape, SSE.

The provider's network is replaced with an httpx.MockTransport passed to create_app.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import chat
import llm
from config import Settings
from deployments import Deployment
from server import create_app
from tests.conftest import CLIENT_KEY, PROVIDER_KEY, ROOT
from tests.helpers import client, openai_answer, openai_app

pytestmark = pytest.mark.anyio


def parse_sse(raw: str) -> list[tuple[str, str]]:
    """(event, data) of each event; comments kept as ('comment', text)."""
    out = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                out.append(("comment", line[1:].strip()))
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append((event, "\n".join(data)))
    return out


async def test_complete_answers_with_text_tokens_and_cost() -> None:
    async with client(openai_app(openai_answer)) as c:
        r = await c.post("/complete", json={"prompt": "Say hi", "max_tokens": 5})
    assert r.status_code == 200
    assert r.json() == {
        "id": "chatcmpl-1",
        "text": "Hi!",
        "model": "gpt-4o-mini",
        "finish_reason": "stop",
        "input_tokens": 1_000_000,
        "output_tokens": 1_000_000,
        # 600k plain at 0.15 + 400k cached at 0.075 + 1M out at 0.60 per million
        "cost_usd": pytest.approx(0.09 + 0.03 + 0.60),
    }


async def test_cost_is_null_when_the_models_price_is_unknown() -> None:
    async with client(openai_app(openai_answer)) as c:
        r = await c.post("/complete", json={"prompt": "Say hi", "model": "my-local-model"})
    assert r.status_code == 200 and r.json()["cost_usd"] is None


async def test_stream_frames_one_json_object_per_data_line_then_usage_and_done() -> None:
    async with client(openai_app(openai_answer)) as c:
        r = await c.post("/stream", json={"prompt": "Say hi"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    events = parse_sse(r.text)
    texts = [json.loads(d)["text"] for e, d in events if e == "message" and d != "[DONE]"]
    assert "".join(texts) == 'Line one\nline "two"\n\nend'
    usage_event, done = events[-2], events[-1]
    assert usage_event[0] == "usage"
    usage = json.loads(usage_event[1])
    assert usage["input_tokens"] == 1000 and usage["output_tokens"] == 2000
    assert usage["finish_reason"] == "stop" and usage["model"] == "gpt-4o-mini"
    assert usage["cost_usd"] == pytest.approx((1000 * 0.15 + 2000 * 0.60) / 1e6)
    assert done == ("message", "[DONE]")


@pytest.mark.parametrize(
    ("provider_status", "status", "type_"),
    [
        (401, 502, "upstream_error"),
        (500, 502, "upstream_error"),
        (429, 429, "rate_limit_exceeded"),
        (400, 400, "invalid_request"),
    ],
)
@pytest.mark.parametrize("route", ["/complete", "/stream"])
async def test_provider_failure_before_first_token_is_an_http_error(
    route: str, provider_status: int, status: int, type_: str
) -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        message = f"Incorrect API key provided: {PROVIDER_KEY}"
        return httpx.Response(
            provider_status, json={"error": {"message": message}}, headers={"retry-after": "3"}
        )

    async with client(openai_app(failing)) as c:
        r = await c.post(route, json={"prompt": "hi"}, headers={"x-request-id": "abc-123"})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"]["type"] == type_
    assert body["error"]["request_id"] == "abc-123" == r.headers["x-request-id"]
    assert PROVIDER_KEY not in r.text
    if status == 429:
        assert r.headers["retry-after"] == "3"


@pytest.mark.parametrize("route", ["/complete", "/stream"])
async def test_provider_timeout_is_a_504(route: str) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with client(openai_app(slow)) as c:
        r = await c.post(route, json={"prompt": "hi"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "upstream_timeout"


async def test_provider_failure_after_first_token_is_an_error_event() -> None:
    def breaks(request: httpx.Request) -> httpx.Response:
        chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
        raw = f"data: {json.dumps(chunk)}\n\n"  # and then the connection ends
        return httpx.Response(200, content=raw.encode())

    async with client(openai_app(breaks)) as c:
        r = await c.post("/stream", json={"prompt": "hi"})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[0] == ("message", '{"text":"Hi"}')
    assert events[-1][0] == "error"
    error = json.loads(events[-1][1])["error"]
    assert error["type"] == "upstream_error"
    assert error["request_id"] == r.headers["x-request-id"]
    assert all(d != "[DONE]" for _, d in events)


@pytest.mark.parametrize(
    ("headers", "content", "status", "type_"),
    [
        ({"content-type": "application/json"}, b"{not json", 400, "invalid_json"),
        ({"content-type": "application/json"}, b'{"prompt": "\xff\xfe"}', 400, "invalid_json"),
        ({"content-type": "application/json"}, b"[" * 5000 + b"]" * 5000, 400, "invalid_json"),
        ({"content-type": "text/plain"}, b'{"prompt": "hi"}', 415, "unsupported_media_type"),
        ({}, b'{"prompt": "hi"}', 415, "unsupported_media_type"),
        ({"content-type": "application/json"}, b"[1, 2]", 422, "invalid_request"),
        ({"content-type": "application/json"}, b"", 400, "invalid_json"),
    ],
)
@pytest.mark.parametrize("route", ["/complete", "/stream"])
async def test_bad_bodies_get_the_contract_error(
    route: str, headers: dict[str, str], content: bytes, status: int, type_: str
) -> None:
    async with client(openai_app(openai_answer)) as c:
        r = await c.post(route, content=content, headers=headers)
    assert r.status_code == status
    assert r.json()["error"]["type"] == type_
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 20001}, "prompt"),
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 4097}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "80"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature"),
        ({"prompt": "hi", "stream": True}, "stream"),
        ({"prompt": "hi", "system": ["a"]}, "system"),
    ],
)
async def test_schema_violations_are_422_with_the_field(
    body: dict[str, object], field: str
) -> None:
    async with client(openai_app(openai_answer)) as c:
        r = await c.post("/complete", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["type"] == "invalid_request"
    assert [e["field"] for e in error["errors"]] == [field]
    assert error["errors"][0]["message"]


async def test_json_that_no_parser_takes_is_a_400_that_says_what_is_wrong() -> None:
    body = b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
    async with client(openai_app(openai_answer)) as c:
        r = await c.post("/complete", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"
    assert "number out of range at line 1 column" in r.json()["error"]["message"]


async def test_a_400_for_thousands_of_bad_items_stays_small() -> None:
    body = {"messages": [{"role": "nobody", "content": 1}] * 20_000}
    async with client(openai_app(openai_answer)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and len(r.content) < 10_000  # was 4 MB
    assert len(error["errors"]) == 20 and error["message"].endswith("; and 59995 more")


async def test_edge_inputs_pass_through_intact() -> None:
    seen: list[dict[str, object]] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return openai_answer(request)

    prompt = "x" * 19_990 + "🙂 \u0000 שלום"
    async with client(openai_app(record)) as c:
        r = await c.post("/complete", json={"prompt": prompt, "temperature": 2, "max_tokens": 4096})
    assert r.status_code == 200
    assert seen[0]["messages"] == [{"role": "user", "content": prompt}]
    assert seen[0]["temperature"] == 2.0


async def test_body_over_the_limit_is_413_by_content_length() -> None:
    async with client(openai_app(openai_answer, max_body_bytes=100)) as c:
        r = await c.post("/complete", json={"prompt": "x" * 200})
    assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"


async def test_body_over_the_limit_is_413_while_streaming_in_without_length() -> None:
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 64

    async with client(openai_app(openai_answer, max_body_bytes=1000)) as c:
        r = await c.post(
            "/complete", content=chunks(), headers={"content-type": "application/json"}
        )
    assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"
    assert "content-length" not in r.request.headers
    assert len(sent) < 1000  # refused before all of it was read


async def test_a_model_outside_llm_models_is_a_404_as_the_providers_answer() -> None:
    async with client(openai_app(openai_answer)) as c:
        ours = await c.post("/complete", json={"prompt": "hi", "model": "gpt-4o"})
        openai = await c.post("/v1/chat/completions", json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        anthropic = await c.post("/v1/messages", json={
            "model": "gpt-4o", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert ours.status_code == 404 and ours.json()["error"]["type"] == "model_not_found"
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"
    assert openai.json()["error"]["param"] == "model"
    assert anthropic.status_code == 404
    assert anthropic.json()["error"]["type"] == "not_found_error"


async def test_an_anthropic_client_gets_anthropics_error_shape_on_the_models_routes() -> None:
    app = openai_app(openai_answer)
    anthropic = {"anthropic-version": "2023-06-01"}
    async with client(app) as c:
        missing = await c.get("/v1/models/nope", headers=anthropic)
        listed = await c.get("/v1/models", headers=anthropic)
        openai_missing = await c.get("/v1/models/nope")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as anonymous:
        unknown_key = await anonymous.get("/v1/models", headers=anthropic)
        messages = await anonymous.post("/v1/messages", json={}, headers=anthropic)
    for answer, kind in ((missing, "not_found_error"), (unknown_key, "authentication_error"),
                         (messages, "authentication_error")):  # fmt: skip
        body = answer.json()
        assert body["type"] == "error" and body["error"]["type"] == kind, body
        assert body["request_id"] == answer.headers["x-request-id"]
    assert listed.json()["data"][0]["type"] == "model"
    assert openai_missing.json()["error"]["code"] == "model_not_found"


async def test_unknown_route_and_wrong_method_answer_in_the_error_shape() -> None:
    async with client(openai_app(openai_answer)) as c:
        missing = await c.get("/nope")
        wrong = await c.get("/complete")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]


async def test_an_unexpected_exception_is_a_500_in_the_error_shape() -> None:
    class Broken(llm.Provider):
        name = "broken"

        async def complete(self, request: chat.Request) -> chat.Completion:
            raise RuntimeError("a bug, with a secret " + PROVIDER_KEY)

    app = openai_app(openai_answer)
    app.state.deployments.all = [Deployment("broken", Broken(), {"*": ""})]
    async with client(app) as c:
        r = await c.post("/complete", json={"prompt": "hi"})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text and PROVIDER_KEY not in r.text


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("abc-123_x.y", True), ("a" * 128, True), ("a" * 129, False), ("bad id", False), ("", False)],
)
async def test_request_id_is_kept_only_when_sane(sent: str, kept: bool) -> None:
    async with client(openai_app(openai_answer)) as c:
        r = await c.get("/health", headers={"x-request-id": sent})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert (r.headers["x-request-id"] == sent) is kept
    assert r.headers["x-request-id"]


async def test_health_and_ready() -> None:
    async with client(openai_app(openai_answer)) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        assert (await c.get("/ready")).status_code == 200


async def test_mounted_under_a_parent_app_it_serves_with_no_lifespan() -> None:
    parent = Starlette(routes=[Mount("/llm", app=openai_app(openai_answer))])
    async with client(parent) as c:  # ASGITransport runs no lifespan at all
        health = await c.get("/llm/health")
        done = await c.post("/llm/complete", json={"prompt": "hi"})
        streamed = await c.post("/llm/stream", json={"prompt": "hi"})
        missing = await c.get("/llm/nope")
    assert health.json() == {"status": "ok"}
    assert done.status_code == 200 and done.json()["text"] == "Hi!"
    assert parse_sse(streamed.text)[-1] == ("message", "[DONE]")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


async def test_echo_is_the_provider_when_no_key_is_set() -> None:
    settings = Settings.from_env(environ={"API_KEYS": CLIENT_KEY}, env_file=None)
    assert settings.provider == "echo" and settings.provider_was_defaulted
    async with client(create_app(settings)) as c:
        r = await c.post("/complete", json={"prompt": "one two three"})
    assert r.json()["text"] == "one two three" and r.json()["cost_usd"] == 0.0


async def test_a_stream_cut_short_still_counts_what_was_sent() -> None:
    def breaks(request: httpx.Request) -> httpx.Response:
        chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
        return httpx.Response(200, content=f"data: {json.dumps(chunk)}\n\n".encode())

    async with client(openai_app(breaks)) as c:
        await c.post("/stream", json={"prompt": "one two three four five six seven eight"})
        report = (await c.get("/usage")).json()
    assert (report["requests"], report["output_tokens"]) == (1, 1)
    assert report["input_tokens"] == 10  # 39 characters, about four a token


async def test_v1_stream_with_null_stream_options_relays_the_chunks() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": None}
    async with client(openai_app(openai_answer)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert parse_sse(r.text)[-1] == ("message", "[DONE]")


async def test_v1_passthrough_reframes_multiline_and_bare_cr_events_as_one_data_line() -> None:
    def odd_framing(request: httpx.Request) -> httpx.Response:
        raw = (
            'data: {"id": "c1", "model": "m",\ndata: "choices": [{"index": 0,\r'
            '"delta": {"content": "Hi"}}]}\n\n'
            'data: {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {},\r'
            '"finish_reason": "stop"}]}\n\n'
            "data: [DONE]\n\n"
        )
        return httpx.Response(
            200, content=raw.encode(), headers={"content-type": "text/event-stream"}
        )

    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client(openai_app(odd_framing)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    events = parse_sse(r.text)
    assert "\r" not in r.text
    chunks = [json.loads(data) for _, data in events[:-1]]  # each one line of valid JSON
    assert chunks[0]["choices"][0]["delta"] == {"content": "Hi"}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == ("message", "[DONE]")


async def test_ready_turns_503_while_the_server_drains() -> None:
    from sse_starlette.sse import AppStatus

    async with client(openai_app(openai_answer)) as c:
        AppStatus.should_exit = True  # what uvicorn's SIGTERM handler sets, via sse-starlette
        try:
            draining = await c.get("/ready")
        finally:
            AppStatus.should_exit = False
        back = await c.get("/ready")
    assert draining.status_code == 503 and draining.json()["error"]["type"] == "not_ready"
    assert back.status_code == 200


def test_the_start_log_says_why_the_provider_is_echo(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="text_tool"):
        create_app(Settings.from_env(environ={"API_KEYS": CLIENT_KEY}, env_file=None))
        create_app(Settings(provider="echo", api_keys=(CLIENT_KEY,)))
    starts = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "start"]
    assert starts[0].startswith("no provider key is set, so the provider is echo")
    assert starts[1].startswith("LLM_PROVIDER=echo, so the provider is echo")


async def test_only_the_app_served_as_server_app_tunes_the_process() -> None:
    import gc
    import logging

    import server

    before = gc.get_threshold()
    embedded = create_app(Settings())
    async with embedded.router.lifespan_context(embedded):
        assert gc.get_threshold() == before  # a host app's process is left alone
    try:
        async with server.app.router.lifespan_context(server.app):
            assert gc.get_threshold() == (20_000, 50, 50)
            assert gc.get_freeze_count() > 0
            assert logging.logThreads is False
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = True


@pytest.mark.e2e
def test_importing_server_for_create_app_changes_nothing_in_the_host() -> None:
    code = (
        "import logging, server\n"
        "assert server._served is None\n"
        "assert not logging.getLogger('uvicorn.access').disabled\n"
        "assert not logging.getLogger('text_tool').handlers\n"
        "server.create_app\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no start line: no app was made


def endless_openai(request: httpx.Request) -> httpx.Response:
    """A provider that streams on whatever max_tokens says (5,000 chunks, no end)."""
    chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "x"}}]}
    raw = "".join(f"data: {json.dumps(chunk)}\n\n" for _ in range(5000))
    return httpx.Response(200, content=raw.encode(), headers={"content-type": "text/event-stream"})


def endless_anthropic(request: httpx.Request) -> httpx.Response:
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {}}}
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "y"},
    }
    raw = f"event: message_start\ndata: {json.dumps(start)}\n\n" + "".join(
        f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n" for _ in range(5000)
    )
    return httpx.Response(200, content=raw.encode(), headers={"content-type": "text/event-stream"})


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_stream_past_its_max_tokens_ends_as_length(kind: str) -> None:
    if kind == "openai":
        app = openai_app(endless_openai)
    else:
        app = create_app(
            Settings(provider="anthropic", anthropic_api_key=PROVIDER_KEY, api_keys=(CLIENT_KEY,)),
            transport=httpx.MockTransport(endless_anthropic),
        )
    async with client(app) as c:
        r = await c.post("/stream", json={"prompt": "go on", "max_tokens": 10})
        report = (await c.get("/usage")).json()
    events = parse_sse(r.text)
    texts = [json.loads(d)["text"] for e, d in events if e == "message" and d != "[DONE]"]
    usage = json.loads(next(d for e, d in events if e == "usage"))
    assert len(texts) == 2 * 10 + 64  # the cap, not the 5,000 sent
    assert usage["finish_reason"] == "length" and usage["output_tokens"] == len(texts)
    assert report["output_tokens"] == len(texts)


async def test_a_passed_through_stream_past_its_max_tokens_ends_with_a_length_chunk() -> None:
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 10, "stream": True}
    async with client(openai_app(endless_openai)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    events = parse_sse(r.text)
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert events[-1] == ("message", "[DONE]")
    assert len(chunks) == 2 * 10 + 64 + 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
