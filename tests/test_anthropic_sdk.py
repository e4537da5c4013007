"""The official `anthropic` SDK, sync and async, against /v1/messages of the real
service: in front of a fake Anthropic server (passed through), a fake OpenAI server
(translated through the hub), and on echo. And what Claude Code sends, accepted by
all three."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import beta_tool
from anthropic.types import (
    MessageParam,
    ThreadNotFoundError,
    ThreadUnsupportedRequestError,
    ToolParam,
)

from tests.conftest import CLIENT_KEY, PROVIDER_KEY, Process, start_mock, start_service

pytestmark = pytest.mark.e2e

TINY = "tiny-key-" + "t" * 20  # one request an hour

PROVIDERS = {
    "anthropic": {
        "LLM_PROVIDER": "anthropic",
        "ANTHROPIC_API_KEY": PROVIDER_KEY,
        "LLM_MODEL": "claude-haiku-4-5",
    },
    "openai": {
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": PROVIDER_KEY,
        "LLM_MODEL": "gpt-4o-mini",
    },
    "echo": {"LLM_PROVIDER": "echo", "LLM_MODEL": "echo"},
}


@dataclass
class Served:
    url: str
    provider: str
    model: str
    mock: Process | None
    process: Process

    def client(self, key: str = CLIENT_KEY, **options: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, **options)

    def sent(self) -> dict[str, Any]:
        assert self.mock is not None
        last: dict[str, Any] = httpx.get(self.mock.url + "/_last").json()
        return last

    def mock_stats(self) -> dict[str, int]:
        assert self.mock is not None
        stats: dict[str, int] = httpx.get(self.mock.url + "/_stats").json()
        return stats


@pytest.fixture(scope="module", params=list(PROVIDERS))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(request.param)
    keys = tmp / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "tiny"\nkey = "{TINY}"\nrate_limit = "1/hour"\n')
    env = {"API_KEYS": CLIENT_KEY, "API_KEYS_FILE": str(keys), **PROVIDERS[request.param]}
    mock = None
    if request.param != "echo":
        mock = start_mock(tmp)
        env["OPENAI_BASE_URL"] = mock.url + "/v1"
        env["ANTHROPIC_BASE_URL"] = mock.url
    service = start_service(tmp, env)
    yield Served(service.url, request.param, PROVIDERS[request.param]["LLM_MODEL"], mock, service)
    service.stop()
    if mock is not None:
        mock.stop()


def text_of(message: Any) -> str:
    """The text of a message, or of a beta one (whose blocks are the beta classes)."""
    return "".join(b.text for b in message.content if b.type == "text")


def user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def steer(served: Served, prompt: str, **options: object) -> str:
    return ("mock:" + json.dumps(options) + "\n" if served.mock and options else "") + prompt


USER: list[MessageParam] = [{"role": "user", "content": "Hello there"}]
TOOL: ToolParam = {
    "name": "get_weather",
    "description": "The weather for a place",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}


def test_create_answers_in_the_messages_shape(served: Served) -> None:
    with served.client() as c:
        message = c.messages.create(model=served.model, max_tokens=50, messages=USER)
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert text_of(message) == "Hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens >= 1 and message.usage.output_tokens == 2


def test_async_create_and_stream_helpers(served: Served) -> None:
    async def go() -> tuple[str, anthropic.types.Message, str]:
        async with anthropic.AsyncAnthropic(
            base_url=served.url, api_key=CLIENT_KEY, max_retries=0
        ) as c:
            whole = await c.messages.create(model=served.model, max_tokens=50, messages=USER)
            async with c.messages.stream(
                model=served.model, max_tokens=50, messages=USER
            ) as stream:
                text = "".join([t async for t in stream.text_stream])
                final = await stream.get_final_message()
        return text_of(whole), final, text

    whole, final, text = asyncio.run(go())
    assert whole == text == "Hello there"
    assert text_of(final) == "Hello there" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 2


def test_a_tool_call_and_its_result_go_both_ways(served: Served) -> None:
    call = {"name": "get_weather", "arguments": {"location": "Paris"}}
    messages: list[Any] = [
        {"role": "user", "content": steer(served, "Use get_weather for Paris", tool_call=call)}
    ]
    with served.client() as c:
        whole = c.messages.create(
            model=served.model, max_tokens=200, messages=messages, tools=[TOOL]
        )
        with c.messages.stream(
            model=served.model, max_tokens=200, messages=messages, tools=[TOOL]
        ) as s:
            streamed = s.get_final_message()
        uses = [b for b in whole.content if b.type == "tool_use"]
        assert whole.stop_reason == streamed.stop_reason == "tool_use" and len(uses) == 1
        assert uses[0].name == "get_weather" and isinstance(uses[0].input, dict)
        assert [b.type for b in streamed.content if b.type == "tool_use"] == ["tool_use"]
        streamed_use = next(b for b in streamed.content if b.type == "tool_use")
        assert streamed_use.input == uses[0].input
        history = [
            *messages,
            {"role": "assistant", "content": [u.model_dump() for u in uses]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": uses[0].id, "content": "18C and sunny"}
                ],
            },
        ]
        answer = c.messages.create(
            model=served.model, max_tokens=200, messages=history, tools=[TOOL]
        )
    if served.provider == "echo":
        assert text_of(answer) == "18C and sunny"
        return
    sent = served.sent()["body"]["messages"]
    if served.provider == "anthropic":  # passed through as written
        assert sent[2]["content"][0] == history[2]["content"][0]
    else:  # translated to Chat Completions
        assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert sent[2] == {"role": "tool", "tool_call_id": uses[0].id, "content": "18C and sunny"}


def test_count_tokens_is_never_zero_nor_404(served: Served) -> None:
    with served.client() as c:
        counted = c.messages.count_tokens(model=served.model, messages=USER, tools=[TOOL])
        missing = c.messages.count_tokens(
            model=served.model,
            messages=[{"role": "user", "content": steer(served, "x", status=404)}],
        )
    assert counted.input_tokens > 0 and missing.input_tokens > 0
    if served.provider == "anthropic":
        assert served.sent().get("count") is True  # asked the provider


def test_models_list_and_retrieve_in_anthropic_shape(served: Served) -> None:
    with served.client() as c:
        listed = c.models.list()
        one = c.models.retrieve(served.model)
        with pytest.raises(anthropic.NotFoundError):
            c.models.retrieve("no-such-model")
    assert [m.id for m in listed.data] == [served.model] and listed.data[0].type == "model"
    assert one.id == served.model and one.display_name == served.model


def test_each_error_is_the_sdks_own_class(served: Served) -> None:
    with served.client("wrong-key") as c, pytest.raises(anthropic.AuthenticationError):
        c.messages.create(model=served.model, max_tokens=5, messages=USER)
    with served.client() as c:
        with pytest.raises(anthropic.NotFoundError) as missing:
            c.messages.create(model="not-a-model", max_tokens=5, messages=USER)
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError) as bad:
            c.messages.create(model=served.model, max_tokens=-1, messages=USER)
        body: Any = bad.value.body
        assert bad.value.status_code == 400 and set(body) == {"type", "error", "request_id"}
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in body["error"]["message"]
    with served.client(TINY) as c:
        c.messages.create(model=served.model, max_tokens=5, messages=USER)
        with pytest.raises(anthropic.RateLimitError):
            c.messages.create(model=served.model, max_tokens=5, messages=USER)
    if served.mock is None:
        return
    failing = user(steer(served, "x", status=400))
    with served.client() as c, pytest.raises(anthropic.BadRequestError) as refused:
        c.messages.create(model=served.model, max_tokens=5, messages=failing)
    if served.provider == "anthropic":  # the provider's own words, as they came
        assert refused.value.body == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "mock error 400"},
        }
    broken = user(steer(served, "x", status=500))
    with served.client() as c, pytest.raises(anthropic.InternalServerError):
        c.messages.create(model=served.model, max_tokens=5, messages=broken)


def test_our_provider_key_refused_is_a_502_not_the_providers_words(served: Served) -> None:
    if served.mock is None:
        pytest.skip("echo has no key")
    refused = user(steer(served, "x", status=401))
    with served.client() as c, pytest.raises(anthropic.InternalServerError) as info:
        c.messages.create(model=served.model, max_tokens=5, messages=refused)
    assert info.value.status_code == 502 and "sk-mock" not in str(info.value.body)


CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": (
        "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"
    ),
    "x-claude-code-session-id": "session-1234",
    "user-agent": "claude-cli/2.1.0 (external, cli)",
}


def claude_code_body(prompt: str) -> dict[str, Any]:
    """What Claude Code 2.1 sends for a turn, in its shape."""
    return {
        "model": "MODEL",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Work in /repo."},
        ],
        "messages": [
            {"role": "system", "content": "A reminder inside the conversation."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}}
                ],
            },
        ],
        "tools": [
            {
                "name": f"Tool{i}",
                "description": "a tool",
                "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
            }
            for i in range(24)
        ]
        + [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
    }


def test_what_claude_code_sends_is_accepted(served: Served) -> None:
    assert httpx.head(served.url + "/").status_code == 200
    body = claude_code_body(steer(served, "Say hello", text="Hello."))
    body["model"] = served.model
    headers = {
        **CLAUDE_CODE_HEADERS,
        "authorization": f"Bearer {CLIENT_KEY}",
        "x-request-id": f"claude-code-{served.provider}",
    }
    r = httpx.post(served.url + "/v1/messages?beta=true", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "message_delta" in names
    line = served.process.access_lines(headers["x-request-id"])[headers["x-request-id"]]
    assert line["session"] == "session-1234"
    if served.provider == "anthropic":
        sent = served.sent()
        assert sent["query"] == "beta=true" and sent["body"] == body  # untouched
        assert sent["headers"]["anthropic-beta"] == CLAUDE_CODE_HEADERS["anthropic-beta"]
        assert (
            sent["headers"]["x-api-key"] == PROVIDER_KEY and "authorization" not in sent["headers"]
        )
    else:
        assert "context_management" in line["dropped"]
        assert any(name.startswith("tools.24") for name in line["dropped"])  # the server tool


def test_a_translated_stream_is_anthropics_event_sequence(served: Served) -> None:
    if served.provider == "anthropic":
        pytest.skip("passed through: the provider's own sequence")
    with served.client() as c:
        with c.messages.stream(model=served.model, max_tokens=50, messages=USER) as stream:
            kinds = [event.type for event in stream]
    raw = [
        k
        for k in kinds
        if k
        in (
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        )
    ]
    assert raw == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_a_client_that_leaves_a_passed_through_stream_closes_the_upstream(served: Served) -> None:
    if served.provider != "anthropic":
        pytest.skip("the disconnect rule of translated streams is tested elsewhere")
    prompt = steer(served, "go", tokens=200, token_delay_ms=50)
    with (
        served.client() as c,
        c.messages.stream(
            model=served.model, max_tokens=500, messages=[{"role": "user", "content": prompt}]
        ) as stream,
    ):
        for event in stream:
            if event.type == "content_block_delta":
                break  # and leave
    deadline = time.monotonic() + 5
    while served.mock_stats()["open"]:
        assert time.monotonic() < deadline, "the upstream stream stayed open"
        time.sleep(0.05)


# --- message threads: the SDKs' defaults, whatever the provider ------------------------


class Sent:
    """The bodies the SDK sends, seen from its own HTTP client."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def __call__(self, request: Any) -> None:
        if request.url.path.endswith("/v1/messages"):
            self.bodies.append(json.loads(request.content))
            self.headers.append(dict(request.headers))

    def client(self, served: Served) -> anthropic.Anthropic:
        http = anthropic.DefaultHttpxClient(event_hooks={"request": [self]})
        return served.client(http_client=http)


def test_the_tool_runner_threads_its_turns_on_its_defaults(served: Served) -> None:
    called: list[str] = []

    @beta_tool
    def get_weather(location: str) -> str:
        """The weather for a place."""
        called.append(location)
        return "18C and sunny"

    call = {"name": "get_weather", "arguments": {"location": "Paris"}}
    prompt = steer(served, "Use get_weather for Paris", tool_call=call)
    sent = Sent()
    with sent.client(served) as c:
        runner = c.beta.messages.tool_runner(
            model=served.model, max_tokens=200, tools=[get_weather], max_iterations=4,
            messages=[{"role": "user", "content": prompt}],
        )  # fmt: skip
        replies = list(runner)
    assert [m.stop_reason for m in replies] == ["tool_use", "end_turn"] and len(called) == 1
    first, second = sent.bodies
    assert first["thread"] == {"type": "create"} and "message-threads" in sent.headers[0][
        "anthropic-beta"]  # fmt: skip
    assert second["thread"] == {"type": "continue", "previous_message_id": replies[0].id}
    assert [m["role"] for m in second["messages"]] == ["user"] and "tools" not in second
    if served.provider == "echo":
        assert text_of(replies[1]) == "18C and sunny"
        return
    upstream = served.sent()
    assert "thread" not in upstream["body"]
    if served.provider == "anthropic":  # the whole conversation, and its tools, as Anthropic's
        assert [m["role"] for m in upstream["body"]["messages"]] == ["user", "assistant", "user"]
        assert upstream["body"]["tools"][0]["name"] == "get_weather"
        assert "message-threads" not in upstream["headers"].get("anthropic-beta", "")
    else:
        roles = [m["role"] for m in upstream["body"]["messages"]]
        assert roles == ["user", "assistant", "tool"]


def test_a_thread_sends_only_new_messages_and_its_replies_know_the_rest(served: Served) -> None:
    sent = Sent()
    with sent.client(served) as c:
        thread = c.beta.messages.thread(model=served.model, max_tokens=100, system="Be brief.")
        first = thread.send({"role": "user", "content": "My name is Ada"})
        with thread.stream({"role": "user", "content": "Hello again"}) as stream:
            streamed = stream.get_final_message()
        last = thread.send({"role": "user", "content": "Goodbye now"})
        with pytest.raises(ThreadNotFoundError) as lost:
            c.beta.messages.create(
                model=served.model, max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                thread={"type": "continue", "previous_message_id": "msg_" + "0" * 24},
                betas=["message-threads-2026-08-12"],
            )  # fmt: skip
    assert lost.value.error_code == "thread_not_found"
    assert [b["thread"] for b in sent.bodies[:3]] == [
        {"type": "create"},
        {"type": "continue", "previous_message_id": first.id},
        {"type": "continue", "previous_message_id": streamed.id},
    ]
    assert len(sent.bodies[2]["messages"]) == 1 and "system" not in sent.bodies[2]
    assert len({first.id, streamed.id, last.id}) == 3
    if served.provider == "echo":  # echo counts what it was given: the whole conversation
        assert text_of(last) == "Goodbye now"
        assert last.usage.input_tokens > first.usage.input_tokens + 5
        return
    upstream = served.sent()["body"]
    texts = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
             for m in upstream["messages"]]  # fmt: skip
    if served.provider == "anthropic":
        assert upstream["system"] == "Be brief." and len(texts) == 5
    else:
        assert texts[0] == "Be brief." and len(texts) == 6
    assert texts[-1] == "Goodbye now" and texts[-3] == "Hello again"


def test_with_nothing_kept_the_tool_runner_goes_on_without_a_thread(
    tmp_path: Path,
) -> None:
    env = {"API_KEYS": CLIENT_KEY, "STORE_STATE": "false", **PROVIDERS["echo"]}
    service = start_service(tmp_path, env)
    served = Served(service.url, "echo", "echo", None, service)
    sent = Sent()

    @beta_tool
    def get_weather(location: str) -> str:
        """The weather for a place."""
        return "18C and sunny"

    try:
        with sent.client(served) as c:
            runner = c.beta.messages.tool_runner(
                model="echo", max_tokens=100, tools=[get_weather], max_iterations=2,
                messages=[{"role": "user", "content": "Just say hello"}],
            )  # fmt: skip
            replies = list(runner)
            thread = c.beta.messages.thread(model="echo", max_tokens=100)
            with pytest.raises(ThreadUnsupportedRequestError):
                thread.send({"role": "user", "content": "hi"})
    finally:
        service.stop()
    assert replies[-1].stop_reason in ("end_turn", "tool_use")
    assert sent.bodies[0]["thread"] == {"type": "create"} and "thread" not in sent.bodies[1]


JS = Path(__file__).parent / "js"
NODE = shutil.which("node")


@pytest.mark.skipif(
    NODE is None or not (JS / "node_modules" / "@anthropic-ai" / "sdk").is_dir(),
    reason="node or the TypeScript SDK is missing (.ci/run: npm ci --prefix tests/js)",
)
def test_the_typescript_sdks_tool_runner_and_thread_on_their_defaults(served: Served) -> None:
    call = {"name": "get_weather", "arguments": {"location": "Paris"}}
    prompt = steer(served, "Use get_weather for Paris", tool_call=call)
    env = {**os.environ, "TEXT_TOOL_URL": served.url, "TEXT_TOOL_KEY": CLIENT_KEY,
           "TEXT_TOOL_MODEL": served.model, "TEXT_TOOL_PROMPT": prompt}  # fmt: skip
    assert NODE is not None
    done = subprocess.run([NODE, "threads.mjs"], cwd=JS, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["stop_reason"] for r in seen["replies"]] == ["tool_use", "end_turn"]
    assert len(seen["called"]) == 1
    created, continued = seen["runnerSent"]
    assert created["thread"] == {"type": "create"}
    assert continued["thread"] == {"type": "continue",
                                   "previous_message_id": seen["replies"][0]["id"]}  # fmt: skip
    assert "tools" not in continued and len(continued["messages"]) == 1
    first, second = seen["threadSent"]
    assert second["thread"]["previous_message_id"] == seen["first"]["id"]
    assert second["messages"] == [{"role": "user", "content": "Goodbye now"}]
    assert seen["lost"] == {"status": 404, "error_code": "thread_not_found",
                            "details": {"error_code": "thread_not_found"}}  # fmt: skip
    if served.provider == "echo":  # echo counts the whole conversation it was given
        assert seen["second"]["text"] == "Goodbye now"
        assert seen["second"]["input"] > seen["first"]["input"]
    else:
        upstream = json.dumps(served.sent()["body"])
        assert "My name is Ada" in upstream and "Goodbye now" in upstream
