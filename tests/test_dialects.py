"""Translation through the hub, against golden transcripts (tests/golden/): Chat
Completions bodies to the Messages API and back, whole and streamed, with tools, tool
results, images, structured output and reasoning. The provider is a MockTransport
under the app's own client; each test reads what the app sent it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from starlette.applications import Starlette

import chat
from config import Settings
from dialects import anthropic_messages, openai_chat
from server import create_app
from tests.conftest import CLIENT_KEY, PROVIDER_KEY
from tests.helpers import (
    GOLDEN,
    MESSAGE_WITH_TOOLS,
    Provider,
    client,
    golden,
    openai_app,
    sse_file,
)
from usage import PriceTable

pytestmark = pytest.mark.anyio


def anthropic_app(provider: Provider, **changes: object) -> Starlette:
    settings = Settings(
        provider="anthropic",
        anthropic_api_key=PROVIDER_KEY,
        model="claude-haiku-4-5",
        models=("claude-haiku-4-5", "claude-sonnet-4-5", "claude-3-5-haiku"),
        api_keys=(CLIENT_KEY,),
        max_retries=0,
    ).replace(**changes)
    return create_app(settings, transport=httpx.MockTransport(provider))


def chunks_of(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: {") and not line.startswith('data: {"error"')
    ]


async def test_a_chat_body_with_tools_history_and_images_becomes_the_golden_messages_body() -> None:
    case = golden("chat_tools_request.json")
    provider = Provider(lambda body: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=case["chat"])
    assert r.status_code == 200, r.text
    assert provider.bodies == [case["anthropic"]]


async def test_a_whole_answer_with_a_tool_call_comes_back_as_tool_calls_with_cache_counts() -> None:
    provider = Provider(lambda body: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=golden("chat_tools_request.json")["chat"])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    assert choice["message"]["tool_calls"] == [
        {
            "id": "toolu_01A",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
        }
    ]
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == 45 and usage["prompt_tokens_details"]["cached_tokens"] == 30


async def test_the_golden_tool_use_stream_becomes_the_golden_chat_chunks() -> None:
    expected = golden("anthropic_tool_use.chat.json")
    provider = Provider(sse_file("anthropic_tool_use.sse"))
    body = {
        **golden("chat_tools_request.json")["chat"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    chunks = chunks_of(r.text)
    assert r.text.rstrip().endswith("data: [DONE]")
    deltas = [[c["choices"][0]["delta"], c["choices"][0]["finish_reason"]] for c in chunks[:-1]]
    assert deltas == expected["deltas"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected["usage"]
    assert provider.bodies[0]["stream"] is True


async def test_thinking_streams_as_reasoning_content_with_its_signature_and_comes_back() -> None:
    provider = Provider(sse_file("anthropic_thinking.sse"))
    body = {
        "model": "claude-sonnet-4-5",
        "stream": True,
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "27 * 453?"}],
    }
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=body)
        deltas = [c["choices"][0]["delta"] for c in chunks_of(r.text) if c["choices"]]
        thought = "".join(d.get("reasoning_content", "") for d in deltas)
        details = [x for d in deltas for x in d.get("reasoning_details", ())]
        text = "".join(d.get("content") or "" for d in deltas)
        # The client sends the turn back, as OpenRouter's convention has it.
        history = {
            "model": "claude-sonnet-4-5",
            "reasoning_effort": "low",
            "messages": [
                {"role": "user", "content": "27 * 453?"},
                {"role": "assistant", "content": text, "reasoning_details": details},
                {"role": "user", "content": "And 453 * 27?"},
            ],
        }
        provider.answer = lambda b: httpx.Response(200, json=MESSAGE_WITH_TOOLS)
        await c.post("/v1/chat/completions", json=history)
    assert provider.bodies[0]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert "temperature" not in provider.bodies[0]
    assert thought == "Let me solve this step by step:\n\n1. 27 * 453 = 12231"
    assert all(d["reasoning"] == d["reasoning_content"] for d in deltas if "reasoning" in d)
    origin = "anthropic:https://api.anthropic.com"
    assert details == [
        {
            "type": "reasoning.text",
            "text": "",
            "signature": "EqQBCgIYAhIMGoldenSignatureA",
            "format": origin,
        },
        {"type": "reasoning.encrypted", "data": "EmwKAhgBEgyGoldenRedacted", "format": origin},
    ]
    assert text == "27 * 453 = 12,231"
    sent_back = provider.bodies[1]["messages"][1]["content"]
    assert sent_back[0] == {
        "type": "thinking",
        "thinking": "",
        "signature": "EqQBCgIYAhIMGoldenSignatureA",
    }
    assert sent_back[1] == {"type": "redacted_thinking", "data": "EmwKAhgBEgyGoldenRedacted"}


async def test_signed_thinking_of_another_origin_is_not_sent() -> None:
    provider = Provider(lambda body: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    history = {
        "model": "claude-haiku-4-5",
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "hello",
                "reasoning_details": [
                    {
                        "type": "reasoning.text",
                        "text": "t",
                        "signature": "s",
                        "format": "anthropic:https://elsewhere",
                    }
                ],
            },
            {"role": "user", "content": "again"},
        ],
    }
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=history)
    assert r.status_code == 200
    assert provider.bodies[0]["messages"][1] == {"role": "assistant", "content": "hello"}


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "days"],
}


async def test_a_json_schema_becomes_output_config_for_models_that_take_it() -> None:
    answer = {
        **MESSAGE_WITH_TOOLS,
        "content": [{"type": "text", "text": '{"city": "Paris"}'}],
        "stop_reason": "end_turn",
    }
    provider = Provider(lambda body: httpx.Response(200, json=answer))
    body = {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "Paris"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "plan", "strict": True, "schema": SCHEMA},
        },
    }
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["content"] == '{"city": "Paris"}'
    cut = provider.bodies[0]["output_config"]["format"]
    assert cut["type"] == "json_schema" and "name" not in cut and "strict" not in cut
    assert cut["schema"]["additionalProperties"] is False
    assert cut["schema"]["properties"]["days"] == {
        "type": "integer",
        "description": "{minimum: 1, maximum: 7}",
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_a_json_schema_is_a_forced_tool_for_older_models_unwrapped_into_the_text(
    stream: bool,
) -> None:
    def answer(body: dict[str, Any]) -> httpx.Response:
        name = body["tool_choice"]["name"]
        if not body.get("stream"):
            whole = {
                **MESSAGE_WITH_TOOLS,
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_x",
                        "name": name,
                        "input": {"city": "Paris", "days": 2},
                    }
                ],
            }
            return httpx.Response(200, json=whole)
        events = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "m",
                        "model": "claude-3-5-haiku",
                        "usage": {"input_tokens": 3},
                    },
                },
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {
                        "type": "tool_use",
                        "id": "toolu_x",
                        "name": name,
                        "input": {},
                    },
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": '{"city": "Paris",'},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": ' "days": 2}'},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "tool_use"},
                    "usage": {"output_tokens": 9},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        raw = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)
        return httpx.Response(
            200, content=raw.encode(), headers={"content-type": "text/event-stream"}
        )

    provider = Provider(answer)
    body = {
        "model": "claude-3-5-haiku",
        "stream": stream,
        "messages": [{"role": "user", "content": "Paris"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "plan", "schema": SCHEMA},
        },
    }
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    sent = provider.bodies[0]
    assert "output_config" not in sent and sent["tool_choice"] == {
        "type": "tool",
        "name": "json_answer",
        "disable_parallel_tool_use": True,
    }
    assert sent["tools"] == [
        {
            "name": "json_answer",
            "input_schema": SCHEMA,
            "description": "Give your answer by calling this tool: its input is the answer.",
        }
    ]
    if stream:
        deltas = [c["choices"][0] for c in chunks_of(r.text) if c["choices"]]
        text = "".join(d["delta"].get("content") or "" for d in deltas)
        finish = deltas[-1]["finish_reason"]
    else:
        text = r.json()["choices"][0]["message"]["content"]
        finish = r.json()["choices"][0]["finish_reason"]
    assert json.loads(text) == {"city": "Paris", "days": 2} and finish == "stop"


async def test_json_object_is_an_instruction_not_a_schema() -> None:
    provider = Provider(lambda body: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    body = {
        "model": "claude-haiku-4-5",
        "response_format": {"type": "json_object"},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
    }
    async with client(anthropic_app(provider)) as c:
        await c.post("/v1/chat/completions", json=body)
    sent = provider.bodies[0]
    assert "output_config" not in sent and "tools" not in sent
    assert sent["system"].startswith("Be brief.\n\nAnswer with one JSON object")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"type": "tool", "name": "get_time"},
        ),
    ],
)
async def test_tool_choice_maps_both_ways(choice: Any, expected: dict[str, Any]) -> None:
    provider = Provider(lambda body: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    body = {
        **golden("chat_tools_request.json")["chat"],
        "tool_choice": choice,
        "parallel_tool_calls": True,
        "reasoning_effort": "high",
    }
    async with client(anthropic_app(provider)) as c:
        await c.post("/v1/chat/completions", json=body)
    assert provider.bodies[0]["tool_choice"] == expected
    # A forced tool turns thinking off; so does a tool-call turn with no signed thinking.
    assert "thinking" not in provider.bodies[0]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
            "messages.0.tool_call_id",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ],
            },
            "tools.0.function.parameters",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            },
            "messages.0.content.0",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                    }
                ]
            },
            "content",
        ),
    ],
)
async def test_what_cannot_be_translated_is_a_400_naming_it(
    body: dict[str, Any], param: str
) -> None:
    provider = Provider(lambda b: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    async with client(anthropic_app(provider)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert provider.bodies == []  # refused before any provider call


async def test_arguments_that_are_not_json_are_a_400_never_a_500() -> None:
    provider = Provider(lambda b: httpx.Response(200, json=MESSAGE_WITH_TOOLS))
    body = {
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{not json"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
    }
    async with client(anthropic_app(provider)) as c:
        whole = await c.post("/v1/chat/completions", json=body)
        streamed = await c.post("/v1/chat/completions", json={**body, "stream": True})
    for r in (whole, streamed):
        assert r.status_code == 400 and "not a JSON object" in r.json()["error"]["message"]


def test_the_openai_golden_tool_call_stream_decodes_to_chat_events() -> None:
    decoder = openai_chat.StreamDecoder("gpt-4o-mini")
    events: list[chat.Event] = []
    for block in (GOLDEN / "openai_tool_calls.sse").read_text().split("\n\n"):
        if block.startswith("data: "):
            events += decoder.feed("message", block[6:])
    end = decoder.end()
    assert decoder.done and end is not None
    assert events[1:] == [
        chat.ToolCallStart(0, "call_GoldenWeather", "get_weather"),
        chat.ToolCallDelta(0, '{"'),
        chat.ToolCallDelta(0, 'location": "Paris, France"}'),
        chat.ToolCallStart(1, "call_GoldenTime", "get_time"),
        chat.ToolCallDelta(1, "{}"),
    ]
    assert end.finish_reason == "tool_calls"
    assert (end.usage.input_tokens, end.usage.output_tokens) == (82, 38)


def test_a_chat_request_encodes_for_openai_with_tools_results_and_images() -> None:
    request = chat.Request(
        model="gpt-4o-mini",
        messages=(
            chat.Message("developer", (chat.Text("Be brief."),)),
            chat.Message("assistant", (chat.ToolCall("c1", "f", '{"a": 1}'),)),
            chat.Message(
                "tool", (chat.ToolResult("c1", (chat.Text("done"), chat.Image("https://x/i.png"))),)
            ),
        ),
        tools=(chat.Tool("f", "does f", {"type": "object", "properties": {}}, strict=True),),
        tool_choice=chat.ToolChoice("tool", "f", parallel=False),
        response_format=chat.ResponseFormat("json_schema", "out", {"type": "object"}, strict=True),
        reasoning=chat.ReasoningConfig(budget_tokens=20000),
        max_tokens=100,
    )
    body = openai_chat.encode_request(request, stream=False)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x/i.png"}}],
        },
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False and body["reasoning_effort"] == "high"
    assert body["max_completion_tokens"] == 100
    assert body["response_format"]["json_schema"] == {
        "name": "out",
        "schema": {"type": "object"},
        "strict": True,
    }


# --- echo, asked for tools and schemas -------------------------------------------------


def echo_app() -> Starlette:
    return create_app(Settings(provider="echo", api_keys=(CLIENT_KEY,)))


NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3},
        "when": {"type": "string", "format": "date-time"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "size": {"type": "integer", "minimum": 10, "maximum": 20},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "kind": {"enum": ["a", "b"]},
        "where": {"$ref": "#/$defs/place"},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
    },
    "required": ["name", "when", "tags", "size", "ratio", "kind", "where", "maybe"],
    "$defs": {
        "place": {
            "type": "object",
            "properties": {"lat": {"type": "number"}},
            "required": ["lat"],
            "additionalProperties": False,
        }
    },
}


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_calls_a_tool_with_arguments_valid_against_its_schema(stream: bool) -> None:
    tools = [{"type": "function", "function": {"name": "plan", "parameters": NESTED}}]
    body = {
        "model": "echo",
        "stream": stream,
        "tools": tools,
        "tool_choice": "required",
        "messages": [{"role": "user", "content": "make a plan"}],
    }
    async with client(echo_app()) as c:
        r = await c.post("/v1/chat/completions", json=body)
    if stream:
        deltas = [c["choices"][0] for c in chunks_of(r.text) if c["choices"]]
        calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
        assert calls[0]["id"].startswith("call_") and calls[0]["function"]["arguments"] == ""
        arguments = "".join(c["function"]["arguments"] for c in calls)
        finish = deltas[-1]["finish_reason"]
    else:
        call = r.json()["choices"][0]["message"]["tool_calls"][0]
        arguments, finish = call["function"]["arguments"], r.json()["choices"][0]["finish_reason"]
    jsonschema.validate(json.loads(arguments), NESTED)
    assert finish == "tool_calls"


async def test_echo_answers_a_tool_result_with_its_words_and_a_schema_with_valid_json() -> None:
    tools = [{"type": "function", "function": {"name": "plan", "parameters": NESTED}}]
    after = {
        "model": "echo",
        "tools": tools,
        "messages": [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "plan", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "the plan is ready"},
        ],
    }
    structured = {
        "model": "echo",
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": NESTED}},
    }
    async with client(echo_app()) as c:
        told = (await c.post("/v1/chat/completions", json=after)).json()
        shaped = (await c.post("/v1/chat/completions", json=structured)).json()
    assert told["choices"][0]["message"]["content"] == "the plan is ready"
    assert told["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(shaped["choices"][0]["message"]["content"]), NESTED)


def test_a_schema_cut_for_anthropic_keeps_what_it_takes() -> None:
    import schemas

    cut = schemas.for_anthropic(NESTED)
    assert (
        cut["additionalProperties"] is False
        and cut["$defs"]["place"]["additionalProperties"] is False
    )
    assert cut["properties"]["when"] == {"type": "string", "format": "date-time"}
    assert cut["properties"]["tags"]["description"] == "{minItems: 2}"
    assert cut["properties"]["maybe"] == {"anyOf": [{"type": "null"}, {"type": "boolean"}]}


def test_a_tool_id_anthropic_would_refuse_is_made_legal_the_same_way_twice() -> None:
    assert anthropic_messages.legal_id("call_ok-1") == "call_ok-1"
    odd = anthropic_messages.legal_id("call.with:odd/chars")
    assert odd == anthropic_messages.legal_id("call.with:odd/chars")
    assert odd.startswith("call_with_odd_chars_") and len(odd) <= 64


CLAUDE_CODE_THINKING = {
    "max_tokens": 2000,
    "thinking": {"type": "adaptive"},
    "output_config": {"effort": "high"},
    "messages": [{"role": "user", "content": "Plan the trip"}],
}


@pytest.mark.parametrize(("model", "sent"), [("gpt-4.1", False), ("gpt-5-mini", True)])
async def test_reasoning_goes_only_to_a_model_that_reasons(
    model: str, sent: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="text_tool")
    provider = Provider(lambda body: httpx.Response(200, json=golden("openai_completion.json")))
    app = openai_app(provider, models=("gpt-4.1", "gpt-5-mini"), model="gpt-4.1")
    async with client(app) as c:
        r = await c.post("/v1/messages", json={**CLAUDE_CODE_THINKING, "model": model})
    assert r.status_code == 200, r.text
    assert ("reasoning_effort" in provider.bodies[0]) is sent
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "access"]
    assert ("reasoning" in (line.__dict__.get("dropped") or [])) is not sent


def test_the_prices_file_says_which_models_reason(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-4.1"]\nreasoning = true\n\n[models."my-local"]\n'
                      'input = 0.1\noutput = 0.2\nreasoning = false\n')  # fmt: skip
    table = PriceTable.from_file(prices)
    assert table.reasons("gpt-4.1") is True and table.price("gpt-4.1") is not None
    assert table.reasons("my-local") is False and table.reasons("gpt-4o-2024-08-06") is False
    assert table.reasons("claude-sonnet-4-5-20250929") is True and table.reasons("vllm-x") is None
    prices.write_text('[models."gpt-4.1"]\nreasoning = "yes"\n')
    with pytest.raises(ValueError, match="reasoning"):
        PriceTable.from_file(prices)


# --- real compatible servers (llama.cpp's llama-server): what they do differently ----------

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["city", "n"],
}
STRUCTURED = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Where?"}],
    "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
}


def llama_server_answer(body: dict[str, Any], twice: bool = False) -> httpx.Response:
    """What llama-server's /v1/messages answers a forced tool: text first, then the call;
    `twice`, a second call after it (llama-server does not read disable_parallel_tool_use)."""
    call = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": body["tool_choice"]["name"],
        "input": {"city": "Paris", "n": 1},
    }
    again = {**call, "id": "toolu_2", "input": {"city": "Rome", "n": 2}}
    if not body.get("stream"):
        return httpx.Response(
            200,
            json={
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "tiny",
                "content": [{"type": "text", "text": "Hello world."}, call, *[again][:twice]],
                "stop_reason": "tool_use",
                "usage": {"input_tokens": 5, "output_tokens": 9},
            },
        )
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "tiny",
                "content": [],
                "usage": {"input_tokens": 5},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Hello"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": " world."},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {**call, "input": {}}},
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"city": "Paris", '},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '"n": 1}'},
        },
        {"type": "content_block_stop", "index": 1},
    ]
    if twice:
        events += [
            {"type": "content_block_start", "index": 2, "content_block": {**again, "input": {}}},
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome", "n": 2}'},
            },
            {"type": "content_block_stop", "index": 2},
        ]
    events += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    sse = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


@pytest.mark.parametrize("twice", [False, True], ids=["one call", "called twice"])
async def test_a_forced_answer_tool_is_the_answer_alone_whole_and_streamed(twice: bool) -> None:
    provider = Provider(lambda body: llama_server_answer(body, twice))
    app = anthropic_app(
        provider, model="tiny", models=("tiny",), anthropic_base_url="http://llama.test"
    )
    async with client(app) as c:
        whole = await c.post("/v1/chat/completions", json=STRUCTURED)
        streamed = await c.post("/v1/chat/completions", json={**STRUCTURED, "stream": True})
    assert provider.bodies[0]["tool_choice"]["name"] == anthropic_messages.ANSWER_TOOL
    assert provider.bodies[0]["tool_choice"]["disable_parallel_tool_use"] is True
    message = whole.json()["choices"][0]
    assert json.loads(message["message"]["content"]) == {"city": "Paris", "n": 1}
    assert message["finish_reason"] == "stop" and "tool_calls" not in message["message"]
    chunks = chunks_of(streamed.text)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert json.loads(text) == {"city": "Paris", "n": 1}
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


async def test_a_named_tool_choice_is_required_with_that_tool_alone_but_for_openai() -> None:
    tools: list[dict[str, Any]] = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    ask: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Paris?"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }
    sent = []
    for base in ("http://llama.test/v1", "https://api.openai.com/v1"):
        provider = Provider(lambda body: httpx.Response(200, json=golden("openai_completion.json")))
        app = openai_app(provider, openai_base_url=base)
        async with client(app) as c:
            # /v1/messages is translated for both (Chat Completions would pass through)
            r = await c.post(
                "/v1/messages",
                json={
                    "model": "gpt-4o-mini",
                    "max_tokens": 50,
                    "messages": ask["messages"],
                    "tools": [
                        {"name": t["function"]["name"], "input_schema": {"type": "object"}}
                        for t in tools
                    ],
                    "tool_choice": {"type": "tool", "name": "get_time"},
                },
            )
        assert r.status_code == 200, r.text
        sent.append(provider.bodies[0])
    llama, openai = sent
    assert llama["tool_choice"] == "required"
    assert [t["function"]["name"] for t in llama["tools"]] == ["get_time"]
    assert openai["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert len(openai["tools"]) == 2


async def test_a_named_or_forced_tool_goes_alone_to_anthropic_protocol_servers_not_anthropic() -> (
    None
):
    """llama.cpp's /v1/messages takes `{"type": "tool", "name": ...}` as "any tool": to a
    server other than Anthropic's, the tool that must be called is the only one sent."""
    tools: list[dict[str, Any]] = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    named = {
        "model": "claude-3-5-haiku",
        "messages": [{"role": "user", "content": "Paris?"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }
    answered = {**STRUCTURED, "model": "claude-3-5-haiku", "tools": tools}  # fmt: skip
    sent: dict[str, list[dict[str, Any]]] = {}
    for base in ("http://llama.test", "https://api.anthropic.com"):
        provider = Provider(lambda body: llama_server_answer(body))
        async with client(anthropic_app(provider, anthropic_base_url=base)) as c:
            for ask in (named, answered):
                r = await c.post("/v1/chat/completions", json=ask)
                assert r.status_code == 200, r.text
        sent[base] = provider.bodies
    (llama_named, llama_answer), (own_named, own_answer) = sent.values()
    assert llama_named["tool_choice"] == own_named["tool_choice"] == {
        "type": "tool", "name": "get_time"}  # fmt: skip
    assert [t["name"] for t in llama_named["tools"]] == ["get_time"]
    assert [t["name"] for t in own_named["tools"]] == ["get_weather", "get_time"]
    assert llama_answer["tool_choice"]["name"] == own_answer["tool_choice"]["name"] == "json_answer"
    assert [t["name"] for t in llama_answer["tools"]] == ["json_answer"]
    assert [t["name"] for t in own_answer["tools"]] == ["get_weather", "get_time", "json_answer"]


def endless(head: bytes, frame: bytes, times: int) -> Callable[[dict[str, Any]], httpx.Response]:
    """A provider's stream: `head`, then `frame` `times` times."""

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(times):
            yield frame

    return lambda sent: httpx.Response(
        200, content=body(), headers={"content-type": "text/event-stream"}
    )


async def test_a_translated_stream_is_cut_at_its_cap_whatever_kind_of_delta_carries_it() -> None:
    """Another choice's deltas (an OpenAI-compatible server asked for one) and delta
    kinds no format here reads (OpenAI's audio, Anthropic's citations_delta) count
    against max_tokens:
    a provider streaming them without end is stopped there."""
    other_choice = b'data: {"id":"c","model":"m","choices":[{"index":1,"delta":{"content":"' + (
        b"x" * 200 + b'"}}]}\n\n'
    )
    start = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    audio = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"audio":{"data":"' + (
        b"A" * 200 + b'"}}}]}\n\n'
    )  # the first choice, in a kind of delta no format here reads
    encrypted = (
        b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"reasoning_details":'
        b'[{"type":"reasoning.encrypted","data":"' + b"Z" * 200 + b'"}]}}]}\n\n'
    )  # reasoning only its origin reads
    for frame in (other_choice, audio, encrypted):
        provider = Provider(endless(start, frame, 100_000))
        async with client(openai_app(provider)) as c:
            r = await c.post(
                "/v1/messages",
                json={
                    "model": "gpt-4o-mini",
                    "max_tokens": 20,
                    "stream": True,
                    "messages": [{"role": "user", "content": "go"}],
                },
            )
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-2]["delta"]["stop_reason"] == "max_tokens"

    citation = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"citations_delta","citation":{"type":"char_location",'
        b'"cited_text":"' + b"y" * 200 + b'"}}}\n\n'
    )
    opening = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
        b'"model":"claude-haiku-4-5","usage":{"input_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
    )
    provider = Provider(endless(opening, citation, 100_000))
    async with client(anthropic_app(provider)) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": "claude-haiku-4-5",
                "max_tokens": 20,
                "stream": True,
                "messages": [{"role": "user", "content": "go"}],
            },
        )
    chunks = chunks_of(r.text)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def openrouter_reasoning(chunks: int, plain: bool) -> bytes:
    """OpenRouter's stream of reasoning: `reasoning_details` repeating `reasoning`'s
    text (`plain`) or alone, then the answer."""
    out = [b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n']
    for _ in range(chunks):
        detail = {"type": "reasoning.text", "text": "abcd", "format": "anthropic-claude-v1",
                  "index": 0}  # fmt: skip
        delta: dict[str, Any] = {"reasoning_details": [detail]}
        if plain:
            delta["reasoning"] = "abcd"
        out.append(b"data: " + json.dumps({"id": "c", "model": "m", "choices": [
            {"index": 0, "delta": delta}]}).encode() + b"\n\n")  # fmt: skip
    out.append(b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"done"},'
               b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')  # fmt: skip
    return b"".join(out)


@pytest.mark.parametrize("plain", [True, False], ids=["with reasoning", "details alone"])
async def test_openrouters_reasoning_details_are_read_once_and_counted_once(plain: bool) -> None:
    """1,700 reasoning chunks of 4 characters fit in max_tokens 2,000 when counted once;
    the details that repeat `reasoning` are not counted again (they were, and the
    answer was cut), and details alone are the reasoning."""
    sse_body = openrouter_reasoning(1700, plain)
    provider = Provider(
        lambda sent: httpx.Response(
            200, content=sse_body, headers={"content-type": "text/event-stream"}
        )
    )
    async with client(openai_app(provider)) as c:
        r = await c.post(
            "/v1/messages",
            json={"model": "gpt-4o-mini", "max_tokens": 2000, "stream": True,
                  "messages": [{"role": "user", "content": "go"}]},
        )  # fmt: skip
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    thought = "".join(e["delta"].get("thinking", "") for e in events if e.get("delta"))
    assert thought == "abcd" * 1700


async def test_reasoning_details_alone_are_the_reasoning_of_a_whole_answer() -> None:
    answer = {"id": "c", "object": "chat.completion", "model": "m", "choices": [{
        "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "done",
        "reasoning_details": [{"type": "reasoning.text", "text": "first this",
                               "format": "anthropic-claude-v1"},
                              {"type": "reasoning.encrypted", "data": "opaque"}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5}}  # fmt: skip
    provider = Provider(lambda sent: httpx.Response(200, json=answer))
    async with client(openai_app(provider)) as c:
        r = await c.post("/v1/messages", json={"model": "gpt-4o-mini", "max_tokens": 100,
                         "messages": [{"role": "user", "content": "go"}]})  # fmt: skip
    blocks = r.json()["content"]
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == "first this" and blocks[1]["text"] == "done"


async def test_a_stream_that_leaves_message_start_out_gets_one() -> None:
    """llama.cpp's server sometimes starts its /v1/messages stream at content_block_start
    (sampled answers): passed through, the client's SDK, which needs message_start
    first, gets one of ours; translated, the answer starts all the same."""
    events = [
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hello"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"input_tokens": 3, "output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    sse = "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events)
    provider = Provider(
        lambda body: httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
    )
    ask = {"model": "claude-haiku-4-5", "max_tokens": 20, "stream": True,
           "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    async with client(anthropic_app(provider)) as c:
        relayed = await c.post("/v1/messages", json=ask)
        translated = await c.post("/v1/chat/completions", json=ask)
    names = [line[7:] for line in relayed.text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", *(n for n, _ in events)]
    snapshot, buffers = None, dict[int, bytes]()
    for line in relayed.text.splitlines():
        if line.startswith("data: "):
            snapshot = accumulate_event(event=json.loads(line[6:]), current_snapshot=snapshot,
                                        json_bufs=buffers)  # fmt: skip
    assert snapshot is not None and snapshot.content[0].text == "Hello"  # type: ignore[union-attr]
    chunks = chunks_of(translated.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello"
