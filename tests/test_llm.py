"""Unit tests of the providers in llm.py, with the provider APIs mocked by respx."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import aiohttp
import httpx
import pytest
import respx
from httpx_aiohttp import AiohttpTransport

import chat
import llm
import upstream
from config import Settings, SettingsError
from deployments import Deployments, make_deployments
from dialects import anthropic_messages, openai_chat
from tests.conftest import PROVIDER_KEY
from upstream import SharedClient
from usage import Usage

pytestmark = pytest.mark.anyio

OPENAI = "https://api.openai.com/v1/chat/completions"
ANTHROPIC = "https://api.anthropic.com/v1/messages"


def sse(*frames: object, events: list[str] | None = None) -> bytes:
    out = []
    for i, frame in enumerate(frames):
        head = f"event: {events[i]}\n" if events else ""
        data = frame if isinstance(frame, str) else json.dumps(frame)
        out.append(f"{head}data: {data}\n\n")
    return "".join(out).encode()


def openai_chunk(content: str | None = None, finish: str | None = None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 2,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 4},
    },
}


def mocked(settings: Settings) -> SharedClient:
    """The production client, its network replaced by respx's routes (no patching)."""
    return SharedClient(settings, httpx.MockTransport(respx.mock.async_handler))


CODECS: dict[str, llm.Codec] = {"openai": openai_chat, "anthropic": anthropic_messages}


def deployments(settings: Settings) -> Deployments:
    return make_deployments(settings, mocked(settings), CODECS)


def provider(kind: str, retries: int = 0, **changes: object) -> llm.Provider:
    settings = (
        Settings(provider="openai", openai_api_key=PROVIDER_KEY, max_retries=retries)
        if kind == "openai"
        else Settings(provider="anthropic", anthropic_api_key=PROVIDER_KEY, max_retries=retries)
    ).replace(**changes)
    return deployments(settings).all[0].provider


def quick_retries(kind: str = "openai", **policy: float) -> llm.HttpProvider:
    settings = Settings(provider="openai", openai_api_key=PROVIDER_KEY)
    retry = llm.RetryPolicy(**{"retries": 2, "base_s": 0.001, **policy})  # type: ignore[arg-type]
    codec = CODECS[kind]
    base = "https://api.openai.com/v1" if kind == "openai" else "https://api.anthropic.com"
    return llm.HttpProvider(
        mocked(settings), name=kind, codec=codec, url=base + codec.PATH,
        headers=codec.auth_headers(PROVIDER_KEY), secret=PROVIDER_KEY, retry=retry,
    )  # fmt: skip


def request(
    text: str = "Say hi", system: str | None = "Be brief.", **changes: object
) -> chat.Request:
    settings: dict[str, object] = {
        "model": "gpt-4o-mini", "max_tokens": 20, "temperature": 0.5, "request_id": "req-1",
        **changes,
    }  # fmt: skip
    return chat.user_text(text, system=system, **settings)  # type: ignore[arg-type]


@dataclass
class Ended:
    """What a stream said of itself: its start's id and model, and its end."""

    id: str
    model: str
    finish_reason: str
    usage: Usage


async def collect(events: AsyncIterator[chat.Event]) -> tuple[list[str], Ended]:
    texts: list[str] = []
    start = chat.Start("", "")
    async for event in events:
        if isinstance(event, chat.Start):
            start = event
        elif isinstance(event, chat.TextDelta):
            texts.append(event.text)
        elif isinstance(event, chat.End):
            return texts, Ended(start.id, start.model, event.finish_reason, event.usage)
    raise AssertionError("the stream ended without its End")


@respx.mock
async def test_openai_complete_sends_the_chat_body_and_reads_usage() -> None:
    route = respx.post(OPENAI).respond(
        200,
        json={
            "id": "chatcmpl-9",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi!"},
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 3,
                "total_tokens": 13,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        },
    )
    result = await provider("openai").complete(request())
    sent = route.calls.last.request
    assert json.loads(sent.content) == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
        ],
        "max_tokens": 20,
        "temperature": 0.5,
    }
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent.headers["x-request-id"] == "req-1"
    assert result == chat.Completion(
        id="chatcmpl-9",
        model="gpt-4o-mini-2024-07-18",
        parts=(chat.Text("Hi!"),),
        finish_reason="length",
        usage=Usage(input_tokens=10, output_tokens=3, cached_input_tokens=8),
        native="length",
    )


@respx.mock
async def test_openai_stream_asks_for_usage_and_yields_text_then_the_end() -> None:
    route = respx.post(OPENAI).respond(
        200,
        content=sse(
            openai_chunk(""),
            openai_chunk("Hel"),
            openai_chunk("lo\nthere"),
            openai_chunk(finish="stop"),
            USAGE_CHUNK,
            "[DONE]",
        ),
        headers={"content-type": "text/event-stream"},
    )
    texts, end = await collect(provider("openai").stream(request()))
    body = json.loads(route.calls.last.request.content)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert texts == ["Hel", "lo\nthere"]
    assert end.finish_reason == "stop"
    assert end.model == "gpt-4o-mini-2024-07-18"
    assert end.usage == Usage(input_tokens=12, output_tokens=2, cached_input_tokens=4)


@respx.mock
async def test_openai_stream_without_usage_estimates_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    respx.post(OPENAI).respond(
        200,
        content=sse(openai_chunk("a"), openai_chunk("b"), openai_chunk("c", "stop"), "[DONE]"),
    )
    with caplog.at_level(logging.WARNING, logger="text_tool"):
        texts, end = await collect(provider("openai").stream(request()))
    assert texts == ["a", "b", "c"]
    assert end.usage.output_tokens == 3 and end.usage.estimated
    assert end.usage.input_tokens > 0
    assert any(getattr(r, "event", None) == "usage_estimated" for r in caplog.records)


@respx.mock
async def test_openai_stream_cut_before_the_end_is_an_error() -> None:
    respx.post(OPENAI).respond(200, content=sse(openai_chunk("a"), openai_chunk("b")))
    with pytest.raises(llm.ProviderError, match="ended before"):
        await collect(provider("openai").stream(request()))


@respx.mock
async def test_openai_error_event_mid_stream_is_an_error() -> None:
    respx.post(OPENAI).respond(
        200, content=sse(openai_chunk("a"), {"error": {"message": "boom", "type": "server_error"}})
    )
    with pytest.raises(llm.ProviderError, match="boom"):
        await collect(provider("openai").stream(request()))


@respx.mock
async def test_sse_lines_split_across_reads_are_joined() -> None:
    raw = sse(openai_chunk("one"), openai_chunk("two", "stop"), USAGE_CHUNK, "[DONE]")

    async def dribble() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    respx.post(OPENAI).respond(200, content=dribble())
    texts, end = await collect(provider("openai").stream(request()))
    assert texts == ["one", "two"] and end.usage.input_tokens == 12


@pytest.mark.parametrize(
    ("status", "error", "match"),
    [
        (401, llm.ProviderRejected, "refused our provider key"),
        (403, llm.ProviderRejected, "refused our provider key"),
        (429, llm.ProviderRateLimited, "rate limiting"),
        (500, llm.ProviderUnavailable, "HTTP 500"),
        (503, llm.ProviderUnavailable, "HTTP 503"),
        (400, llm.ProviderBadRequest, "maximum context length"),
    ],
)
@respx.mock
async def test_openai_status_errors_map_to_provider_errors(
    status: int, error: type[Exception], match: str
) -> None:
    message = "This model's maximum context length is 128000 tokens"
    if status == 401:
        message = f"Incorrect API key provided: {PROVIDER_KEY}"
    respx.post(OPENAI).respond(
        status,
        json={"error": {"message": message, "type": "x", "code": None}},
        headers={"retry-after": "7"},
    )
    for call in (
        provider("openai").complete(request()),
        collect(provider("openai").stream(request())),
    ):
        with pytest.raises(error, match=match) as info:
            await call
        assert PROVIDER_KEY not in str(info.value)
        if status == 429:
            assert info.value.retry_after_s == 7  # type: ignore[attr-defined]


@respx.mock
async def test_a_provider_message_quoting_our_key_is_redacted() -> None:
    respx.post(OPENAI).respond(
        400, json={"error": {"message": f"bad key {PROVIDER_KEY} in prompt", "type": "x"}}
    )
    with pytest.raises(llm.ProviderBadRequest) as info:
        await provider("openai").complete(request())
    assert PROVIDER_KEY not in str(info.value) and "[redacted]" in str(info.value)


@pytest.mark.parametrize(
    ("side_effect", "error"),
    [
        (httpx.ReadTimeout("slow"), llm.ProviderTimeout),
        (httpx.ConnectError("refused"), llm.ProviderUnavailable),
        (httpx.ConnectTimeout("slow connect"), llm.ProviderUnavailable),
        (httpx.RemoteProtocolError("peer closed"), llm.ProviderUnavailable),
    ],
)
@respx.mock
async def test_transport_failures_map_to_provider_errors(
    side_effect: Exception, error: type[Exception]
) -> None:
    respx.post(OPENAI).mock(side_effect=side_effect)
    respx.post(ANTHROPIC).mock(side_effect=side_effect)
    for kind in ("openai", "anthropic"):
        with pytest.raises(error):
            await provider(kind).complete(request())
        with pytest.raises(error):
            await collect(provider(kind).stream(request()))


@respx.mock
async def test_an_answer_that_is_not_json_is_a_provider_error() -> None:
    respx.post(OPENAI).respond(200, content=b"<html>oops</html>")
    with pytest.raises(llm.ProviderError, match="not JSON"):
        await provider("openai").complete(request())


@respx.mock
async def test_anthropic_complete_sends_messages_body_and_counts_cache_tokens() -> None:
    route = respx.post(ANTHROPIC).respond(
        200,
        json={
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5-20251001",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " you"}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 5,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 200,
                "output_tokens": 2,
            },
        },
    )
    result = await provider("anthropic").complete(request(model="claude-haiku-4-5"))
    sent = route.calls.last.request
    assert json.loads(sent.content) == {
        "model": "claude-haiku-4-5",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "Say hi"}],
        "temperature": 0.5,
        "system": "Be brief.",
    }
    assert sent.headers["x-api-key"] == PROVIDER_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert result.text == "Hello you"
    assert result.finish_reason == "length"
    assert result.usage == Usage(
        input_tokens=305, output_tokens=2, cached_input_tokens=200, cache_write_tokens=100
    )


ANTHROPIC_STREAM = [
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_2",
                "type": "message",
                "role": "assistant",
                "model": "claude-haiku-4-5-20251001",
                "content": [],
                "stop_reason": None,
                "usage": {"input_tokens": 9, "cache_read_input_tokens": 3, "output_tokens": 1},
            },
        },
    ),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!\n"}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 4},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


@respx.mock
async def test_anthropic_stream_reads_the_event_sequence() -> None:
    route = respx.post(ANTHROPIC).respond(
        200,
        content=sse(*[f for _, f in ANTHROPIC_STREAM], events=[e for e, _ in ANTHROPIC_STREAM]),
    )
    texts, end = await collect(provider("anthropic").stream(request(model="claude-haiku-4-5")))
    assert json.loads(route.calls.last.request.content)["stream"] is True
    assert texts == ["Hi", "!\n"]
    assert end == Ended(
        id="msg_2",
        model="claude-haiku-4-5-20251001",
        finish_reason="stop",
        usage=Usage(input_tokens=12, output_tokens=4, cached_input_tokens=3),
    )


@respx.mock
async def test_anthropic_error_event_mid_stream_is_unavailable() -> None:
    frames = ANTHROPIC_STREAM[:4] + [
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    ]
    respx.post(ANTHROPIC).respond(
        200, content=sse(*[f for _, f in frames], events=[e for e, _ in frames])
    )
    with pytest.raises(llm.ProviderUnavailable, match="Overloaded"):
        await collect(provider("anthropic").stream(request()))


@respx.mock
async def test_anthropic_529_overloaded_is_unavailable() -> None:
    respx.post(ANTHROPIC).respond(
        529, json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    with pytest.raises(llm.ProviderUnavailable, match="529"):
        await provider("anthropic").complete(request())


async def test_echo_answers_with_the_prompts_words_and_exact_counts() -> None:
    echo = llm.EchoProvider()
    req = request("one two  three\nfour", max_tokens=3)
    result = await echo.complete(req)
    assert result.text == "one two three"
    assert result.finish_reason == "length"
    assert result.usage == Usage(input_tokens=6, output_tokens=3)  # 4 prompt + 2 system words
    texts, end = await collect(echo.stream(req))
    assert texts == ["one", " two", " three"]
    assert end.usage == result.usage and end.finish_reason == "length"


BASH = chat.Tool("Bash", "Run a command", {"type": "object", "properties": {
    "command": {"type": "string"}}, "required": ["command"]})  # fmt: skip
WEATHER = chat.Tool("get_weather", "The weather", {"type": "object", "properties": {
    "location": {"type": "string"}}, "required": ["location"]})  # fmt: skip


def asked(text: str, choice: chat.ToolChoice | None = None) -> chat.Request:
    return chat.Request(model="echo", messages=(chat.Message("user", (chat.Text(text),)),),
                        tools=(BASH, WEATHER), tool_choice=choice)  # fmt: skip


async def test_echo_answers_in_words_when_tools_are_offered_but_not_named() -> None:
    # Claude Code and Codex offer their tools on every turn: a greeting is not a call.
    answer = await llm.EchoProvider().complete(asked("hello there"))
    assert answer.text == "hello there" and answer.finish_reason == "stop"
    assert not [p for p in answer.parts if isinstance(p, chat.ToolCall)]
    inside = await llm.EchoProvider().complete(asked("show my_get_weather_log"))
    assert inside.finish_reason == "stop"  # a name inside another word is not the name


async def test_echo_calls_the_tool_the_last_message_names_with_its_last_word() -> None:
    answer = await llm.EchoProvider().complete(asked("Use get_weather for Paris."))
    call = next(p for p in answer.parts if isinstance(p, chat.ToolCall))
    assert call.name == "get_weather" and json.loads(call.arguments) == {"location": "Paris"}
    assert answer.finish_reason == "tool_calls"


async def test_echo_calls_a_tool_the_request_forces() -> None:
    named = await llm.EchoProvider().complete(asked("hi", chat.ToolChoice("tool", "get_weather")))
    required = await llm.EchoProvider().complete(asked("hi", chat.ToolChoice("required")))
    calls = [next(p for p in a.parts if isinstance(p, chat.ToolCall)) for a in (named, required)]
    assert [c.name for c in calls] == ["get_weather", "Bash"]


async def test_echo_structured_output_honours_bounds_multiples_and_patterns() -> None:
    from pydantic import BaseModel, Field

    class Reading(BaseModel):
        share: float = Field(gt=0, lt=1)
        count: int = Field(ge=10, le=20, multiple_of=3)
        above: int = Field(gt=5)
        step: float = Field(multiple_of=0.25, gt=1)
        zip_code: str = Field(pattern=r"^\d{5}$")
        code: str = Field(pattern=r"^[A-Z]{2}-\d{3}$")

    form = chat.ResponseFormat("json_schema", schema=Reading.model_json_schema())
    request = chat.Request(model="echo", messages=(chat.Message("user", (chat.Text("go"),)),),
                           response_format=form)  # fmt: skip
    answer = await llm.EchoProvider().complete(request)
    reading = Reading.model_validate_json(answer.text)  # valid: each bound and pattern held
    assert 0 < reading.share < 1 and reading.count == 12 and reading.above == 6


async def test_shared_client_is_made_once_and_sized_on_purpose() -> None:
    shared = SharedClient(Settings(max_inflight=700, timeout_s=42, transport="httpx"))
    client = shared.get()
    assert shared.get() is client
    assert client.timeout.read == 42 and client.timeout.connect == 5
    assert not client.follow_redirects
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert pool._max_connections == 700
    await shared.aclose()
    assert client.is_closed


OK_ANSWER = {
    "id": "chatcmpl-9",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"content": "fine"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
}


@pytest.mark.parametrize(
    "first",
    [
        httpx.Response(500),
        httpx.Response(502),
        httpx.Response(503),
        httpx.Response(504),
        httpx.Response(529),
        httpx.Response(429, headers={"retry-after": "0.01"}),
        httpx.ConnectError("refused"),
    ],
)
@respx.mock
async def test_a_failure_before_the_answer_is_retried(first: httpx.Response | Exception) -> None:
    route = respx.post(OPENAI).mock(side_effect=[first, httpx.Response(200, json=OK_ANSWER)])
    result = await quick_retries().complete(request())
    assert result.text == "fine" and route.call_count == 2


@respx.mock
async def test_a_stream_that_fails_before_its_first_byte_is_retried() -> None:
    stream = sse(openai_chunk("ok", "stop"), USAGE_CHUNK, "[DONE]")
    route = respx.post(OPENAI).mock(
        side_effect=[httpx.Response(503), httpx.Response(200, content=stream)]
    )
    texts, end = await collect(quick_retries().stream(request()))
    assert texts == ["ok"] and route.call_count == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(401), llm.ProviderRejected),
        (httpx.Response(400), llm.ProviderBadRequest),
        (httpx.ReadTimeout("slow"), llm.ProviderTimeout),  # the provider may be working on it
        (httpx.Response(200, content=b"not json"), llm.ProviderError),
    ],
)
@respx.mock
async def test_failures_that_a_retry_cannot_mend_are_not_retried(
    answer: httpx.Response | Exception, error: type[Exception]
) -> None:
    route = respx.post(OPENAI).mock(side_effect=[answer, httpx.Response(200, json=OK_ANSWER)])
    with pytest.raises(error):
        await quick_retries().complete(request())
    assert route.call_count == 1


@respx.mock
async def test_retries_are_bounded_then_the_last_error_is_raised() -> None:
    route = respx.post(ANTHROPIC).mock(return_value=httpx.Response(503))
    with pytest.raises(llm.ProviderUnavailable, match="503"):
        await quick_retries("anthropic").complete(request())
    assert route.call_count == 3


@respx.mock
async def test_a_retry_after_beyond_the_cap_is_passed_on_not_waited() -> None:
    route = respx.post(OPENAI).mock(
        return_value=httpx.Response(429, headers={"retry-after": "120"})
    )
    with pytest.raises(llm.ProviderRateLimited) as info:
        await quick_retries(cap_s=5).complete(request())
    assert route.call_count == 1 and info.value.retry_after_s == 120


@respx.mock
async def test_no_retry_starts_after_the_deadline() -> None:
    route = respx.post(OPENAI).mock(return_value=httpx.Response(429, headers={"retry-after": "2"}))
    with pytest.raises(llm.ProviderRateLimited):
        await quick_retries(deadline_s=1).complete(request())
    assert route.call_count == 1


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    policy = llm.RetryPolicy(retries=5, base_s=1, cap_s=8)
    unavailable = llm.ProviderUnavailable("x")
    for attempt, ceiling in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 8)]:
        waits = [policy.delay(attempt, unavailable) for _ in range(200)]
        assert all(w is not None and 0 <= w <= ceiling for w in waits)
        assert max(w for w in waits if w is not None) > ceiling / 2  # spread, not fixed
    assert policy.delay(5, unavailable) is None
    limited = llm.ProviderRateLimited("x", retry_after_s=3)
    assert 3 <= (policy.delay(0, limited) or 0) <= 8
    assert policy.delay(0, llm.ProviderTimeout("x")) is None


def fallback_to_anthropic() -> Deployments:
    settings = Settings(
        provider="openai",
        openai_api_key=PROVIDER_KEY,
        anthropic_api_key=PROVIDER_KEY,
        fallback_provider="anthropic",
        max_retries=0,
    )
    return deployments(settings)


async def complete(pool: Deployments, call: chat.Request) -> chat.Completion:
    return await pool.run(call.model, lambda p, m: p.complete(chat.with_model(call, m)))


ANTHROPIC_OK = {
    "id": "msg_1",
    "model": "claude-haiku-4-5-20251001",
    "content": [{"type": "text", "text": "from the fallback"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 3},
}


@respx.mock
async def test_the_fallback_serves_when_the_first_provider_fails_before_its_answer() -> None:
    respx.post(OPENAI).respond(503)
    second = respx.post(ANTHROPIC).respond(200, json=ANTHROPIC_OK)
    result = await complete(fallback_to_anthropic(), request())
    assert result.text == "from the fallback"
    assert result.model == "claude-haiku-4-5-20251001"  # the answer names who served
    assert json.loads(second.calls.last.request.content)["model"] == "claude-haiku-4-5"


@respx.mock
async def test_a_stream_falls_back_before_its_first_token_only() -> None:
    respx.post(OPENAI).mock(side_effect=httpx.ConnectError("refused"))
    respx.post(ANTHROPIC).respond(
        200, content=sse(*[f for _, f in ANTHROPIC_STREAM], events=[e for e, _ in ANTHROPIC_STREAM])
    )
    call = request()

    def attempt(p: llm.Provider, model: str) -> Awaitable[tuple[list[str], Ended]]:
        return collect(p.stream(dataclasses.replace(call, model=model)))

    texts, end = await fallback_to_anthropic().run(call.model, attempt)
    assert texts == ["Hi", "!\n"] and end.model == "claude-haiku-4-5-20251001"


@respx.mock
async def test_a_request_the_provider_refused_as_invalid_does_not_fall_back() -> None:
    respx.post(OPENAI).respond(400, json={"error": {"message": "context too long"}})
    second = respx.post(ANTHROPIC).respond(200, json=ANTHROPIC_OK)
    with pytest.raises(llm.ProviderBadRequest):
        await complete(fallback_to_anthropic(), request())
    assert second.call_count == 0


def test_the_fallback_model_defaults_to_its_providers_default() -> None:
    settings = Settings.from_env(
        environ={"OPENAI_API_KEY": "k", "LLM_FALLBACK_MODEL": "gpt-4.1-mini"}, env_file=None
    )
    assert (settings.fallback_provider, settings.fallback_model) == ("openai", "gpt-4.1-mini")
    with pytest.raises(SettingsError, match="ANTHROPIC_API_KEY"):
        Settings.from_env(
            environ={"OPENAI_API_KEY": "k", "LLM_FALLBACK_PROVIDER": "anthropic"}, env_file=None
        )


async def test_the_default_transport_is_aiohttp_with_the_same_pool_size() -> None:
    shared = SharedClient(Settings(max_inflight=700, timeout_s=42))
    client = shared.get()
    transport = client._transport
    assert isinstance(transport, AiohttpTransport)
    assert client.timeout.read == 42 and not client.trust_env
    session = transport.get_client()  # what the transport makes on its first request
    assert session.connector is not None and session.connector.limit == 700
    assert not session.trust_env and isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
    await session.close()
    await shared.aclose()
    assert client.is_closed


async def test_a_transport_passed_in_is_the_one_the_shared_client_uses() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    shared = SharedClient(Settings(), transport)
    assert shared.get()._transport is transport
    await shared.aclose()


@respx.mock
async def test_the_httpx_client_keeps_no_cookie_a_provider_sets() -> None:
    answer = {
        "id": "c",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
    }
    route = respx.post(OPENAI).respond(
        200, json=answer, headers={"Set-Cookie": "session=caller-one; Path=/"}
    )
    p = provider("openai")
    await p.complete(request())
    await p.complete(request())
    assert route.call_count == 2
    assert "cookie" not in route.calls[1].request.headers


# --- what a hostile provider cannot do ------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@respx.mock
async def test_a_redirect_is_an_error_that_names_it_and_is_never_followed(status: int) -> None:
    elsewhere = respx.post("https://elsewhere.test/steal").respond(200, json=OK_ANSWER)
    respx.post(OPENAI).respond(status, headers={"location": "https://elsewhere.test/steal"})
    with pytest.raises(llm.ProviderError, match=f"redirect \\(HTTP {status}\\)"):
        await provider("openai").complete(request())
    with pytest.raises(llm.ProviderError, match=f"redirect \\(HTTP {status}\\)"):
        await collect(provider("openai").stream(request()))
    assert elsewhere.call_count == 0


@respx.mock
async def test_an_answer_over_the_byte_bound_is_cut_as_it_arrives() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"id": "x", "choices": [{"message": {"content": "'
        while sent < 64 << 20:  # the test's own bound: 64 MB at most
            sent += 64 << 10
            yield b"a" * (64 << 10)

    respx.post(OPENAI).respond(200, content=endless())
    with pytest.raises(llm.ProviderError, match="over 1048576 bytes"):
        await provider("openai", max_response_bytes=1 << 20).complete(request())
    assert sent <= 2 << 20  # read no further than the bound


@respx.mock
async def test_a_gzip_bomb_is_cut_on_its_decompressed_size() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    bomb = packer.compress(b"0" * (200 << 20)) + packer.flush()  # 200 MB in about 200 KB

    async def reads() -> AsyncIterator[bytes]:  # as aiohttp's transport reads: 16 KB at most
        for at in range(0, len(bomb), 16 << 10):
            yield bomb[at : at + (16 << 10)]

    respx.post(OPENAI).respond(
        200,
        content=reads(),
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    tracemalloc.start()
    try:
        with pytest.raises(llm.ProviderError, match="over 1048576 bytes"):
            await provider("openai", max_response_bytes=1 << 20).complete(request())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


@respx.mock
async def test_an_answer_that_trickles_in_meets_the_total_deadline() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(200):  # 20 s in all, each read well within the read timeout
            await asyncio.sleep(0.1)
            yield b" "

    respx.post(OPENAI).respond(200, content=trickle())
    started = time.monotonic()
    with pytest.raises(llm.ProviderTimeout, match="within 0.5 s"):
        await provider("openai", total_timeout_s=0.5).complete(request())
    assert time.monotonic() - started < 5


def packed(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


def encoded(body: bytes, encoding: str, chunk: int = 64 << 10) -> httpx.Response:
    async def reads() -> AsyncIterator[bytes]:
        for at in range(0, len(body), chunk):
            yield body[at : at + chunk]

    return httpx.Response(200, content=reads(), headers={"content-encoding": encoding})


async def test_a_bomb_is_inflated_a_bounded_step_at_a_time_giving_others_their_turn() -> None:
    bomb = packed(b"0" * (64 << 20), 31)  # 64 MB of zeros in about 64 KB: one read
    turns = 0

    async def other_requests() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    beside = asyncio.ensure_future(other_requests())
    await asyncio.sleep(0)
    sizes = []
    async for piece in upstream.inflated(encoded(bomb, "gzip")):
        sizes.append(len(piece))
        if sum(sizes) > 16 << 20:
            break  # where the bound cuts it
    beside.cancel()
    assert max(sizes) <= upstream.INFLATE_STEP
    assert turns >= len(sizes) // 2  # the others ran between the steps


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS])
async def test_deflate_is_read_wrapped_or_raw_and_an_unknown_encoding_refused(wbits: int) -> None:
    text = b"hello " * 50_000
    got = b"".join([p async for p in upstream.inflated(encoded(packed(text, wbits), "deflate"))])
    assert got == text
    with pytest.raises(llm.ProviderError, match="not asked for"):
        _ = [p async for p in upstream.inflated(encoded(b"x", "br"))]
    with pytest.raises(llm.ProviderError, match="does not decompress"):
        _ = [p async for p in upstream.inflated(encoded(b"not gzip at all", "gzip"))]
