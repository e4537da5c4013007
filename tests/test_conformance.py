"""Every answer checked against the official machine-readable descriptions, strictly:
the Anthropic routes against the Anthropic TypeScript SDK's own types (tests/sdk_types.py:
whole messages, every stream event, token counts, models, errors), through echo, a
translating provider (an OpenAI-compatible server) and a passing-through one (Anthropic,
answering in the current shape); the OpenAI routes (Chat Completions whole and streamed,
embeddings, models, errors) against OpenAI's OpenAPI document (tests/openai_spec.py),
through echo and a translating provider. /v1/responses is checked against the Open
Responses schema and the openai SDK's types (tests/helpers.py).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import Settings
from dialects.anthropic_messages import message_object, model_object
from server import create_app
from tests.conftest import CLIENT_KEY, PROVIDER_KEY
from tests.helpers import client, golden
from tests.openai_spec import openai_schemas
from tests.sdk_types import Types, anthropic_types
from usage import Usage

pytestmark = pytest.mark.anyio

TYPES = anthropic_types()
VERSION = {"anthropic-version": "2023-06-01"}
TOOL = {"name": "get_weather", "input_schema": {"type": "object",
        "properties": {"location": {"type": "string"}}, "required": ["location"]}}  # fmt: skip


def conforming(value: Any, interface: str, types: Types = TYPES) -> None:
    wrong = types.errors(value, interface)
    assert not wrong, "\n".join(wrong[:10])


def conforming_error(body: dict[str, Any]) -> None:
    """An error body: `ErrorResponse`, and its `error.details` an `ErrorDetails`. The
    SDKs read `details` from the body (their APIError's `details` and `error_code`),
    though the error objects' own interfaces do not name it."""
    inner = dict(body["error"])
    details = inner.pop("details", None)
    if details is not None:
        conforming(details, "ErrorDetails")
    conforming({**body, "error": inner}, "ErrorResponse")


def _openai(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    completion = golden("openai_completion.json")
    if not body.get("stream"):
        return httpx.Response(200, json=completion)
    text = completion["choices"][0]["message"]["content"]
    chunks = [{"id": "c", "model": body["model"], "choices": [{"index": 0, "delta": d,
               "finish_reason": f}]} for d, f in (({"role": "assistant"}, None),
               ({"content": text}, None), ({}, "stop"))]  # fmt: skip
    chunks.append({"id": "c", "model": body["model"], "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 3}})  # fmt: skip
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


def _anthropic(request: httpx.Request) -> httpx.Response:
    """An Anthropic answering in the current shape (what is passed through is its own)."""
    body = json.loads(request.content)
    if request.url.path.endswith("/count_tokens"):
        return httpx.Response(200, json={"input_tokens": 12})
    text = {"type": "text", "text": "Hello there", "citations": None}
    message = message_object("msg_01Up", body["model"], [text],
                             Usage(input_tokens=9, output_tokens=2), "end_turn")  # fmt: skip
    if not body.get("stream"):
        return httpx.Response(200, json=message)
    started = {**message, "content": [], "stop_reason": None}
    events = [
        ("message_start", {"type": "message_start", "message": started}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {**text, "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hello there"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
         "stop_sequence": None, "stop_details": None, "container": None},
         "usage": {"input_tokens": 9, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0, "output_tokens": 2,
                   "output_tokens_details": None, "server_tool_use": None}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    sse = "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events)
    return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


PROVIDERS: dict[str, dict[str, Any]] = {
    "echo": {"provider": "echo", "model": "echo"},
    "translated": {"provider": "openai", "openai_api_key": PROVIDER_KEY,
                   "openai_base_url": "http://vllm.test/v1", "model": "gpt-5-mini"},
    "passed-through": {"provider": "anthropic", "anthropic_api_key": PROVIDER_KEY,
                       "model": "claude-haiku-4-5"},
}  # fmt: skip


def app_for(kind: str, tmp_path: Path) -> Any:
    settings = Settings(api_keys=(CLIENT_KEY,), max_retries=0,
                        ledger_url=str(tmp_path / "l.db"), **PROVIDERS[kind])  # fmt: skip
    handler = _anthropic if kind == "passed-through" else _openai
    return create_app(settings, transport=httpx.MockTransport(handler))


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        head, _, data = block.partition("\n")
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


@pytest.mark.parametrize("kind", list(PROVIDERS))
async def test_every_messages_answer_is_the_sdks_types_strictly(kind: str, tmp_path: Path) -> None:
    app = app_for(kind, tmp_path)
    model = PROVIDERS[kind]["model"]
    ask = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]}
    async with client(app) as c:
        whole = await c.post("/v1/messages", json=ask, headers=VERSION)
        assert whole.status_code == 200, whole.text
        conforming(whole.json(), "Message")
        streamed = await c.post("/v1/messages", json={**ask, "stream": True}, headers=VERSION)
        seen = events(streamed.text)
        for name, event in seen:
            if name != "ping":
                assert name == event["type"]
                conforming(event, "RawMessageStreamEvent")
        started = seen[0][1]["message"]["usage"]
        if kind != "passed-through":  # the prompt's estimate, not 0; the count at the end
            assert started["input_tokens"] > 0
        threaded = await c.post("/v1/messages", json={**ask, "thread": {"type": "create"}})
        conforming(threaded.json(), "Message")
        counted = await c.post("/v1/messages/count_tokens", json=ask, headers=VERSION)
        conforming(counted.json(), "MessageTokensCount")
        one = await c.get(f"/v1/models/{model}", headers=VERSION)
        conforming(one.json(), "ModelInfo")
        assert one.json()["lifecycle"] == "active"
        listed = (await c.get("/v1/models", headers=VERSION)).json()
        assert set(listed) == {"data", "has_more", "first_id", "last_id"}
        for info in listed["data"]:
            conforming(info, "ModelInfo")
        errors = [
            await c.post("/v1/messages", json=ask, headers={"x-api-key": "wrong", **VERSION}),
            await c.post("/v1/messages", json={**ask, "model": "nope"}, headers=VERSION),
            await c.post("/v1/messages", json={**ask, "max_tokens": -1}, headers=VERSION),
            await c.post("/v1/messages", headers=VERSION,
                         json={**ask, "thread": {"type": "continue", "previous_message_id": "x"}}),
            await c.get("/v1/models/nope", headers=VERSION),
        ]  # fmt: skip
    app.state.ledger.close()
    assert [e.status_code for e in errors] == [401, 404, 400, 404, 404]
    for error in errors:
        conforming_error(error.json())


async def test_a_translated_tool_call_is_the_sdks_types_whole_and_streamed(
    tmp_path: Path,
) -> None:
    app = app_for("echo", tmp_path)
    ask = {"model": "echo", "max_tokens": 50, "tools": [TOOL],
           "tool_choice": {"type": "tool", "name": "get_weather"},
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}  # fmt: skip
    async with client(app) as c:
        whole = (await c.post("/v1/messages", json=ask)).json()
        streamed = await c.post("/v1/messages", json={**ask, "stream": True})
    app.state.ledger.close()
    conforming(whole, "Message")
    assert whole["content"][-1]["caller"] == {"type": "direct"}
    for name, event in events(streamed.text):
        if name != "ping":
            conforming(event, "RawMessageStreamEvent")


def test_the_checker_refuses_a_missing_field_an_unknown_one_and_a_wrong_literal() -> None:
    info = model_object("m")
    assert TYPES.errors(info, "ModelInfo") == []
    assert TYPES.errors({k: v for k, v in info.items() if k != "lifecycle"}, "ModelInfo")
    assert TYPES.errors({**info, "extra": 1}, "ModelInfo")
    assert TYPES.errors({**info, "lifecycle": "gone"}, "ModelInfo")
    assert TYPES.errors({**info, "max_tokens": "many"}, "ModelInfo")


# --- the OpenAI routes, against OpenAI's OpenAPI document (tests/openai_spec.py) ----------

OPENAI = openai_schemas()


def conforms_to_openai(value: Any, name: str) -> None:
    wrong = OPENAI.errors(value, name)
    assert not wrong, "\n".join(wrong[:10])


OPENAI_SIDE: dict[str, dict[str, Any]] = {
    "echo": {"provider": "echo", "model": "echo"},
    "translated": {"provider": "anthropic", "anthropic_api_key": PROVIDER_KEY,
                   "model": "claude-haiku-4-5"},
}  # fmt: skip


@pytest.mark.parametrize("kind", list(OPENAI_SIDE))
async def test_every_chat_answer_is_openais_schema_strictly(kind: str, tmp_path: Path) -> None:
    settings = Settings(api_keys=(CLIENT_KEY,), max_retries=0, ledger_url="off",
                        **OPENAI_SIDE[kind])  # fmt: skip
    app = create_app(settings, transport=httpx.MockTransport(_anthropic))  # translated to it
    model = OPENAI_SIDE[kind]["model"]
    ask = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": TOOL[
        "input_schema"]}}  # fmt: skip
    async with client(app) as c:
        whole = await c.post("/v1/chat/completions", json=ask)
        streamed = await c.post("/v1/chat/completions", json={
            **ask, "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
        called = await c.post("/v1/chat/completions", json={
            **ask, "messages": [{"role": "user", "content": "Use get_weather for Paris"}],
            "tools": [tool], "stream": True})  # fmt: skip
        listed = await c.get("/v1/models")
        one = await c.get(f"/v1/models/{model}")
        errors = [
            await c.post("/v1/chat/completions", json=ask, headers={"x-api-key": "wrong"}),
            await c.post("/v1/chat/completions", json={**ask, "model": "nope"}),
            await c.post("/v1/chat/completions", json={**ask, "max_tokens": -1}),
        ]
    assert whole.status_code == 200, whole.text
    conforms_to_openai(whole.json(), "CreateChatCompletionResponse")
    for text in (streamed.text, called.text):
        for line in text.splitlines():
            if line.startswith("data: {"):
                conforms_to_openai(json.loads(line[6:]), "CreateChatCompletionStreamResponse")
    conforms_to_openai(listed.json(), "ListModelsResponse")
    conforms_to_openai(one.json(), "Model")
    assert [e.status_code for e in errors] == [401, 404, 400]
    for error in errors:
        conforms_to_openai(_openai_error(error.json()), "ErrorResponse")


def _openai_error(body: dict[str, Any]) -> dict[str, Any]:
    """Our OpenAI-shaped error, less the fields of ours it adds (`request_id`, and the
    list of fields of a schema violation), which clients of OpenAI's shape ignore."""
    inner = {k: v for k, v in body["error"].items() if k not in ("request_id", "errors")}
    return {**body, "error": inner}


async def test_embeddings_answers_are_openais_schema_strictly(tmp_path: Path) -> None:
    settings = Settings(api_keys=(CLIENT_KEY,), provider="echo", model="echo")
    async with client(create_app(settings)) as c:
        floats = await c.post("/v1/embeddings", json={"model": "echo", "input": ["a b", "c"]})
        packed = await c.post("/v1/embeddings", json={"model": "echo", "input": "a",
                                                       "encoding_format": "base64"})  # fmt: skip
    conforms_to_openai(floats.json(), "CreateEmbeddingResponse")
    # The document has only the floats; base64 (the SDKs' default) is their float32 bytes.
    data = packed.json()
    vector = base64.b64decode(data["data"][0]["embedding"])
    floats_of = list(struct.unpack(f"<{len(vector) // 4}f", vector))
    data["data"][0]["embedding"] = floats_of
    conforms_to_openai(data, "CreateEmbeddingResponse")
