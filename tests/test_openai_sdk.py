"""The official `openai` SDK, sync and async, against the real service process for
each provider: OpenAI-protocol and Anthropic through the mock provider, and echo."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import CLIENT_KEY, PROVIDER_KEY, start_mock, start_service

pytestmark = pytest.mark.e2e

TINY = "tiny-key-" + "t" * 20  # one request an hour

PROVIDERS = {
    "openai": {
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": PROVIDER_KEY,
        "LLM_MODEL": "gpt-4o-mini",
    },
    "anthropic": {
        "LLM_PROVIDER": "anthropic",
        "ANTHROPIC_API_KEY": PROVIDER_KEY,
        "LLM_MODEL": "claude-haiku-4-5",
    },
    "echo": {"LLM_PROVIDER": "echo", "LLM_MODEL": "echo"},
}


@dataclass
class V1:
    url: str
    provider: str
    model: str


@pytest.fixture(scope="module", params=list(PROVIDERS))
def v1(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[V1]:
    tmp = tmp_path_factory.mktemp(request.param)
    keys = tmp / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "tiny"\nkey = "{TINY}"\nrate_limit = "1/hour"\n')
    env = {"API_KEYS": CLIENT_KEY, "API_KEYS_FILE": str(keys), **PROVIDERS[request.param]}
    with contextlib.ExitStack() as running:  # what started is stopped, even if the rest fails
        if request.param != "echo":
            mock = start_mock(tmp)
            running.callback(mock.stop)
            env["OPENAI_BASE_URL"] = mock.url + "/v1"
            env["ANTHROPIC_BASE_URL"] = mock.url
        service = start_service(tmp, env)
        running.callback(service.stop)
        yield V1(service.url, request.param, PROVIDERS[request.param]["LLM_MODEL"])


def client(service: V1, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url + "/v1", api_key=key, max_retries=0, timeout=10)


def async_client(service: V1) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=service.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10
    )


MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "one two three four"},
]


def test_sync_completion_has_content_usage_and_finish_reason(v1: V1) -> None:
    with client(v1) as c:
        answer = c.chat.completions.create(model=v1.model, messages=MESSAGES, max_tokens=3)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == "one two three"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 3)
    assert answer.usage.total_tokens == 9


def test_sync_stream_relays_chunks_and_usage_last(v1: V1) -> None:
    with client(v1) as c:
        chunks = list(
            c.chat.completions.create(
                model=v1.model,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "one two three four"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 4)


def test_stream_without_include_usage_sends_no_usage_chunk(v1: V1) -> None:
    with client(v1) as c:
        chunks = list(c.chat.completions.create(model=v1.model, messages=MESSAGES, stream=True))
    assert all(ch.choices for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "one two three four"


@pytest.mark.anyio
async def test_async_client_completion_and_stream(v1: V1) -> None:
    async with async_client(v1) as c:
        answer = await c.chat.completions.create(
            model=v1.model,
            messages=[{"role": "user", "content": [{"type": "text", "text": "alpha beta"}]}],
        )
        stream = await c.chat.completions.create(
            model=v1.model,
            messages=[{"role": "user", "content": "gamma delta"}],
            stream=True,
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert answer.choices[0].message.content == "alpha beta"
    assert answer.choices[0].finish_reason == "stop"
    assert text == "gamma delta"


def test_models_list_shows_the_models_this_key_may_use(v1: V1) -> None:
    with client(v1) as c:
        models = c.models.list()
    assert [m.id for m in models] == [v1.model]
    assert models.data[0].owned_by == v1.provider


def test_error_statuses_raise_the_sdks_exception_classes(v1: V1) -> None:
    with client(v1, key="wrong") as c, pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model=v1.model, messages=MESSAGES)
    assert info.value.code == "invalid_api_key"
    with client(v1) as c:
        with pytest.raises(openai.NotFoundError) as missing:
            c.chat.completions.create(model="not-a-model", messages=MESSAGES)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model=v1.model, messages=MESSAGES, temperature=7)
        assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "temperature"
    with client(v1, key=TINY) as c:
        c.models.list()
        with pytest.raises(openai.RateLimitError) as limited:
            c.models.list()
        assert int(limited.value.response.headers["retry-after"]) > 3000


def test_a_provider_failure_is_a_5xx_the_sdk_raises(v1: V1) -> None:
    if v1.provider == "echo":
        pytest.skip("echo does not fail")
    broken: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": 'mock:{"status": 500}\nhi'}
    ]
    with client(v1) as c:
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model=v1.model, messages=broken)
        assert info.value.status_code == 502 and info.value.code == "upstream_error"
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model=v1.model, messages=broken, stream=True)


def test_v1_calls_count_in_the_callers_usage(v1: V1) -> None:
    with client(v1) as c:
        c.chat.completions.create(model=v1.model, messages=MESSAGES, max_tokens=2)
    report = httpx.get(v1.url + "/usage", headers={"X-API-Key": CLIENT_KEY}).json()
    assert report["requests"] >= 1 and report["by_model"]


def test_a_feature_whose_meaning_would_be_lost_is_a_400_naming_it_in_param(v1: V1) -> None:
    with client(v1) as c:
        if v1.provider == "openai":  # passed through: the provider decides
            c.chat.completions.create(model=v1.model, messages=MESSAGES, n=2, seed=7)
            return
        for fields, param in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs")):
            with pytest.raises(openai.BadRequestError) as info:
                c.chat.completions.create(model=v1.model, messages=MESSAGES, **fields)
            assert info.value.param == param and "cannot be translated" in info.value.message


def test_fields_we_do_not_interpret_pass_through_to_openai_servers(
    tmp_path: Path,
) -> None:
    mock = start_mock(tmp_path)
    service = start_service(
        tmp_path,
        {"API_KEYS": CLIENT_KEY, "OPENAI_BASE_URL": mock.url + "/v1", "LLM_MODEL": "gpt-4o-mini"},
    )
    try:
        body = {
            "messages": [{"role": "user", "content": "hi", "name": "ann"}],
            "response_format": {"type": "json_object"},
            "seed": 7,
            "logit_bias": {"50256": -100},
            "stream": True,
        }
        r = httpx.post(
            service.url + "/v1/chat/completions", json=body, headers={"X-API-Key": CLIENT_KEY}
        )
        assert r.status_code == 200
        sent = httpx.get(mock.url + "/_last").json()["body"]
    finally:
        service.stop()
        mock.stop()
    assert sent["response_format"] == {"type": "json_object"} and sent["seed"] == 7
    assert sent["logit_bias"] == {"50256": -100}
    assert sent["messages"] == [{"role": "user", "content": "hi", "name": "ann"}]
    assert sent["model"] == "gpt-4o-mini"
    assert sent["stream_options"] == {"include_usage": True}
    assert not [line for line in r.text.splitlines() if '"choices": []' in line]
    assert json.loads(r.text.split("\n\n")[0][6:])["object"] == "chat.completion.chunk"
