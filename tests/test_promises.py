"""The gateway's promises, on every route (issue 24): a key gets no more than its limits,
models and budget, whatever it sends and whatever the provider answers.

- every answer is held to its budget of output, whatever carries it: a passed-through
  Chat body's `n` choices are each reserved and capped, and a passed-through stream is
  cut at its cap whatever kind of delta the provider streams;
- a client that leaves before the first token is billed its prompt;
- a passed-through body cannot choose models upstream; count_tokens is a call like any;
- a call is priced as what was asked of its deployment, not as the model the answer names.

In process: the provider a MockTransport (streaming far more than the cap allows, each
stream counting how much of it was read, where that is the point).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from auth import default_name, digest
from config import DeploymentSpec, Settings
from server import create_app
from tests.conftest import CLIENT_KEY, PROVIDER_KEY
from tests.helpers import client

pytestmark = pytest.mark.anyio

ENDLESS = 20_000  # events a hostile stream offers; the cap of max_tokens=10 is about 84


class Hostile:
    """A provider stream of ENDLESS events, counting how many were read."""

    def __init__(self, frames: Iterator[bytes]) -> None:
        self.frames = frames
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for frame in self.frames:
            self.read += 1
            yield frame


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def chat_other_choice() -> Iterator[bytes]:
    """Choice 0 says nothing; choice 1 goes on for ever."""
    yield sse({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    for _ in range(ENDLESS):
        yield sse({"id": "c", "model": "m", "choices": [{"index": 1, "delta": {"content": "w "}}]})


def chat_audio() -> Iterator[bytes]:
    """The first choice, in a kind of delta no format here reads, for ever."""
    yield sse({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    for _ in range(ENDLESS):
        delta = {"audio": {"data": "A" * 40}}
        yield sse({"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta}]})


def anthropic_citations() -> Iterator[bytes]:
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
               "content": [], "stop_reason": None, "usage": {"input_tokens": 5,
               "output_tokens": 1}}  # fmt: skip
    yield sse({"type": "message_start", "message": message}, "message_start")
    block = {"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}}  # fmt: skip
    yield sse(block, "content_block_start")
    citation = {"type": "char_location", "cited_text": "a quoted line", "document_index": 0}
    for _ in range(ENDLESS):
        delta = {"type": "citations_delta", "citation": citation}
        yield sse({"type": "content_block_delta", "index": 0, "delta": delta},
                  "content_block_delta")  # fmt: skip


def responses_reasoning(kind: str) -> Iterator[bytes]:
    created = {"id": "resp_1", "object": "response", "status": "in_progress", "model": "m",
               "output": []}  # fmt: skip
    yield sse({"type": "response.created", "sequence_number": 0, "response": created},
              "response.created")  # fmt: skip
    event: dict[str, Any]
    for n in range(ENDLESS):
        if kind == "items":
            item = {"type": "reasoning", "id": f"rs_{n}", "summary": []}
            event = {"type": "response.output_item.added", "output_index": n, "item": item}
        else:
            event = {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1",
                     "output_index": 0, "summary_index": 0, "delta": "thinking "}  # fmt: skip
        yield sse({**event, "sequence_number": n + 1}, str(event["type"]))


def streaming(stream: Hostile) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def app_with(transport: httpx.MockTransport, provider: str, **changes: object) -> Any:
    settings = Settings(
        provider=provider,
        openai_api_key=PROVIDER_KEY,
        anthropic_api_key=PROVIDER_KEY,
        openai_base_url="https://api.openai.com/v1",  # serves Responses itself: passes through
        anthropic_base_url="http://provider.test",
        model="m",
        api_keys=(CLIENT_KEY,),
        max_retries=0,
    ).replace(**changes)
    return create_app(settings, transport=transport)


@pytest.mark.parametrize(
    ("provider", "path", "body", "frames", "ending"),
    [
        ("openai", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}], "n": 2}, chat_other_choice,
         b'"finish_reason":"length"'),
        ("openai", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}]}, chat_audio,
         b'"finish_reason":"length"'),
        ("anthropic", "/v1/messages",
         {"messages": [{"role": "user", "content": "hi"}]}, anthropic_citations,
         b'"stop_reason":"max_tokens"'),
        ("openai", "/v1/responses", {"input": "hi"}, lambda: responses_reasoning("deltas"),
         b"response.failed"),
        ("openai", "/v1/responses", {"input": "hi"}, lambda: responses_reasoning("items"),
         b"response.failed"),
    ],
    ids=["chat-second-choice", "chat-audio", "anthropic-citations", "responses-reasoning",
         "responses-items"],
)  # fmt: skip
async def test_a_passed_through_stream_is_cut_at_its_cap_whatever_carries_the_output(
    provider: str, path: str, body: dict[str, Any], frames: Any, ending: bytes
) -> None:
    hostile = Hostile(frames())
    app = app_with(streaming(hostile), provider)
    limit = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    async with client(app) as c:
        r = await c.post(path, json={**body, "model": "m", "stream": True, limit: 10})
    assert r.status_code == 200
    assert ending in r.content  # ended by us, in the format's own words
    # n = 2 choices of 10 tokens: at most 2 x (2 x 10 + 64) deltas; one choice: half.
    assert hostile.read < 2 * (2 * 10 + 64) + 10, hostile.read


KEYS = """
[[keys]]
name = "budget"
key = "budget-key"
budget_usd = 0.01
"""


async def test_n_choices_passed_through_are_each_reserved_against_the_budget(
    tmp_path: Path,
) -> None:
    """n = 128 with max_tokens = 1000 is 128,000 tokens of output at worst: $0.077 at
    gpt-4o-mini's $0.60 a million, over a $0.01 budget, refused before any call; the same
    body with n = 1 fits."""
    calls: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        choices = [
            {"index": i, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            for i in range(calls[-1].get("n", 1))
        ]
        usage = {"prompt_tokens": 5, "completion_tokens": 2}
        return httpx.Response(200, json={"id": "c", "model": "gpt-4o-mini",
                                         "choices": choices, "usage": usage})  # fmt: skip

    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    app = app_with(httpx.MockTransport(handler), "openai", model="gpt-4o-mini",
                   api_keys_file=keys)  # fmt: skip
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1000}  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"X-API-Key": "budget-key"},
    ) as c:
        many = await c.post("/v1/chat/completions", json={**body, "n": 128})
        one = await c.post("/v1/chat/completions", json={**body, "n": 1})
    assert many.status_code == 429 and many.json()["error"]["type"] == "budget_exceeded"
    assert one.status_code == 200
    assert [call.get("n") for call in calls] == [1]  # the refused one never reached it


# --- a client that leaves before the answer began is billed its prompt ------------------


class Leaving:
    """One request's ASGI channel: its body, then the client leaves after `after_s`."""

    def __init__(self, body: dict[str, Any], after_s: float) -> None:
        self.body = json.dumps(body).encode()
        self.after_s = after_s
        self.sent = False
        self.status = 0

    async def receive(self) -> dict[str, Any]:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await asyncio.sleep(self.after_s)
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


def slow_provider(first_event_s: float) -> httpx.MockTransport:
    """An OpenAI-protocol provider that takes its time: a whole answer after
    `first_event_s`, or a stream whose role chunk comes at once and its text after it."""

    async def stream() -> AsyncIterator[bytes]:
        role = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
        yield sse(role)
        await asyncio.sleep(first_event_s)
        yield sse({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "x"}}]})

    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, content=stream(),
                                  headers={"content-type": "text/event-stream"})  # fmt: skip
        await asyncio.sleep(first_event_s)
        return httpx.Response(500)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/complete", {"prompt": "word " * 400}),
        ("/stream", {"prompt": "word " * 400}),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": "word " * 400}], "stream": True}),
    ],
    ids=["whole", "translated-stream", "passed-through-stream"],
)  # fmt: skip
async def test_a_client_that_leaves_before_the_first_token_is_billed_its_prompt(
    path: str, body: dict[str, Any]
) -> None:
    """About 500 tokens of prompt, the client gone at 0.3 s, the provider still quiet
    (no answer at all, or only its role chunk): the key's usage counts the prompt, as
    the provider bills it, not 0."""
    app = app_with(slow_provider(first_event_s=5), "openai")
    channel = Leaving({**body, "model": "m"}, after_s=0.3)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "scheme": "http", "server": ("t", 80),
             "client": ("127.0.0.1", 1), "headers": [(b"content-type", b"application/json"),
             (b"x-api-key", CLIENT_KEY.encode())]}  # fmt: skip
    await asyncio.wait_for(app(scope, channel.receive, channel.send), 10)
    report = await app.state.admission.usage.report(default_name(digest(CLIENT_KEY)))
    assert report["requests"] == 1
    assert report["input_tokens"] >= 400  # the prompt, estimated at four characters a token
    assert report["output_tokens"] <= 1


# --- what a passed-through body may choose upstream; count_tokens like any call ---------


def anthropic_counting(seen: list[httpx.Request], failing: str = "") -> httpx.MockTransport:
    """Anthropic-protocol providers: `failing` (a host) answers 529, the others count."""

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == failing:
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
            return httpx.Response(529, json=error)
        if request.url.path.endswith("/count_tokens"):
            await asyncio.sleep(0.3)
            return httpx.Response(200, json={"input_tokens": 42})
        return httpx.Response(400, json={"type": "error", "error": {"message": "unused"}})

    return httpx.MockTransport(handler)


def two_deployments() -> tuple[DeploymentSpec, ...]:
    return tuple(
        DeploymentSpec(
            name=host,
            provider="anthropic",
            base_url=f"http://{host}",
            api_key=PROVIDER_KEY,
            models=(("m", ""),),
        )  # fmt: skip
        for host in ("first.test", "second.test")
    )


async def test_count_tokens_fails_over_past_a_failing_deployment() -> None:
    seen: list[httpx.Request] = []
    app = app_with(anthropic_counting(seen, failing="first.test"), "anthropic",
                   deployments=two_deployments(), models=("m",))  # fmt: skip
    async with client(app) as c:
        counts = [
            (await c.post("/v1/messages/count_tokens?beta=true&other=1",
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            for _ in range(3)
        ]  # fmt: skip
    assert [(r.status_code, r.json()) for r in counts] == [(200, {"input_tokens": 42})] * 3
    # once to the first (then cooling, passed over), every time to the second
    assert [r.url.host for r in seen] == ["first.test", "second.test", "second.test",
                                         "second.test"]  # fmt: skip
    assert {r.url.query for r in seen} == {b"beta=true"}  # the format's own parameter only


async def test_count_tokens_holds_a_slot_of_the_keys_calls_in_flight() -> None:
    seen: list[httpx.Request] = []
    app = app_with(anthropic_counting(seen), "anthropic", key_max_concurrent=1)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with client(app) as c:
        both = await asyncio.gather(
            *(c.post("/v1/messages/count_tokens", json=body) for _ in range(2))
        )
    statuses = sorted(r.status_code for r in both)
    assert statuses == [200, 429], statuses
    refused = next(r for r in both if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"  # Anthropic's word for a 429
    assert refused.headers["retry-after"] == "1"


@pytest.mark.parametrize("field", ["models", "route", "provider", "fallbacks"])
async def test_a_passed_through_body_cannot_choose_models_upstream(field: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500)

    app = app_with(httpx.MockTransport(handler), "openai")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: ["pricey"]}
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert seen == []


async def test_a_call_is_priced_as_the_model_asked_not_the_one_the_answer_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deployment answering "gpt-4o-mini" for a gpt-4o call is billed as gpt-4o (16.7x
    more), and the access line notes what was asked."""

    def handler(request: httpx.Request) -> httpx.Response:
        usage = {"prompt_tokens": 1_000_000, "completion_tokens": 0}
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return httpx.Response(200, json={"id": "c", "model": "gpt-4o-mini",
                                         "choices": [choice], "usage": usage})  # fmt: skip

    app = app_with(httpx.MockTransport(handler), "openai", model="gpt-4o", models=("gpt-4o",))
    with caplog.at_level(logging.INFO, logger="text_tool"):
        async with client(app) as c:
            r = await c.post("/complete", json={"prompt": "hi"})
    access = [rec for rec in caplog.records if getattr(rec, "event", None) == "access"]
    assert [(getattr(a, "model", None), getattr(a, "upstream_model", None)) for a in access] == [
        ("gpt-4o-mini", "gpt-4o")
    ]
    prices = app.state.admission.prices
    assert r.json()["cost_usd"] == pytest.approx(prices.price("gpt-4o").input)
    assert prices.price("gpt-4o").input > 10 * prices.price("gpt-4o-mini").input


async def test_a_deployment_that_accepts_and_never_answers_a_stream_is_cooled() -> None:
    """The first deployment takes the request and says nothing: after the first-byte
    deadline the call moves on to the second, and the first cools (no 60 s waits)."""
    hung: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "hung.test":
            hung.append(request.url.host)
            await asyncio.sleep(3600)
        frames = [{"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "ok"}}]},
                  {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {},
                                                         "finish_reason": "stop"}]}]  # fmt: skip
        raw = "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"
        return httpx.Response(200, text=raw, headers={"content-type": "text/event-stream"})

    specs = tuple(
        DeploymentSpec(
            name=host,
            provider="openai",
            base_url=f"http://{host}/v1",
            api_key=PROVIDER_KEY,
            models=(("m", ""),),
            weight=weight,
        )  # fmt: skip
        for host, weight in (("hung.test", 100.0), ("well.test", 1.0))
    )
    app = app_with(httpx.MockTransport(handler), "openai", deployments=specs, models=("m",),
                   first_byte_timeout_s=0.2)  # fmt: skip
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client(app) as c:
        answers = [await asyncio.wait_for(c.post("/v1/chat/completions", json=body), 5)
                   for _ in range(3)]  # fmt: skip
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(b'"content": "ok"' in r.content for r in answers)  # relayed as it came
    assert hung == ["hung.test"]  # tried once, then cooling: passed over
    states = {d["name"]: d["state"] for d in app.state.deployments.states()}
    assert states == {"hung.test": "cooling", "well.test": "up"}
