"""OpenAI's Responses API and embeddings, served by the app: on echo, and in front of
Anthropic and OpenAI-protocol providers (a MockTransport under the app's own client,
each test reading what the app sent it). Every response object and streamed event is
checked against the Open Responses schema (the `openresponses-types` models) and
against the `openai` SDK's own types; event sequences against golden files."""

from __future__ import annotations

import base64
import json
import logging
import math
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import llm
from config import Rate, Settings
from dialects import Accounted, openai_embeddings
from server import create_app
from tests.conftest import CLIENT_KEY, PROVIDER_KEY
from tests.helpers import (
    GOLDEN,
    MESSAGE_WITH_TOOLS,
    Provider,
    client,
    conforming_events,
    conforming_response,
    golden,
    sse_file,
)
from usage import Usage

pytestmark = pytest.mark.anyio


def timeless(data: Any) -> Any:
    """A response object without what differs between two calls: ids and times."""
    if isinstance(data, dict):
        return {
            k: timeless(v)
            for k, v in data.items()
            if k not in ("id", "created_at", "completed_at", "call_id")
        }
    if isinstance(data, list):
        return [timeless(v) for v in data]
    return data


def echo_app(**changes: object) -> Starlette:
    settings = Settings(
        provider="echo", api_keys=(CLIENT_KEY,), models=("echo", "text-embedding-3-small")
    )
    return create_app(settings.replace(**changes))


def provider_app(provider: Provider, kind: str, **changes: object) -> Starlette:
    if kind == "anthropic":
        settings = Settings(
            provider="anthropic",
            anthropic_api_key=PROVIDER_KEY,
            model="claude-haiku-4-5",
            api_keys=(CLIENT_KEY,),
            max_retries=0,
        )
    else:  # an OpenAI-compatible server: translated to Chat Completions
        settings = Settings(
            provider="openai",
            openai_base_url="http://vllm.test/v1",
            model="gpt-4o-mini",
            models=("gpt-4o-mini", "text-embedding-3-small"),
            api_keys=(CLIENT_KEY,),
            max_retries=0,
        )
    return create_app(settings.replace(**changes), transport=httpx.MockTransport(provider))


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather for a place",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}
PLAN = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}

ECHO_BODIES: dict[str, dict[str, Any]] = {
    "text": {"input": "hello there world"},
    "instructions": {"instructions": "Be brief.", "input": [{"role": "user", "content": "hi"}]},
    "tool call": {"input": "weather in Paris", "tools": [WEATHER]},
    "structured": {
        "input": "plan a trip",
        "text": {"format": {"type": "json_schema", "name": "plan", "schema": PLAN, "strict": True}},
    },
    "json object": {"input": "anything", "text": {"format": {"type": "json_object"}}},
    "cut short": {"input": "one two three four", "max_output_tokens": 2},
}


# --- on echo: the object and the events --------------------------------------------


@pytest.mark.parametrize("case", list(ECHO_BODIES))
async def test_echo_answers_conform_and_a_stream_completes_with_the_same_object(case: str) -> None:
    body = ECHO_BODIES[case]
    async with client(echo_app()) as c:
        whole = await c.post("/v1/responses", json=body)
        streamed = await c.post("/v1/responses", json={**body, "stream": True})
    assert whole.status_code == 200, whole.text
    answer = conforming_response(whole.json())
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = conforming_events(streamed.text)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress"
    last = events[-1]
    expected = "response.incomplete" if case == "cut short" else "response.completed"
    assert last["type"] == expected
    assert timeless(conforming_response(last["response"])) == timeless(answer)


async def test_the_answer_echoes_the_requests_settings_and_counts_its_usage() -> None:
    body = {
        "input": "one two three four",
        "instructions": "Be brief.",
        "max_output_tokens": 2,
        "temperature": 0.2,
        "top_p": 0.9,
        "metadata": {"ticket": "T-1"},
        "parallel_tool_calls": False,
        "tools": [WEATHER],
        "tool_choice": "none",
        "reasoning": {"effort": "low", "summary": "auto"},
    }
    async with client(echo_app()) as c:
        r = await c.post("/v1/responses", json=body)
    data = conforming_response(r.json())
    assert data["status"] == "incomplete"
    assert data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["output"][0]["content"][0]["text"] == "one two"
    assert data["usage"]["output_tokens"] == 2
    assert data["usage"]["total_tokens"] == data["usage"]["input_tokens"] + 2
    assert data["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert data["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    for field in ("instructions", "max_output_tokens", "temperature", "top_p", "metadata"):
        assert data[field] == body[field]
    assert data["parallel_tool_calls"] is False and data["tool_choice"] == "none"
    assert data["reasoning"] == {"effort": "low", "summary": "auto"}
    assert data["tools"][0]["name"] == "get_weather" and data["store"] is False


async def test_a_function_call_round_trip_ends_with_the_tools_result() -> None:
    async with client(echo_app()) as c:
        ask = {"input": "Use get_weather for Paris", "tools": [WEATHER]}
        first = (await c.post("/v1/responses", json=ask)).json()
        call = first["output"][0]
        assert call["type"] == "function_call" and call["id"].startswith("fc_")
        assert call["call_id"] != call["id"] and json.loads(call["arguments"])["location"]
        history = [
            {"role": "user", "content": "Use get_weather for Paris"},
            call,
            {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny 21C"},
        ]
        second = await c.post("/v1/responses", json={"input": history, "tools": [WEATHER]})
    data = conforming_response(second.json())
    assert data["output"][0]["type"] == "message"
    assert data["output"][0]["content"][0]["text"] == "sunny 21C"


async def test_a_structured_answer_is_valid_against_its_schema() -> None:
    async with client(echo_app()) as c:
        r = await c.post("/v1/responses", json=ECHO_BODIES["structured"])
    data = conforming_response(r.json())
    plan = json.loads(data["output"][0]["content"][0]["text"])
    assert set(plan) == {"city", "days"} and isinstance(plan["days"], int)
    assert data["text"]["format"]["type"] == "json_schema"
    assert data["text"]["format"]["name"] == "plan"


# --- stateless: what would need a stored response ----------------------------------


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("previous_response_id", "resp_123", "previous_response_id"),
        ("conversation", "conv_123", "conversation"),
        ("store", True, "store"),
        ("background", True, "background"),
        ("input", [{"type": "item_reference", "id": "msg_1"}], "input.0.type"),
        ("tools", [{"type": "web_search"}], "tools.0"),
        ("tools", [{"type": "file_search", "vector_store_ids": ["vs_1"]}], "tools.0"),
        ("tools", [{"type": "code_interpreter", "container": {"type": "auto"}}], "tools.0"),
    ],
)
async def test_what_needs_stored_state_or_built_in_tools_is_a_400_naming_the_field(
    field: str, value: Any, param: str
) -> None:
    body = {"input": "hi", field: value} if field != "input" else {"input": value}
    async with client(echo_app()) as c:
        r = await c.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if field not in ("tools",):
        assert "send" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": ""},
        {"input": []},
        {"input": "hi", "max_output_tokens": 0},
        {"input": "hi", "temperature": 3},
        {"input": "hi", "stream": "yes"},
        {"input": [{"role": "robot", "content": "hi"}]},
        {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
        {"input": "hi", "tools": [WEATHER], "tool_choice": "sometimes"},
        {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
        {"input": "hi", "text": {"format": 5}},
        {"input": "hi", "text": {"format": {"type": "json_schema", "name": 5, "schema": {}}}},
        {"input": "hi", "reasoning": {"effort": "extreme"}},
        {"input": "hi", "metadata": {"a": [1]}},
        {"input": "hi", "user": 5},
        {"input": [{"role": "user"}]},
        {"input": [{"role": "user", "content": 5}]},
        {"input": [{"role": "user", "content": [5]}]},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": 5}]}]},
        {"input": [{"type": "reasoning", "summary": 5}]},
        {"input": [{"type": "function_call", "call_id": "a", "name": "f", "arguments": {}}]},
        {"input": [{"type": "custom_tool_call", "call_id": "a", "name": "f", "input": 5}]},
        {
            "input": [
                {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "a", "output": 5},
            ]
        },
        {"input": "hi", "tools": [{}]},
        {"input": "hi", "tools": [{"type": "custom", "name": 5}]},
        {"input": "hi", "tools": [{"type": "function", "name": "f", "description": 5}]},
        {
            "input": "hi",
            "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object", "properties": 5}}
            ],
            "tool_choice": "required",
        },
    ],
)
async def test_a_malformed_request_is_a_client_error_in_the_contracts_shape(
    body: dict[str, Any],
) -> None:
    async with client(echo_app()) as c:
        r = await c.post("/v1/responses", json=body)
    assert r.status_code in (400, 422), r.text
    assert set(r.json()["error"]) >= {"type", "message"}


# --- in front of Anthropic ---------------------------------------------------------

CODEX_BODY: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "input": [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Fix the bug."}]},
    ],
    "tools": [
        {"type": "function", "name": "shell", "description": "Run a command",
         "parameters": {"type": "object", "properties": {"command": {"type": "array",
                        "items": {"type": "string"}}}, "required": ["command"]},
         "strict": False},
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
        {"type": "namespace", "name": "mcp__docs", "tools": []},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "thread-1",
    "client_metadata": {"originator": "codex_exec"},
}  # fmt: skip


def anthropic_events(*events: dict[str, Any]) -> Callable[[dict[str, Any]], httpx.Response]:
    raw = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    return lambda body: httpx.Response(200, text=raw, headers={"content-type": "text/event-stream"})


PATCH = "*** Begin Patch\n*** End Patch"
PATCH_STREAM = anthropic_events(
    {"type": "message_start", "message": {**MESSAGE_WITH_TOOLS, "content": [],
     "stop_reason": None, "usage": {"input_tokens": 50, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use",
     "id": "toolu_01P", "name": "apply_patch", "input": {}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
     "partial_json": '{"input": "*** Begin'}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
     "partial_json": ' Patch\\n*** End Patch"}'}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 12}},
    {"type": "message_stop"},
)  # fmt: skip


async def test_a_codex_request_reaches_anthropic_with_its_developer_prompt_and_freeform_tool() -> (
    None
):
    provider = Provider(PATCH_STREAM)
    async with client(provider_app(provider, "anthropic")) as c:
        r = await c.post("/v1/responses", json=CODEX_BODY)
    assert r.status_code == 200, r.text
    sent = provider.bodies[0]
    system = sent["system"]
    assert "You are Codex." in (system if isinstance(system, str) else system[0]["text"])
    assert sent["messages"] == [{"role": "user", "content": "Fix the bug."}]
    tools = {t["name"]: t for t in sent["tools"]}
    assert set(tools) == {"shell", "apply_patch"}  # the namespace tool dropped
    assert tools["apply_patch"]["input_schema"]["properties"] == {"input": {"type": "string"}}
    events = conforming_events(r.text)
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert done[-1]["item"] == {
        "type": "custom_tool_call",
        "id": done[-1]["item"]["id"],
        "call_id": "toolu_01P",
        "name": "apply_patch",
        "input": PATCH,
        "status": "completed",
    }
    inputs = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert inputs[0]["input"] == PATCH
    assert events[-1]["response"]["output"] == [done[-1]["item"]]


async def test_the_access_line_names_what_a_translation_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="text_tool")
    provider = Provider(PATCH_STREAM)
    async with client(provider_app(provider, "anthropic")) as c:
        await c.post("/v1/responses", json={**CODEX_BODY, "metadata": {"a": "b"}})
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "access"]
    dropped = line.__dict__["dropped"]
    assert "tools.2 (namespace)" in dropped
    assert "include: reasoning.encrypted_content" in dropped
    assert {"client_metadata", "prompt_cache_key", "metadata"} <= set(dropped)


async def test_a_custom_tool_calls_output_goes_back_as_its_tool_result() -> None:
    provider = Provider(lambda body: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    history = [
        *CODEX_BODY["input"],
        {"type": "custom_tool_call", "call_id": "toolu_01P", "name": "apply_patch",
         "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "toolu_01P", "output": "Done!"},
    ]  # fmt: skip
    async with client(provider_app(provider, "anthropic")) as c:
        r = await c.post("/v1/responses", json={**CODEX_BODY, "input": history, "stream": False})
    assert r.status_code == 200, r.text
    assistant, result = provider.bodies[0]["messages"][1:]
    assert assistant["content"] == [
        {"type": "tool_use", "id": "toolu_01P", "name": "apply_patch",
         "input": {"input": "*** Begin Patch"}}
    ]  # fmt: skip
    assert result["content"][0]["type"] == "tool_result"
    assert result["content"][0]["tool_use_id"] == "toolu_01P"


@pytest.mark.parametrize(
    ("upstream", "kind", "body"),
    [
        ("anthropic_thinking.sse", "anthropic", {"input": "What is 27 * 453?"}),
        ("anthropic_tool_use.sse", "anthropic", {"input": "Paris?", "tools": [WEATHER]}),
        ("openai_tool_calls.sse", "openai", {"input": "Paris?", "tools": [WEATHER]}),
    ],
)
async def test_a_providers_golden_stream_becomes_the_golden_responses_events(
    upstream: str, kind: str, body: dict[str, Any]
) -> None:
    provider = Provider(sse_file(upstream))
    async with client(provider_app(provider, kind)) as c:
        r = await c.post("/v1/responses", json={**body, "stream": True})
    events = conforming_events(r.text)
    shape = [[e["type"], e.get("output_index")] for e in events]
    name = upstream.replace(".sse", ".responses.json")
    assert shape == golden(name)["events"], json.dumps(shape)
    final = events[-1]["response"]
    assert timeless(final["output"]) == golden(name)["output"]
    assert final["usage"] == golden(name)["usage"]


async def test_anthropics_signed_thinking_comes_back_to_it_and_goes_nowhere_else() -> None:
    provider = Provider(sse_file("anthropic_thinking.sse"))
    async with client(provider_app(provider, "anthropic")) as c:
        r = await c.post("/v1/responses", json={"input": "What is 27 * 453?", "stream": True})
    output = conforming_events(r.text)[-1]["response"]["output"]
    reasoning = [item for item in output if item["type"] == "reasoning"]
    assert reasoning[0]["summary"][0]["text"].startswith("Let me solve this")
    assert all(item["encrypted_content"].startswith("tt1:") for item in reasoning)
    history = [{"role": "user", "content": "What is 27 * 453?"}, *output,
               {"role": "user", "content": "And doubled?"}]  # fmt: skip

    back = Provider(lambda body: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    async with client(provider_app(back, "anthropic")) as c:
        r = await c.post("/v1/responses", json={"input": history})
    assert r.status_code == 200, r.text
    blocks = back.bodies[0]["messages"][1]["content"]
    assert blocks[0] == {
        "type": "thinking",
        "thinking": reasoning[0]["summary"][0]["text"],
        "signature": "EqQBCgIYAhIMGoldenSignatureA",
    }
    assert blocks[1] == {"type": "redacted_thinking", "data": "EmwKAhgBEgyGoldenRedacted"}

    elsewhere = Provider(lambda body: httpx.Response(200, json=golden("openai_completion.json")))
    async with client(provider_app(elsewhere, "openai")) as c:
        r = await c.post("/v1/responses", json={"input": history})
    assert r.status_code == 200, r.text
    assert "EqQBCgIYAhIMGoldenSignatureA" not in json.dumps(elsewhere.bodies[0])


async def test_a_provider_error_after_the_start_is_an_error_event_then_response_failed() -> None:
    raw = (GOLDEN / "anthropic_tool_use.sse").read_text()
    cut = raw[: raw.index("event: content_block_stop")]
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    cut += f"event: error\ndata: {json.dumps(overloaded)}\n\n"
    provider = Provider(
        lambda body: httpx.Response(200, text=cut, headers={"content-type": "text/event-stream"})
    )
    async with client(provider_app(provider, "anthropic")) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "stream": True})
    events = conforming_events(r.text)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]
    (message,) = failed["output"]  # the item open then: incomplete, with its text
    assert message["status"] == "incomplete"
    assert message["content"][0]["text"] == "Okay, let me check the weather."


# --- in front of an OpenAI-compatible server: translated -----------------------------


async def test_to_a_chat_completions_server_the_request_is_translated_field_by_field() -> None:
    provider = Provider(lambda body: httpx.Response(200, json=golden("openai_completion.json")))
    body = {
        "model": "gpt-5-mini",  # a model that reasons: gpt-4o-mini would not get the effort
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is here?"},
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"},
            ]},
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "plan", "schema": PLAN, "strict": True}},
        "reasoning": {"effort": "low"},
        "max_output_tokens": 50,
        "temperature": 0.5,
        "top_p": 0.9,
    }  # fmt: skip
    app = provider_app(provider, "openai", models=("gpt-4o-mini", "gpt-5-mini"))
    async with client(app) as c:
        r = await c.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    conforming_response(r.json())
    assert provider.bodies == [golden("responses_to_chat.json")]


# --- passed through to a service that serves Responses itself ----------------------

UPSTREAM_RESPONSE = {
    "id": "resp_upstream",
    "object": "response",
    "created_at": 1700000000,
    "status": "completed",
    "model": "gpt-5-mini-2025-08-07",
    "output": [
        {"type": "message", "id": "msg_up", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi!", "annotations": []}]},
    ],
    "usage": {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 400},
              "output_tokens": 200, "output_tokens_details": {"reasoning_tokens": 150},
              "total_tokens": 1200},
}  # fmt: skip


def openai_service(
    answer: Callable[[httpx.Request], httpx.Response], **changes: object
) -> Starlette:
    settings = Settings(
        provider="openai",
        openai_api_key=PROVIDER_KEY,
        model="gpt-5-mini",
        models=("gpt-5-mini", "text-embedding-3-small"),
        api_keys=(CLIENT_KEY,),
        max_retries=0,
    )
    return create_app(settings.replace(**changes), transport=httpx.MockTransport(answer))


async def test_to_api_openai_com_the_body_passes_through_stateless_and_is_accounted() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=UPSTREAM_RESPONSE)

    body = {**CODEX_BODY, "model": "gpt-5-mini", "stream": False}
    async with client(openai_service(answer)) as c:
        r = await c.post("/v1/responses", json=body)
        report = (await c.get("/usage")).json()
    assert r.status_code == 200, r.text
    assert r.json() == UPSTREAM_RESPONSE
    assert str(seen[0].url) == "https://api.openai.com/v1/responses"
    assert seen[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    sent = json.loads(seen[0].content)
    assert sent == {**body, "store": False}  # namespace tools and include kept for OpenAI
    cost = (600 * 0.25 + 400 * 0.025 + 200 * 2.00) / 1e6
    totals = report["by_model"]["gpt-5-mini-2025-08-07"]
    assert (totals["input_tokens"], totals["output_tokens"]) == (1000, 200)
    assert math.isclose(report["cost_usd"], cost)


async def test_a_passed_through_stream_is_reframed_and_settled_from_its_last_event() -> None:
    started = {**UPSTREAM_RESPONSE, "status": "in_progress", "output": [], "usage": None}
    created = {"type": "response.created", "sequence_number": 0, "response": started}
    delta = {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_up",
             "output_index": 0, "content_index": 0, "delta": "Hi!"}  # fmt: skip
    done = {"type": "response.completed", "sequence_number": 2, "response": UPSTREAM_RESPONSE}
    # One event's JSON over two data: lines, as SSE allows: re-framed as one.
    lines = [json.dumps(e, indent=1).replace("\n", "\ndata: ") for e in (created, delta, done)]
    raw = "".join(
        f"event: {e['type']}\ndata: {line}\n\n"
        for e, line in zip((created, delta, done), lines, strict=True)
    )
    answer = lambda request: httpx.Response(  # noqa: E731
        200, text=raw, headers={"content-type": "text/event-stream"}
    )
    async with client(openai_service(answer)) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "stream": True})
        report = (await c.get("/usage")).json()
    blocks = r.text.strip().split("\n\n")
    assert len(blocks) == 3 and all(len(b.split("\n")) == 2 for b in blocks)
    assert [json.loads(b.split("\n")[1][6:]) for b in blocks] == [created, delta, done]
    assert report["by_model"]["gpt-5-mini-2025-08-07"]["output_tokens"] == 200


async def test_openai_responses_off_translates_even_for_api_openai_com() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=golden("openai_completion.json"))

    async with client(openai_service(answer, openai_responses="off")) as c:
        r = await c.post("/v1/responses", json={"input": "hi"})
    assert r.status_code == 200, r.text
    assert seen == ["/v1/chat/completions"]
    conforming_response(r.json())


async def test_a_passed_through_providers_error_keeps_its_status_and_body() -> None:
    error = {"error": {"message": "Unsupported parameter: 'foo'", "type": "invalid_request_error",
                       "param": "foo", "code": "unsupported_parameter"}}  # fmt: skip
    answer = lambda request: httpx.Response(400, json=error)  # noqa: E731
    async with client(openai_service(answer)) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "foo": 1})
    assert r.status_code == 400
    assert r.json()["error"]["message"].endswith("Unsupported parameter: 'foo'")


# --- embeddings ---------------------------------------------------------------------


async def test_echo_embeddings_are_deterministic_unit_vectors_of_the_asked_size() -> None:
    texts = ["the cat sat", "the cat sat", "a dog ran far"]
    async with client(echo_app()) as c:
        r = await c.post(
            "/v1/embeddings",
            json={"model": "text-embedding-3-small", "input": texts, "dimensions": 64},
        )
        default = await c.post("/v1/embeddings", json={"model": "echo", "input": "x"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "list" and data["model"] == "text-embedding-3-small"
    vectors = [d["embedding"] for d in data["data"]]
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in data["data"])
    assert all(len(v) == 64 and math.isclose(sum(x * x for x in v), 1.0) for v in vectors)
    assert vectors[0] == vectors[1] != vectors[2]
    assert data["usage"] == {"prompt_tokens": 10, "total_tokens": 10}
    assert len(default.json()["data"][0]["embedding"]) == llm.ECHO_DIMENSIONS


async def test_texts_sharing_words_have_closer_echo_embeddings() -> None:
    async with client(echo_app()) as c:
        r = await c.post(
            "/v1/embeddings",
            json={"model": "echo", "input": ["red apple pie", "red apple tart", "tax law"]},
        )
    pie, tart, law = (d["embedding"] for d in r.json()["data"])

    def dot(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert dot(pie, tart) > dot(pie, law)


async def test_base64_embeddings_are_the_float32_vectors_the_sdks_decode() -> None:
    async with client(echo_app()) as c:
        floats = await c.post("/v1/embeddings", json={"model": "echo", "input": "hello world"})
        packed = await c.post(
            "/v1/embeddings",
            json={"model": "echo", "input": "hello world", "encoding_format": "base64"},
        )
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    expected = floats.json()["data"][0]["embedding"]
    assert all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(decoded, expected, strict=True))


async def test_token_id_inputs_are_embedded_as_one_or_many() -> None:
    async with client(echo_app()) as c:
        one = await c.post("/v1/embeddings", json={"model": "echo", "input": [1, 2, 3]})
        many = await c.post("/v1/embeddings", json={"model": "echo", "input": [[1, 2], [3]]})
    assert len(one.json()["data"]) == 1 and one.json()["usage"]["prompt_tokens"] == 3
    assert len(many.json()["data"]) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"input": ""},
        {"input": []},
        {"input": [""]},
        {"input": "x", "dimensions": 0},
        {"input": "x", "encoding_format": "int8"},
        {"input": [1, "a"]},
        {"input": ["x"] * 2049},
    ],
)
async def test_a_malformed_embeddings_request_is_a_400_as_openais(body: dict[str, Any]) -> None:
    async with client(echo_app()) as c:
        r = await c.post("/v1/embeddings", json={"model": "echo", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request" and r.json()["error"]["errors"]


async def test_embeddings_pass_through_to_an_openai_server_and_are_priced() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={
            "object": "list", "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
            "usage": {"prompt_tokens": 5000, "total_tokens": 5000},
        })  # fmt: skip

    body = {"model": "text-embedding-3-small", "input": "hi", "dimensions": 2, "user": "u1"}
    async with client(openai_service(answer)) as c:
        r = await c.post("/v1/embeddings", json=body)
        report = (await c.get("/usage")).json()
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["embedding"] == [0.6, 0.8]
    assert str(seen[0].url) == "https://api.openai.com/v1/embeddings"
    assert json.loads(seen[0].content) == body
    assert report["by_model"]["text-embedding-3-small"]["input_tokens"] == 5000
    assert math.isclose(report["cost_usd"], 5000 * 0.02 / 1e6)


async def test_a_big_embeddings_answer_is_relayed_as_it_came_and_counted_from_its_ends() -> None:
    vector = base64.b64encode(struct.pack("<3072f", *([0.5] * 3072))).decode()
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(2048)]
    raw = json.dumps({"object": "list", "data": data, "model": "text-embedding-3-small",
                      "usage": {"prompt_tokens": 7000, "total_tokens": 7000}}).encode()  # fmt: skip
    answers = iter([raw, b'{"data": [], "usage": {"prompt_tokens": 3}}', b"{not json}"])
    app = openai_service(lambda request: httpx.Response(200, content=next(answers)))
    body = {"model": "text-embedding-3-small", "input": ["a"] * 2048, "encoding_format": "base64"}
    async with client(app) as c:
        big = await c.post("/v1/embeddings", json=body)  # 34 MB: not parsed, not re-encoded
        small = await c.post("/v1/embeddings", json=body)
        broken = await c.post("/v1/embeddings", json=body)
        report = (await c.get("/usage")).json()
    assert big.status_code == 200 and big.content == raw
    assert small.status_code == 200 and small.json()["usage"] == {"prompt_tokens": 3}
    assert report["by_model"]["text-embedding-3-small"]["input_tokens"] == 7003
    assert broken.status_code == 502 and broken.json()["error"]["type"] == "upstream_error"


def test_the_usage_of_a_raw_answer_is_read_from_its_ends_or_not_at_all() -> None:
    read = openai_embeddings.raw_accounted
    assert read(b'{"model": "m", "data": [], "usage": {"prompt_tokens": 4}}') == Accounted(
        "m", Usage(input_tokens=4), "stop"
    )
    head = b'{"id": "x", "model": "vllm-e5", "data": [{"embedding": [0.1]}],'
    assert read(head + b' "usage": {"prompt_tokens": 2}}').model == "vllm-e5"  # type: ignore[union-attr]
    for raw in (b'{"data": []}', b"[1, 2]", b'{"usage": 5}', b"", b'{"usage": {'):
        assert read(raw) is None  # then parsed whole (or refused as not JSON)


async def test_anthropic_has_no_embeddings_and_says_so() -> None:
    provider = Provider(lambda body: httpx.Response(500))
    async with client(provider_app(provider, "anthropic")) as c:
        r = await c.post("/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 400
    assert "no embeddings endpoint" in r.json()["error"]["message"]
    assert provider.bodies == []


async def test_embeddings_and_responses_obey_the_keys_model_allowlist_and_token_limit() -> None:
    async with client(echo_app(models=("echo",))) as c:
        r = await c.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
        r = await c.post("/v1/responses", json={"model": "gpt-4o", "input": "x"})
        assert r.status_code == 404
    async with client(echo_app(token_limit=Rate(20, 60))) as c:
        r = await c.post("/v1/responses", json={"input": "x", "max_output_tokens": 100})
        assert r.status_code == 429, r.text
        r = await c.post("/v1/embeddings", json={"model": "echo", "input": "x " * 200})
        assert r.status_code == 429, r.text
        r = await c.post("/v1/embeddings", json={"model": "echo", "input": "x"})
        assert r.status_code == 200, r.text


async def test_models_retrieve_answers_for_an_allowed_model_and_404s_in_openais_shape() -> None:
    async with client(echo_app()) as c:
        found = await c.get("/v1/models/text-embedding-3-small")
        missing = await c.get("/v1/models/gpt-9")
    assert found.json() == {
        "id": "text-embedding-3-small", "object": "model", "created": 0, "owned_by": "echo"
    }  # fmt: skip
    assert missing.status_code == 404
    assert set(missing.json()["error"]) >= {"message", "type", "code", "param"}


# --- what a hostile review found ---------------------------------------------------


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "properties": 5},
        {"type": "object", "required": ["a"], "properties": {"a": {"$ref": "#"}}},
        {"type": "object", "required": ["a"],
         "properties": {"a": {"type": "array", "minItems": 1, "items": {"$ref": "#"}}}},
        {"type": "object", "required": ["a"], "properties": {"a": {"type": "_class__"}}},
        {"type": "object", "required": ["a"],
         "properties": {"a": {"type": "string", "minLength": 10**8}}},
        {"type": "object", "required": ["a"],
         "properties": {"a": {"type": "array", "minItems": 10**6}}},
    ],
)  # fmt: skip
async def test_a_schema_echo_cannot_follow_is_a_400_streamed_or_not(
    parameters: dict[str, Any],
) -> None:
    tool = {"type": "function", "name": "f", "parameters": parameters}
    async with client(echo_app()) as c:
        for stream in (False, True):
            body = {"input": "hi", "tools": [tool], "tool_choice": "required", "stream": stream}
            r = await c.post("/v1/responses", json=body)
            assert r.status_code in (200, 400), r.text
            if r.status_code == 200:  # "_class__" is no type: a string is made for it
                assert json.dumps(r.json() if not stream else conforming_events(r.text))
            else:
                assert r.json()["error"]["type"] == "invalid_request"


async def test_a_cut_passed_through_stream_fails_as_the_same_response() -> None:
    started = {**UPSTREAM_RESPONSE, "status": "in_progress", "output": [], "usage": None}
    events = [
        {"type": "response.created", "sequence_number": 0, "response": started},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
         "item": {"type": "message", "id": "msg_up", "status": "in_progress",
                  "role": "assistant", "content": []}},
    ]  # fmt: skip
    raw = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    answer = lambda request: httpx.Response(  # noqa: E731
        200, text=raw, headers={"content-type": "text/event-stream"}
    )
    async with client(openai_service(answer)) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "stream": True})
    got = [json.loads(b.split("\n")[1][6:]) for b in r.text.strip().split("\n\n")]
    assert [e["type"] for e in got] == [
        "response.created", "response.output_item.added", "error", "response.failed"
    ]  # fmt: skip
    assert [e["sequence_number"] for e in got] == [0, 1, 2, 3]
    assert got[-1]["response"]["id"] == "resp_upstream"
    assert got[-1]["response"]["output"][0]["id"] == "msg_up"


def chat_stream(*chunks: dict[str, Any]) -> Callable[[dict[str, Any]], httpx.Response]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini"}  # fmt: skip
    raw = "".join(f"data: {json.dumps({**head, **c})}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return lambda body: httpx.Response(200, text=raw, headers={"content-type": "text/event-stream"})


def _call(index: int, **fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]},
                         "finish_reason": None}]}  # fmt: skip


async def test_interleaved_tool_call_arguments_reach_their_own_items() -> None:
    provider = Provider(chat_stream(
        _call(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
        _call(1, id="call_b", type="function", function={"name": "get_time", "arguments": ""}),
        _call(0, function={"arguments": '{"location":'}),
        _call(1, function={"arguments": '{"zone":"UTC"}'}),
        _call(0, function={"arguments": '"Paris"}'}),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}},
    ))  # fmt: skip
    time_tool = {**WEATHER, "name": "get_time"}
    async with client(provider_app(provider, "openai")) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "stream": True,
                                               "tools": [WEATHER, time_tool]})  # fmt: skip
    events = conforming_events(r.text)
    calls = events[-1]["response"]["output"]
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", '{"location":"Paris"}'), ("get_time", '{"zone":"UTC"}')
    ]  # fmt: skip
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["output_index"]) for e in done] == [("get_weather", 0), ("get_time", 1)]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "bogus"}, "tool_choice"),
        ({"tool_choice": {"foo": 1}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
         "tool_choice.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "auto"}},
         "tool_choice.tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1.name"),
    ],
)  # fmt: skip
async def test_a_tool_choice_or_tools_that_do_not_add_up_are_a_400(
    body: dict[str, Any], param: str
) -> None:
    async with client(echo_app()) as c:
        r = await c.post("/v1/responses", json={"input": "hi", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_allowed_tools_narrow_what_may_be_called() -> None:
    time_tool = {**WEATHER, "name": "get_time"}
    choice = {"type": "allowed_tools", "mode": "required",
              "tools": [{"type": "function", "name": "get_time"}]}  # fmt: skip
    async with client(echo_app()) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "tools": [WEATHER, time_tool],
                                               "tool_choice": choice})  # fmt: skip
    data = conforming_response(r.json())
    assert [item["name"] for item in data["output"]] == ["get_time"]
    assert data["tool_choice"] == "required"


async def test_what_only_openai_reads_still_passes_through_to_it() -> None:
    seen: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=UPSTREAM_RESPONSE)

    body = {"input": "news?", "tools": [{"type": "web_search_preview"}],
            "tool_choice": {"type": "web_search_preview"},
            "input_future_field": [{"type": "something_new"}]}  # fmt: skip
    async with client(openai_service(answer)) as c:
        r = await c.post("/v1/responses", json=body)
        translated = await c.post(
            "/v1/responses",
            json={"input": [{"type": "something_new", "x": 1}]},
        )
    assert r.status_code == 200 and seen[0]["tool_choice"] == {"type": "web_search_preview"}
    assert translated.status_code == 200  # an item this module does not know: OpenAI's call
    async with client(provider_app(Provider(lambda b: httpx.Response(500)), "openai")) as c:
        refused = await c.post("/v1/responses", json={"input": "hi", **{
            k: v for k, v in body.items() if k != "input_future_field"}})  # fmt: skip
    # translated, the built-in tool (named first) cannot be served
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools.0"


async def test_echo_embeddings_are_bounded_in_size() -> None:
    async with client(echo_app()) as c:
        r = await c.post(
            "/v1/embeddings", json={"model": "echo", "input": ["a"] * 2048, "dimensions": 8192}
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


async def test_embeddings_never_fall_back_to_another_providers_vectors() -> None:
    answer = lambda request: httpx.Response(503, json={"error": {"message": "down"}})  # noqa: E731
    async with client(openai_service(answer, fallback_provider="echo", max_retries=0)) as c:
        r = await c.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert r.status_code in (502, 503) and "data" not in r.json()
