"""The official `openai` SDK's `responses`, `embeddings` and `models` against the real
service: on echo, in front of a fake Anthropic server, of a fake OpenAI-compatible
server (Responses translated to Chat Completions) and of a fake OpenAI that serves
Responses itself (passed through). The fake's answers are steered by `mock:`
directives in the prompt, and the body it got is read back from it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import FunctionToolParam
from pydantic import BaseModel

from tests.conftest import CLIENT_KEY, PROVIDER_KEY, Process, start_mock, start_service
from tests.helpers import conforming_events, conforming_response

pytestmark = pytest.mark.e2e


class Plan(BaseModel):
    city: str
    days: int


WEATHER: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather for a place",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
        "additionalProperties": False,
    },
    "strict": True,
}


@dataclass
class Served:
    url: str
    kind: str
    model: str
    mock: Process | None
    process: Process
    sdk: openai.OpenAI

    def client(self) -> openai.OpenAI:
        return self.sdk

    def sent(self) -> dict[str, Any]:
        """What the fake provider got last: its protocol, path and body."""
        assert self.mock is not None
        last: dict[str, Any] = httpx.get(self.mock.url + "/_last", timeout=5).json()
        return last

    def mock_says(self, **options: Any) -> str:
        """A prompt's first line steering the fake provider (echo has none)."""
        return "mock:" + json.dumps(options) + "\n" if self.mock else ""


KINDS = {
    "echo": ("echo", {"LLM_PROVIDER": "echo"}),
    "anthropic": ("claude-haiku-4-5", {"LLM_PROVIDER": "anthropic",
                                       "ANTHROPIC_API_KEY": PROVIDER_KEY}),
    "openai-chat": ("gpt-4o-mini", {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": PROVIDER_KEY}),
    "openai-responses": ("gpt-5-mini", {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": PROVIDER_KEY,
                                        "OPENAI_RESPONSES": "on"}),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(KINDS))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(request.param)
    model, env = KINDS[request.param]
    mock = None
    with contextlib.ExitStack() as running:  # what started is stopped, even if the rest fails
        if request.param != "echo":
            mock = start_mock(tmp)
            running.callback(mock.stop)
            base = {"ANTHROPIC_BASE_URL": mock.url} if "ANTHROPIC_API_KEY" in env else {
                "OPENAI_BASE_URL": mock.url + "/v1"}  # fmt: skip
            env = {**env, **base}
        embedding = "text-embedding-3-small"
        service = start_service(
            tmp,
            {**env, "API_KEYS": CLIENT_KEY, "LLM_MODEL": model,
             "LLM_MODELS": f"{model},{embedding}"},
        )  # fmt: skip
        running.callback(service.stop)
        sdk = openai.OpenAI(base_url=service.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        running.callback(sdk.close)
        yield Served(service.url, request.param, model, mock, service, sdk)


def test_responses_create_answers_text_with_usage(served: Served) -> None:
    response = served.client().responses.create(
        model=served.model, input="hello there", instructions="Be brief."
    )
    assert response.status == "completed"
    assert response.output_text == "hello there"
    assert response.usage is not None and response.usage.output_tokens == 2
    if served.kind != "openai-responses":  # else it is the provider's own, relayed
        conforming_response(response.model_dump(mode="json", exclude_unset=True))
    if served.kind == "openai-responses":
        sent = served.sent()
        assert sent["protocol"] == "responses" and sent["body"]["store"] is False
    elif served.kind == "openai-chat":
        assert served.sent()["body"]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_the_sdks_stream_helpers_see_every_delta_and_the_final_response(served: Served) -> None:
    deltas: list[str] = []
    types: list[str] = []
    with served.client().responses.stream(
        model=served.model, input=served.mock_says(text="one two three") + "one two three"
    ) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "one two three"
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert final.status == "completed" and final.usage is not None


def test_the_raw_stream_conforms_event_by_event(served: Served) -> None:
    body = {"model": served.model, "input": "a b c", "stream": True, "tools": [WEATHER],
            "tool_choice": "none"}  # fmt: skip
    with httpx.stream(
        "POST", served.url + "/v1/responses", json=body,
        headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=10,
    ) as r:  # fmt: skip
        assert r.status_code == 200
        text = r.read().decode()
    if served.kind == "openai-responses":  # the provider's own events, relayed
        assert text.count("event: ") == text.count("\n\n") and "[DONE]" not in text
        return
    events = conforming_events(text)
    assert events[-1]["type"] == "response.completed"


def test_a_function_call_round_trip(served: Served) -> None:
    client = served.client()
    prompt = served.mock_says(tool_call={"name": "get_weather", "arguments": {"location": "Paris"}})
    first = client.responses.create(
        model=served.model, input=prompt + "Use get_weather for Paris", tools=[WEATHER]
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert "location" in json.loads(calls[0].arguments)
    history: list[Any] = [
        {"role": "user", "content": "Use get_weather for Paris"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny 21C"},
    ]
    second = client.responses.create(model=served.model, input=history, tools=[WEATHER])
    assert second.status == "completed"
    if served.kind == "echo":
        assert second.output_text == "sunny 21C"
    elif served.kind == "anthropic":
        turns = served.sent()["body"]["messages"]
        assert turns[-1]["content"][0]["type"] == "tool_result"
        assert turns[-1]["content"][0]["tool_use_id"] == calls[0].call_id
    elif served.kind == "openai-chat":
        turns = served.sent()["body"]["messages"]
        assert turns[-1] == {"role": "tool", "tool_call_id": calls[0].call_id,
                             "content": "sunny 21C"}  # fmt: skip
    else:
        assert served.sent()["body"]["input"][-1]["output"] == "sunny 21C"


def test_structured_output_parses_into_a_pydantic_model(served: Served) -> None:
    prompt = served.mock_says(text='{"city": "Paris", "days": 3}')
    parsed = served.client().responses.parse(
        model=served.model, input=prompt + "Plan a trip to Paris", text_format=Plan
    )
    assert isinstance(parsed.output_parsed, Plan)
    if served.mock is not None:
        assert parsed.output_parsed == Plan(city="Paris", days=3)


def test_embeddings_create_with_the_sdks_default_base64(served: Served) -> None:
    client = served.client()
    if served.kind == "anthropic":
        with pytest.raises(openai.BadRequestError, match="no embeddings endpoint"):
            client.embeddings.create(model="text-embedding-3-small", input="hi")
        return
    result = client.embeddings.create(
        model="text-embedding-3-small", input=["the cat sat", "a dog ran"]
    )
    assert [d.index for d in result.data] == [0, 1]
    assert all(isinstance(x, float) for x in result.data[0].embedding)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0
    if served.mock is not None:
        sent = served.sent()
        assert sent.get("embeddings") and sent["body"]["model"] == "text-embedding-3-small"


def test_models_retrieve_finds_an_allowed_model_and_404s_otherwise(served: Served) -> None:
    client = served.client()
    assert client.models.retrieve(served.model).id == served.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9-nonexistent")


def test_a_stored_response_is_continued_retrieved_listed_and_deleted(served: Served) -> None:
    client = served.client()
    first = client.responses.create(model=served.model, input="My name is Ada.")
    second = client.responses.create(
        model=served.model, input="What is my name?", previous_response_id=first.id
    )
    assert second.status == "completed" and second.previous_response_id == first.id
    if served.mock is not None:  # the provider got the whole history, and no state of ours
        sent = served.sent()["body"]
        history = json.dumps(sent)
        assert "My name is Ada." in history and "What is my name?" in history
        assert "previous_response_id" not in sent and first.id not in history
        if served.kind == "openai-responses":
            assert sent["store"] is False
    assert client.responses.retrieve(second.id).output_text == second.output_text
    items = client.responses.input_items.list(second.id, order="asc")
    assert [item.type for item in items.data][:1] == ["message"] and len(items.data) >= 3
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=served.model, input="hi", previous_response_id=first.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_a_conversation_carries_the_turns_of_the_sdks_calls(served: Served) -> None:
    client = served.client()
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
        metadata={"user": "ada"},
    )
    answered = client.responses.create(
        model=served.model, input="What is my name?", conversation=conversation.id
    )
    assert answered.status == "completed"
    if served.mock is not None:
        assert "My name is Ada." in json.dumps(served.sent()["body"])
    items = client.conversations.items.list(conversation.id, order="asc")
    assert [item.type for item in items.data] == ["message"] * 3
    assert [getattr(item, "role", None) for item in items.data] == ["user", "user", "assistant"]
    assert client.conversations.retrieve(conversation.id).metadata == {"user": "ada"}
    first = items.data[0].id
    assert first is not None
    client.conversations.items.delete(first, conversation_id=conversation.id)
    assert len(client.conversations.items.list(conversation.id).data) == 2
    assert client.conversations.delete(conversation.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_the_agents_sdk_remembers_through_previous_response_id_and_a_conversation(
    served: Served,
) -> None:
    """The OpenAI Agents SDK's two memories, both kept here whatever the provider: a
    run continued from the last one's `previous_response_id`, and a session on the
    Conversations API (`OpenAIConversationsSession`)."""
    from agents import (
        Agent,
        OpenAIConversationsSession,
        OpenAIResponsesModel,
        Runner,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no traces to OpenAI's own servers

    async def go() -> tuple[Any, Any, list[Any]]:
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=CLIENT_KEY,
                                    max_retries=0)  # fmt: skip
        model = OpenAIResponsesModel(model=served.model, openai_client=client)
        agent = Agent(name="assistant", instructions="Answer briefly.", model=model)
        first = await Runner.run(agent, "My name is Ada.")
        second = await Runner.run(
            agent, "What is my name?", previous_response_id=first.last_response_id
        )
        if served.mock is not None:  # the provider got the first turn with the second
            assert "My name is Ada." in json.dumps(served.sent()["body"])
        session = OpenAIConversationsSession(openai_client=client)
        await Runner.run(agent, "I live in Nairobi.", session=session)
        await Runner.run(agent, "Where do I live?", session=session)
        items = await session.get_items()
        await client.close()
        return first, second, items

    first, second, items = asyncio.run(go())
    assert second.last_response_id != first.last_response_id
    counted = [run.raw_responses[-1].usage.input_tokens for run in (first, second)]
    assert counted[1] > counted[0]  # the history, counted as input
    assert [item.get("role") for item in items] == ["user", "assistant", "user", "assistant"]
    if served.mock is not None:  # the last turn reached the provider with the first
        assert "I live in Nairobi." in json.dumps(served.sent()["body"])


def test_the_access_line_has_the_key_model_tokens_and_cost(served: Served) -> None:
    client = served.client()
    client.responses.create(
        model=served.model, input="count me", extra_headers={"x-request-id": "resp-line"}
    )
    line = served.process.access_lines("resp-line")["resp-line"]
    assert line["route"] == "/v1/responses" and line["status"] == 200
    assert line["key"] and line["input_tokens"] > 0 and line["output_tokens"] == 2
    if served.kind == "anthropic":
        return
    client.embeddings.create(
        model="text-embedding-3-small", input="count me too",
        extra_headers={"x-request-id": "embed-line"},
    )  # fmt: skip
    embed = served.process.access_lines("embed-line")["embed-line"]
    assert embed["route"] == "/v1/embeddings" and embed["model"] == "text-embedding-3-small"
    assert embed["input_tokens"] > 0 and embed["cost_usd"] is not None
