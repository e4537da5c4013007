"""Tools, structured output, images and reasoning end to end: the official `openai` SDK
and an agent library (pydantic-ai) against the real service, in front of a fake
Anthropic server process (its answers steered by `mock:` directives in the prompt, the
body it got read back from it) and on echo."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionToolParam
from pydantic import BaseModel

from tests.conftest import CLIENT_KEY, PROVIDER_KEY, Process, start_mock, start_service

pytestmark = pytest.mark.e2e


class Plan(BaseModel):
    city: str
    days: int


WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather for a place",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


@dataclass
class Served:
    url: str
    provider: str
    model: str
    mock: Process | None
    process: Process

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=CLIENT_KEY, max_retries=0)

    def sent(self) -> dict[str, Any]:
        """The body the fake provider got last."""
        assert self.mock is not None
        last: dict[str, Any] = httpx.get(self.mock.url + "/_last").json()["body"]
        return last


@pytest.fixture(scope="module", params=["anthropic", "echo"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(request.param)
    env = {"API_KEYS": CLIENT_KEY}
    mock = None
    with contextlib.ExitStack() as running:  # what started is stopped, even if the rest fails
        if request.param == "anthropic":
            mock = start_mock(tmp)
            running.callback(mock.stop)
            env |= {
                "LLM_PROVIDER": "anthropic",
                "ANTHROPIC_API_KEY": PROVIDER_KEY,
                "ANTHROPIC_BASE_URL": mock.url,
                "LLM_MODEL": "claude-haiku-4-5",
            }
        else:
            env |= {"LLM_PROVIDER": "echo"}
        service = start_service(tmp, env)
        running.callback(service.stop)
        model = "claude-haiku-4-5" if mock else "echo"
        yield Served(service.url, request.param, model, mock, service)


def directive(**options: object) -> str:
    return "mock:" + json.dumps(options) + "\n"


def ask(served: Served, prompt: str, **options: object) -> str:
    """The prompt: steered on the fake provider, as it is on echo."""
    return (directive(**options) if served.mock and options else "") + prompt


def test_a_tool_call_comes_back_whole_and_streamed_and_its_result_goes_on(served: Served) -> None:
    call = {"name": "get_weather", "arguments": {"location": "Paris"}}
    prompt = ask(served, "Use get_weather for Paris", tool_call=call)
    messages: list[Any] = [{"role": "user", "content": prompt}]
    with served.client() as c:
        whole = c.chat.completions.create(model=served.model, messages=messages, tools=[WEATHER])
        streamed = c.chat.completions.create(
            model=served.model, messages=messages, tools=[WEATHER], stream=True
        )
        deltas = [chunk.choices[0] for chunk in streamed if chunk.choices]
        called = whole.choices[0].message.tool_calls or []
        assert whole.choices[0].finish_reason == "tool_calls" and len(called) == 1
        function = called[0].function  # type: ignore[union-attr]
        assert function.name == "get_weather"
        assert json.loads(function.arguments)["location"] in ("Paris", "Weather")
        pieces = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
        assert pieces[0].id and pieces[0].function and pieces[0].function.name == "get_weather"
        assert json.loads(
            "".join(p.function.arguments or "" for p in pieces if p.function)
        ) == json.loads(function.arguments)
        assert deltas[-1].finish_reason == "tool_calls"
        history = [
            *messages,
            whole.choices[0].message,
            {"role": "tool", "tool_call_id": called[0].id, "content": "18C and sunny"},
        ]
        answer = c.chat.completions.create(model=served.model, messages=history, tools=[WEATHER])
    if served.mock:
        sent = served.sent()
        assert sent["messages"][1]["content"][0]["type"] == "tool_use"
        result = sent["messages"][2]["content"][0]
        assert result["type"] == "tool_result" and result["tool_use_id"] == called[0].id
    else:
        assert answer.choices[0].message.content == "18C and sunny"


def test_parse_fills_a_pydantic_model(served: Served) -> None:
    prompt = ask(served, "Plan two days in Paris.", text='{"city": "Paris", "days": 2}')
    with served.client() as c:
        parsed = c.chat.completions.parse(
            model=served.model, messages=[{"role": "user", "content": prompt}], response_format=Plan
        )
    plan = parsed.choices[0].message.parsed
    assert isinstance(plan, Plan)
    if served.mock:
        assert plan == Plan(city="Paris", days=2)
        form = served.sent()["output_config"]["format"]
        assert form["type"] == "json_schema" and form["schema"]["additionalProperties"] is False


def test_an_image_goes_as_an_image_block(served: Served) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    content: list[Any] = [
        {"type": "text", "text": ask(served, "What is this?", text="A pixel.")},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    with served.client() as c:
        r = c.chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": content}]
        )
    assert r.choices[0].message.content
    if served.mock:
        block = served.sent()["messages"][0]["content"][1]
        assert block == {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        }


def test_reasoning_comes_back_as_reasoning_content(served: Served) -> None:
    if not served.mock:
        pytest.skip("echo does not reason")
    prompt = ask(served, "Think, then answer.", thinking="First this, then that.", text="Done.")
    with served.client() as c:
        r = c.chat.completions.create(
            model="claude-haiku-4-5",
            messages=[{"role": "user", "content": prompt}],
            reasoning_effort="low",
            max_completion_tokens=4000,
        )
    message = r.choices[0].message
    extra = message.model_extra or {}
    assert extra["reasoning_content"] == "First this, then that." and message.content == "Done."
    assert extra["reasoning_details"][0]["signature"].startswith("mocksig-")
    assert served.sent()["thinking"] == {"type": "enabled", "budget_tokens": 2048}


@pytest.mark.anyio
async def test_pydantic_ai_makes_a_structured_call(served: Served) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    call = {"name": "final_result", "arguments": {"city": "Paris", "days": 3}}
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=CLIENT_KEY) as sdk:
        model = OpenAIChatModel(served.model, provider=OpenAIProvider(openai_client=sdk))
        agent = Agent(model, output_type=Plan)
        result = await agent.run(ask(served, "Plan three days in Paris.", tool_call=call))
    assert isinstance(result.output, Plan)
    if served.mock:
        assert result.output == Plan(city="Paris", days=3)
        sent = served.sent()
        assert sent["tools"][0]["name"] == "final_result"


def test_the_access_line_names_the_advisory_fields_dropped(served: Served) -> None:
    with served.client() as c:
        c.chat.completions.create(
            model=served.model,
            messages=[{"role": "user", "content": "hi"}],
            seed=7,
            service_tier="auto",
            extra_headers={"x-request-id": "dropped-fields"},
        )
    line = served.process.access_lines("dropped-fields")["dropped-fields"]
    assert line["status"] == 200 and line["dropped"] == ["seed", "service_tier"]
