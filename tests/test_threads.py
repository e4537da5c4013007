"""Anthropic's message threads (issue 27 item 3, issue 25 item 1): `thread: {"type":
"create"}` keeps a conversation in the ledger's database under the reply's id (ours,
random); `{"type": "continue", "previous_message_id": ...}` with only the new messages
gets the thread's system, tools and every earlier message back, and the provider,
whatever its format, the whole conversation without `thread` (nor the threads beta
flag). What cannot be continued is refused in the errors of Anthropic's API that its
SDKs recover from: 404 `thread_not_found`, 400 `thread_unsupported_request`, with
`error.details.error_code`.

In process: the app over a MockTransport, its ledger an SQLite file in tmp_path. The
SDKs' own thread helpers and tool runners are in test_anthropic_sdk.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import ThreadNotFoundErrorDetails, ThreadUnsupportedRequestErrorDetails
from starlette.applications import Starlette

import store
from config import Settings
from dialects.anthropic_messages import THREADS_BETA, Snapshot
from server import create_app
from tests.conftest import CLIENT_KEY, PROVIDER_KEY
from tests.helpers import GOLDEN, MESSAGE_WITH_TOOLS, client, golden

pytestmark = pytest.mark.anyio

OTHER_KEY = "other-client-key-" + "o" * 16
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
}
CREATE = {"type": "create"}
HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": f"other-2025-01-01,{THREADS_BETA}"}


class Upstream:
    """A MockTransport that answers with `answer` (a body, or a function of the body
    sent) and keeps each body and its headers."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        self.headers.append(request.headers)
        answer = self.answer(body) if callable(self.answer) else self.answer
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)


def app_of(
    tmp_path: Path, upstream: Upstream, kind: str = "anthropic", **changes: Any
) -> Starlette:
    if kind == "anthropic":
        settings = Settings(provider="anthropic", anthropic_api_key=PROVIDER_KEY,
                            model="claude-haiku-4-5", models=("claude-haiku-4-5",))  # fmt: skip
    else:
        settings = Settings(provider="openai", openai_api_key=PROVIDER_KEY,
                            openai_base_url="http://vllm.test/v1", model="gpt-5-mini",
                            models=("gpt-5-mini",))  # fmt: skip
    settings = settings.replace(
        api_keys=(CLIENT_KEY, OTHER_KEY), max_retries=0, ledger_url=str(tmp_path / "l.db")
    )
    return create_app(settings.replace(**changes), transport=httpx.MockTransport(upstream))


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def body(messages: list[dict[str, Any]], thread: Any, **fields: Any) -> dict[str, Any]:
    return {"max_tokens": 100, "messages": messages, "thread": thread, **fields}


def continuing(previous: str) -> dict[str, str]:
    return {"type": "continue", "previous_message_id": previous}


def events_of(text: str) -> list[tuple[str, dict[str, Any]]]:
    out, name = [], ""
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


def close(app: Starlette) -> None:
    if app.state.ledger is not None:
        app.state.ledger.close()


async def test_a_continued_turn_sends_an_anthropic_provider_the_whole_conversation(
    tmp_path: Path,
) -> None:
    upstream = Upstream(MESSAGE_WITH_TOOLS)
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        first = await c.post(
            "/v1/messages",
            json=body([user("Weather in Paris?")], CREATE, system="Be brief.", tools=[WEATHER]),
            headers=HEADERS,
        )
        assert first.status_code == 200, first.text
        reply = first.json()
        assert reply["id"].startswith("msg_") and reply["id"] != MESSAGE_WITH_TOOLS["id"]
        assert reply["content"] == MESSAGE_WITH_TOOLS["content"]
        outcome = {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "Sunny, 21 C"}
        result = {"role": "user", "content": [outcome]}
        second = await c.post(
            "/v1/messages", json=body([result], continuing(reply["id"])), headers=HEADERS
        )
        assert second.status_code == 200, second.text
    close(app)
    created, continued = upstream.bodies
    assert "thread" not in created and "thread" not in continued
    assert continued["system"] == "Be brief." and continued["tools"] == [WEATHER]
    assert continued["messages"] == [
        user("Weather in Paris?"),
        {"role": "assistant", "content": MESSAGE_WITH_TOOLS["content"]},
        result,
    ]
    # The provider gets no thread of ours, nor the flag that asks for one.
    assert [h["anthropic-beta"] for h in upstream.headers] == ["other-2025-01-01"] * 2
    assert second.json()["id"] not in (reply["id"], MESSAGE_WITH_TOOLS["id"])


async def test_a_streamed_reply_is_kept_as_the_whole_message_would_have_been(
    tmp_path: Path,
) -> None:
    raw = (GOLDEN / "anthropic_tool_use.sse").read_bytes()
    upstream = Upstream(
        lambda sent: (
            httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})
            if sent.get("stream")
            else MESSAGE_WITH_TOOLS
        )
    )
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        r = await c.post(
            "/v1/messages",
            json=body([user("Weather?")], CREATE, tools=[WEATHER], stream=True),
            headers=HEADERS,
        )
        events = events_of(r.text)
        started = events[0][1]["message"]
        assert started["id"].startswith("msg_") and started["id"] != "msg_01TextToolGolden"
        await c.post("/v1/messages", json=body([user("And?")], continuing(started["id"])))
    close(app)
    # What the SDK puts together from the same events is what the next turn sent back.
    snapshot, buffers = None, dict[int, bytes]()
    for name, event in events_of(raw.decode()):
        if name != "ping":
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    expected = [block.to_dict() for block in snapshot.content]
    assert upstream.bodies[1]["messages"][1] == {"role": "assistant", "content": expected}
    assert expected[1]["input"] == {"location": "San Francisco, CA"}


def test_a_snapshot_of_a_thinking_stream_keeps_its_signed_thinking() -> None:
    raw = (GOLDEN / "anthropic_thinking.sse").read_text()
    snapshot, sdk, buffers = Snapshot(), None, dict[int, bytes]()
    for name, event in events_of(raw):
        snapshot.feed(event)
        if name != "ping":
            sdk = accumulate_event(event=event, current_snapshot=sdk, json_bufs=buffers)  # type: ignore[arg-type]
    assert sdk is not None
    reply = snapshot.reply()
    assert reply["content"] == [block.to_dict() for block in sdk.content]
    assert reply["content"][0]["type"] == "thinking" and reply["content"][0]["signature"]


async def test_a_translated_provider_gets_the_whole_conversation(tmp_path: Path) -> None:
    completion = golden("openai_completion.json")
    said = completion["choices"][0]["message"]["content"]
    chunks = [{"id": "c", "model": "gpt-5-mini", "choices": [{"index": 0, "delta": delta,
               "finish_reason": finish}]} for delta, finish in (({"role": "assistant"}, None),
               ({"content": said}, None), ({}, "stop"))]  # fmt: skip
    sse = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    upstream = Upstream(
        lambda sent: (
            httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
            if sent.get("stream")
            else completion
        )
    )
    app = app_of(tmp_path, upstream, kind="openai")
    async with client(app) as c:
        first = await c.post(
            "/v1/messages", json=body([user("My name is Ada.")], CREATE, system="Be kind.")
        )
        assert first.status_code == 200, first.text
        second = await c.post(
            "/v1/messages", json=body([user("My name?")], continuing(first.json()["id"]))
        )
        assert second.status_code == 200, second.text
        streamed = await c.post(
            "/v1/messages",
            json=body([user("Again?")], continuing(second.json()["id"]), stream=True),
        )
        assert events_of(streamed.text)[-1][0] == "message_stop"
    close(app)
    assert [(m["role"], m["content"]) for m in upstream.bodies[2]["messages"]] == [
        ("system", "Be kind."),
        ("user", "My name is Ada."),
        ("assistant", said),
        ("user", "My name?"),
        ("assistant", said),
        ("user", "Again?"),
    ]


async def test_an_unknown_or_another_keys_message_is_thread_not_found(tmp_path: Path) -> None:
    upstream = Upstream(MESSAGE_WITH_TOOLS)
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        mine = (await c.post("/v1/messages", json=body([user("hi")], CREATE))).json()["id"]
        other = {"x-api-key": OTHER_KEY, "authorization": f"Bearer {OTHER_KEY}"}
        for previous, headers in (("msg_nothing", {}), (mine, other), ("msg_01Whole", {})):
            r = await c.post(
                "/v1/messages", json=body([user("and?")], continuing(previous)), headers=headers
            )
            assert r.status_code == 404, r.text
            error = r.json()
            assert error["type"] == "error" and error["request_id"] == r.headers["x-request-id"]
            assert error["error"]["type"] == "not_found_error"
            details = ThreadNotFoundErrorDetails.model_validate(
                error["error"]["details"], strict=True
            )
            assert details.error_code == "thread_not_found"
    close(app)
    assert len(upstream.bodies) == 1  # the provider was never asked


async def test_a_thread_forks_when_one_message_is_continued_twice(tmp_path: Path) -> None:
    def answer(sent: dict[str, Any]) -> dict[str, Any]:
        text = {"type": "text", "text": f"reply {len(sent['messages'])}"}
        return {**MESSAGE_WITH_TOOLS, "content": [text], "stop_reason": "end_turn"}

    upstream = Upstream(answer)
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        root = (await c.post("/v1/messages", json=body([user("a")], CREATE))).json()["id"]
        left = await c.post("/v1/messages", json=body([user("left")], continuing(root)))
        right = await c.post("/v1/messages", json=body([user("right")], continuing(root)))
        assert left.status_code == right.status_code == 200
        await c.post("/v1/messages", json=body([user("more")], continuing(left.json()["id"])))
    close(app)
    texts = [[m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
              for m in sent["messages"]] for sent in upstream.bodies]  # fmt: skip
    assert texts[2] == ["a", "reply 1", "right"]
    assert texts[3] == ["a", "reply 1", "left", "reply 3", "more"]


async def test_system_or_tools_that_differ_on_a_continued_turn_are_refused(tmp_path: Path) -> None:
    upstream = Upstream(MESSAGE_WITH_TOOLS)
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        first = await c.post("/v1/messages", json=body([user("hi")], CREATE, system="One."))
        previous = continuing(first.json()["id"])
        same = await c.post("/v1/messages", json=body([user("again")], previous, system="One."))
        assert same.status_code == 200
        changed = await c.post(
            "/v1/messages", json=body([user("again")], previous, system="Two.", tools=[WEATHER])
        )
    close(app)
    assert changed.status_code == 400
    error = changed.json()["error"]
    assert error["details"] == {"error_code": "thread_fingerprint_mismatch"}
    assert error["message"].startswith("system and tools:")
    assert len(upstream.bodies) == 2


@pytest.mark.parametrize(
    "thread",
    [
        "create",
        {"type": "fork"},
        {"type": "continue"},
        {"type": "continue", "previous_message_id": ""},
        {"type": "continue", "previous_message_id": 7},
        {"type": "create", "extra": 1},
    ],
)
async def test_a_bad_thread_is_a_400_naming_it(tmp_path: Path, thread: Any) -> None:
    upstream = Upstream(MESSAGE_WITH_TOOLS)
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        r = await c.post("/v1/messages", json=body([user("hi")], thread))
    close(app)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"].startswith("thread:")
    assert upstream.bodies == []


@pytest.mark.parametrize("how", [{"store_state": False}, {"ledger_url": "off"}])
async def test_with_nothing_kept_threads_are_refused_as_anthropics_api_refuses_them(
    tmp_path: Path, how: dict[str, Any]
) -> None:
    upstream = Upstream(MESSAGE_WITH_TOOLS)
    app = app_of(tmp_path, upstream, **how)
    async with client(app) as c:
        created = await c.post("/v1/messages", json=body([user("hi")], CREATE))
        continued = await c.post("/v1/messages", json=body([user("hi")], continuing("msg_1")))
        plain = await c.post("/v1/messages", json={"max_tokens": 10, "messages": [user("hi")]})
    close(app)
    assert created.status_code == 400
    unsupported = created.json()["error"]["details"]
    assert ThreadUnsupportedRequestErrorDetails.model_validate(unsupported, strict=True)
    assert continued.status_code == 404
    assert continued.json()["error"]["details"] == {"error_code": "thread_not_found"}
    assert "STORE_STATE" in continued.json()["error"]["message"]
    assert plain.status_code == 200 and len(upstream.bodies) == 1


async def test_a_stream_that_breaks_keeps_no_turn(tmp_path: Path) -> None:
    raw = (GOLDEN / "anthropic_tool_use.sse").read_bytes()
    cut = raw[: raw.index(b"event: message_delta")]  # no end: the answer is not complete
    upstream = Upstream(
        lambda sent: httpx.Response(200, content=cut, headers={"content-type": "text/event-stream"})
    )
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        r = await c.post("/v1/messages", json=body([user("hi")], CREATE, stream=True))
        events = events_of(r.text)
        assert events[-1][0] == "error"
        again = await c.post(
            "/v1/messages", json=body([user("and?")], continuing(events[0][1]["message"]["id"]))
        )
    rows = store.Ledger.read(app.state.ledger, "SELECT COUNT(*) FROM thread_messages")
    close(app)
    assert again.status_code == 404 and rows == [(0,)]


async def test_a_turn_that_continues_with_no_new_message_resumes_the_last(tmp_path: Path) -> None:
    paused = {**MESSAGE_WITH_TOOLS, "stop_reason": "pause_turn"}
    upstream = Upstream(paused)
    app = app_of(tmp_path, upstream)
    async with client(app) as c:
        first = await c.post("/v1/messages", json=body([user("search the web")], CREATE))
        resumed = await c.post("/v1/messages", json=body([], continuing(first.json()["id"])))
        empty = await c.post("/v1/messages", json={"max_tokens": 10, "messages": []})
    close(app)
    assert resumed.status_code == 200, resumed.text
    assert [m["role"] for m in upstream.bodies[1]["messages"]] == ["user", "assistant"]
    assert empty.status_code == 400 and empty.json()["error"]["message"].startswith("messages:")


async def test_a_thread_past_the_history_bound_is_a_400_naming_thread(tmp_path: Path) -> None:
    settings = Settings(provider="echo", api_keys=(CLIENT_KEY,), max_body_bytes=4096,
                        ledger_url=str(tmp_path / "l.db"))  # fmt: skip
    app = create_app(settings)
    words = " ".join(["word"] * 600)  # 3,000 characters, echoed back: about 6 KB a turn
    async with client(app) as c:
        r = await c.post("/v1/messages", json=body([user(words)], CREATE))
        for _ in range(30):
            if r.status_code != 200:
                break
            r = await c.post("/v1/messages", json=body([user(words)], continuing(r.json()["id"])))
    close(app)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("thread: the conversation holds over")


def test_a_snapshot_counts_empty_blocks_toward_its_bound() -> None:
    snapshot = Snapshot()
    for index in range(1_000):
        snapshot.feed({"type": "content_block_start", "index": index,
                       "content_block": {"type": "text", "text": ""}})  # fmt: skip
    assert snapshot.size >= 1_000 * 100  # a keeper with a bound stops keeping them
