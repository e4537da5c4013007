"""Stored responses (issue 27, item 1): `store` true keeps a response in the ledger's
database, owned by its key; `previous_response_id` sends the provider the whole history
(never our ids, always `store: false`), whatever provider served the earlier turns;
GET, DELETE and input_items read and remove them for that key only.

In process: the app over a MockTransport, its ledger an SQLite file in tmp_path.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import store
from config import Settings
from server import create_app
from tests.conftest import CLIENT_KEY, PROVIDER_KEY
from tests.helpers import Provider, client, golden

pytestmark = pytest.mark.anyio

OTHER_KEY = "other-client-key-" + "o" * 16
Answer = Callable[[dict[str, Any]], httpx.Response]


def chat_answer(text: str) -> Answer:
    """An OpenAI-compatible server (translated to Chat Completions) answering `text`."""
    completion = golden("openai_completion.json")
    completion["choices"][0]["message"]["content"] = text
    return lambda body: httpx.Response(200, json=completion)


def upstream_response(number: int) -> dict[str, Any]:
    """What api.openai.com answers a passed-through call (a provider numbering its ids)."""
    return {
        "id": f"resp_{number}", "object": "response", "created_at": 1700000000,
        "status": "completed", "model": "gpt-5-mini", "store": False,
        "output": [{"type": "message", "id": f"msg_{number}", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": f"answer {number}",
                                 "annotations": []}]}],
        "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12},
    }  # fmt: skip


def app_of(
    tmp_path: Path, provider: Provider, kind: str = "compatible", **changes: Any
) -> Starlette:
    base = "https://api.openai.com/v1" if kind == "openai" else "http://vllm.test/v1"
    settings = Settings(
        provider="openai",
        openai_api_key=PROVIDER_KEY,
        openai_base_url=base,
        model="gpt-5-mini",
        models=("gpt-5-mini",),
        api_keys=(CLIENT_KEY, OTHER_KEY),
        max_retries=0,
        ledger_url=str(tmp_path / "ledger.db"),
    ).replace(**changes)
    return create_app(settings, transport=httpx.MockTransport(provider))


@pytest.fixture
async def stored(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Provider]]:
    provider = Provider(chat_answer("Nice to meet you, Ada."))
    app = app_of(tmp_path, provider)
    async with client(app) as c:
        yield c, provider
    app.state.ledger.close()


def other(c: httpx.AsyncClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {OTHER_KEY}", "X-API-Key": OTHER_KEY}


async def test_a_stored_response_is_continued_with_its_whole_history(
    stored: tuple[httpx.AsyncClient, Provider],
) -> None:
    c, provider = stored
    first = await c.post("/v1/responses", json={"input": "My name is Ada."})
    assert first.status_code == 200, first.text
    assert first.json()["store"] is True and first.json()["previous_response_id"] is None
    second = await c.post(
        "/v1/responses",
        json={"input": "What is my name?", "previous_response_id": first.json()["id"]},
    )
    assert second.status_code == 200, second.text
    assert second.json()["previous_response_id"] == first.json()["id"]
    assert [(m["role"], m["content"]) for m in provider.bodies[1]["messages"]] == [
        ("user", "My name is Ada."),
        ("assistant", "Nice to meet you, Ada."),
        ("user", "What is my name?"),
    ]
    third = await c.post(
        "/v1/responses", json={"input": "And again?", "previous_response_id": second.json()["id"]}
    )
    assert third.status_code == 200
    assert len(provider.bodies[2]["messages"]) == 5


async def test_a_passed_through_turn_sends_the_history_without_ids_and_store_false(
    tmp_path: Path,
) -> None:
    numbers = iter(range(1, 10))
    provider = Provider(lambda body: httpx.Response(200, json=upstream_response(next(numbers))))
    app = app_of(tmp_path, provider, kind="openai")
    async with client(app) as c:
        first = await c.post("/v1/responses", json={"input": "one", "store": True})
        second = await c.post(
            "/v1/responses", json={"input": "two", "previous_response_id": first.json()["id"]}
        )
    app.state.ledger.close()
    assert first.json()["store"] is True and second.status_code == 200
    sent = provider.bodies[1]
    assert sent["store"] is False and "previous_response_id" not in sent

    def said(text: str) -> dict[str, Any]:
        return {"type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": text}]}  # fmt: skip

    assert sent["input"] == [
        said("one"),
        {"type": "message", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "answer 1", "annotations": []}]},
        said("two"),
    ]  # fmt: skip
    assert provider.bodies[0]["store"] is False


async def test_get_input_items_and_delete_of_a_stored_response(
    stored: tuple[httpx.AsyncClient, Provider],
) -> None:
    c, _ = stored
    first = (await c.post("/v1/responses", json={"input": "My name is Ada."})).json()
    second = (
        await c.post("/v1/responses", json={"input": [
            {"role": "user", "content": "What is my name?"},
            {"role": "user", "content": "Say it twice."},
        ], "previous_response_id": first["id"]})
    ).json()  # fmt: skip
    got = await c.get(f"/v1/responses/{second['id']}")
    assert got.status_code == 200 and got.json() == second

    listed = (await c.get(f"/v1/responses/{second['id']}/input_items")).json()
    texts = [item["content"][0]["text"] if isinstance(item["content"], list)
             else item["content"] for item in listed["data"]]  # fmt: skip
    assert texts == ["Say it twice.", "What is my name?", "Nice to meet you, Ada.",
                     "My name is Ada."]  # fmt: skip
    assert listed["object"] == "list" and listed["has_more"] is False
    assert listed["first_id"] == listed["data"][0]["id"]
    assert listed["last_id"] == listed["data"][-1]["id"]
    assert len({item["id"] for item in listed["data"]}) == 4

    page = (await c.get(f"/v1/responses/{second['id']}/input_items?order=asc&limit=2")).json()
    assert [i["id"] for i in page["data"]] == [i["id"] for i in reversed(listed["data"])][:2]
    assert page["has_more"] is True
    rest = (
        await c.get(
            f"/v1/responses/{second['id']}/input_items",
            params={"order": "asc", "after": page["last_id"]},
        )
    ).json()
    assert [i["id"] for i in rest["data"]] == [i["id"] for i in reversed(listed["data"])][2:]
    assert rest["has_more"] is False
    for bad in ("limit=0", "limit=101", "limit=%C2%B2", "order=up", "after=nothing"):
        r = await c.get(f"/v1/responses/{second['id']}/input_items?{bad}")
        assert r.status_code == 400 and r.json()["error"]["param"] == bad.split("=")[0]

    deleted = await c.delete(f"/v1/responses/{first['id']}")
    assert deleted.json() == {"id": first["id"], "object": "response", "deleted": True}
    assert (await c.get(f"/v1/responses/{first['id']}")).status_code == 404
    assert (await c.delete(f"/v1/responses/{first['id']}")).status_code == 404
    refused = await c.post(
        "/v1/responses", json={"input": "again", "previous_response_id": first["id"]}
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "previous_response_id"


async def test_another_keys_response_is_the_same_404_as_an_unknown_one(
    stored: tuple[httpx.AsyncClient, Provider],
) -> None:
    c, provider = stored
    ids = [(await c.post("/v1/responses", json={"input": f"secret {i}"})).json()["id"]
           for i in range(2)]  # fmt: skip
    assert ids[0] != ids[1] and len(ids[0]) >= 24  # random, not counters
    unknown = ids[0][:-4] + "0000"
    for path in ("/v1/responses/{}", "/v1/responses/{}/input_items"):
        theirs = await c.get(path.format(ids[0]), headers=other(c))
        nobody = await c.get(path.format(unknown), headers=other(c))
        assert theirs.status_code == nobody.status_code == 404
        assert theirs.json()["error"]["message"].replace(ids[0], "X") == nobody.json()["error"][
            "message"
        ].replace(unknown, "X")
    assert (await c.delete(f"/v1/responses/{ids[0]}", headers=other(c))).status_code == 404
    sent = len(provider.bodies)
    continued = await c.post(
        "/v1/responses",
        json={"input": "what did they say?", "previous_response_id": ids[0]},
        headers=other(c),
    )
    assert continued.status_code == 400 and len(provider.bodies) == sent
    assert "secret" not in continued.text
    assert (await c.get(f"/v1/responses/{ids[0]}")).status_code == 200  # still the owner's


async def test_store_false_keeps_nothing(stored: tuple[httpx.AsyncClient, Provider]) -> None:
    c, _ = stored
    r = await c.post("/v1/responses", json={"input": "forget me", "store": False})
    assert r.status_code == 200 and r.json()["store"] is False
    assert (await c.get(f"/v1/responses/{r.json()['id']}")).status_code == 404


def events_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_a_stream_is_stored_before_its_last_event_is_sent(tmp_path: Path) -> None:
    settings = Settings(provider="echo", api_keys=(CLIENT_KEY,), ledger_url=str(tmp_path / "l.db"))
    app = create_app(settings)
    async with client(app) as c:
        r = await c.post("/v1/responses", json={"input": "stream me", "stream": True})
        final = events_of(r.text)[-1]
        assert final["type"] == "response.completed"
        assert final["response"]["store"] is True
        got = await c.get(f"/v1/responses/{final['response']['id']}")
        assert got.status_code == 200 and got.json() == final["response"]
        nxt = await c.post(
            "/v1/responses",
            json={"input": "and?", "previous_response_id": final["response"]["id"],
                  "stream": True},
        )  # fmt: skip
        assert events_of(nxt.text)[-1]["response"]["previous_response_id"] == got.json()["id"]
        conversation = (await c.post("/v1/conversations", json={})).json()["id"]
        talk = await c.post("/v1/responses", json={"input": "in a conversation", "stream": True,
                                                   "conversation": conversation})  # fmt: skip
        assert events_of(talk.text)[-1]["response"]["conversation"] == {"id": conversation}
        items = (await c.get(f"/v1/conversations/{conversation}/items?order=asc")).json()["data"]
        assert [i["role"] for i in items] == ["user", "assistant"]
    app.state.ledger.close()


async def test_a_passed_through_stream_is_stored_from_its_completed_event(tmp_path: Path) -> None:
    done = upstream_response(7)
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    raw = "".join(
        f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
        for e in (
            {"type": "response.created", "sequence_number": 0, "response": started},
            {"type": "response.completed", "sequence_number": 1, "response": done},
        )
    )
    provider = Provider(
        lambda body: httpx.Response(200, text=raw, headers={"content-type": "text/event-stream"})
    )
    app = app_of(tmp_path, provider, kind="openai")
    async with client(app) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "stream": True})
        final = events_of(r.text)[-1]
        got = await c.get(f"/v1/responses/{final['response']['id']}")
    app.state.ledger.close()
    created = events_of(r.text)[0]["response"]
    assert created["id"] == final["response"]["id"] != "resp_7"  # ours, in every event
    assert final["response"]["store"] is True and got.json() == final["response"]
    assert provider.bodies[0]["store"] is False


async def test_a_provider_that_names_every_response_alike_still_has_each_kept_apart(
    tmp_path: Path,
) -> None:
    provider = Provider(lambda body: httpx.Response(200, json=upstream_response(1)))
    app = app_of(tmp_path, provider, kind="openai")
    async with client(app) as c:
        mine = (await c.post("/v1/responses", json={"input": "mine"})).json()
        theirs = (await c.post("/v1/responses", json={"input": "theirs"}, headers=other(c))).json()
        again = (await c.post("/v1/responses", json={"input": "again", "previous_response_id":
                                                      mine["id"]})).json()  # fmt: skip
        assert len({mine["id"], theirs["id"], again["id"], "resp_1"}) == 4
        listed = (await c.get(f"/v1/responses/{again['id']}/input_items?order=asc")).json()
        their_list = (
            await c.get(f"/v1/responses/{theirs['id']}/input_items", headers=other(c))
        ).json()
    app.state.ledger.close()
    assert [i["content"][0]["text"] for i in listed["data"]] == ["mine", "answer 1", "again"]
    assert [i["content"][0]["text"] for i in their_list["data"]] == ["theirs"]


async def test_a_history_past_its_bound_is_a_400_naming_previous_response_id(
    tmp_path: Path,
) -> None:
    provider = Provider(chat_answer("ok"))
    app = app_of(tmp_path, provider, max_body_bytes=4000)  # history bound: 64,000 bytes
    previous = None
    async with client(app) as c:
        for _ in range(40):
            r = await c.post(
                "/v1/responses", json={"input": "x" * 3000, "previous_response_id": previous}
            )
            if r.status_code != 200:
                break
            previous = r.json()["id"]
    app.state.ledger.close()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "previous_response_id"
    assert 15 <= len(provider.bodies) <= 25


async def test_a_database_that_fails_is_a_503_and_an_answer_not_kept(
    stored: tuple[httpx.AsyncClient, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, _ = stored
    first = (await c.post("/v1/responses", json={"input": "hi"})).json()
    ledger = c._transport.app.state.ledger  # type: ignore[attr-defined]

    def broken(work: Any) -> Any:
        raise OSError("disk I/O error")

    monkeypatch.setattr(ledger, "with_connection", broken)
    got = await c.get(f"/v1/responses/{first['id']}")
    assert got.status_code == 503 and got.json()["error"]["type"] == "store_unavailable"
    answered = await c.post("/v1/responses", json={"input": "hi again"})
    assert answered.status_code == 200 and answered.json()["store"] is False
    continued = await c.post(
        "/v1/responses", json={"input": "and?", "previous_response_id": first["id"]}
    )
    assert continued.status_code == 503 and "disk" not in continued.text


@pytest.mark.parametrize("how", [{"store_state": False}, {"ledger_url": "off"}])
async def test_with_the_store_off_the_fields_are_a_400_and_the_routes_a_404(
    tmp_path: Path, how: dict[str, Any]
) -> None:
    app = app_of(tmp_path, Provider(chat_answer("ok")), **how)
    async with client(app) as c:
        for field, value in (("previous_response_id", "resp_1"), ("store", True)):
            r = await c.post("/v1/responses", json={"input": "hi", field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field
        plain = await c.post("/v1/responses", json={"input": "hi"})
        assert plain.status_code == 200
        for method, path in (("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
                             ("GET", "/v1/responses/resp_1/input_items")):  # fmt: skip
            r = await c.request(method, path)
            assert r.status_code == 404 and "STORE_STATE" in r.json()["error"]["message"]
    if app.state.ledger is not None:
        assert store.Ledger.read(app.state.ledger, "SELECT COUNT(*) FROM responses") == [(0,)]
        app.state.ledger.close()


# --- conversations ---------------------------------------------------------------------


async def test_a_conversation_is_created_read_updated_listed_and_deleted(
    stored: tuple[httpx.AsyncClient, Provider],
) -> None:
    c, _ = stored
    made = await c.post("/v1/conversations", json={
        "items": [{"type": "message", "role": "user", "content": "Hello!"}],
        "metadata": {"topic": "demo"}})  # fmt: skip
    assert made.status_code == 200, made.text
    conversation = made.json()
    assert conversation["object"] == "conversation" and conversation["metadata"] == {
        "topic": "demo"
    }
    assert conversation["id"].startswith("conv_") and isinstance(conversation["created_at"], int)
    path = f"/v1/conversations/{conversation['id']}"
    assert (await c.get(path)).json() == conversation
    updated = await c.post(path, json={"metadata": {"topic": "other"}})
    assert updated.json() == {**conversation, "metadata": {"topic": "other"}}

    added = (await c.post(path + "/items", json={"items": [
        {"role": "assistant", "content": "Hi, who is it?"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Ada"}]},
    ]})).json()  # fmt: skip
    assert added["object"] == "list" and len(added["data"]) == 2 and added["has_more"] is False
    listed = (await c.get(path + "/items", params={"order": "asc"})).json()
    assert [(i["role"], i["content"][0]["text"]) for i in listed["data"]] == [
        ("user", "Hello!"), ("assistant", "Hi, who is it?"), ("user", "Ada")]  # fmt: skip
    assert all(i["status"] == "completed" and i["id"].startswith("msg_") for i in listed["data"])
    said = {"type": "output_text", "text": "Hi, who is it?", "annotations": [], "logprobs": []}
    assert listed["data"][1]["content"][0] == said
    newest = (await c.get(path + "/items", params={"limit": 1})).json()
    assert newest["data"] == [listed["data"][-1]] and newest["has_more"] is True

    one = listed["data"][1]
    assert (await c.get(f"{path}/items/{one['id']}")).json() == one
    after_delete = await c.delete(f"{path}/items/{one['id']}")
    assert after_delete.json()["id"] == conversation["id"]
    assert (await c.get(f"{path}/items/{one['id']}")).status_code == 404
    assert len((await c.get(path + "/items")).json()["data"]) == 2

    gone = await c.delete(path)
    assert gone.json() == {"id": conversation["id"], "object": "conversation.deleted",
                           "deleted": True}  # fmt: skip
    for method, sub in (("GET", ""), ("GET", "/items"), ("DELETE", "")):
        assert (await c.request(method, path + sub)).status_code == 404


async def test_a_response_in_a_conversation_reads_its_items_and_adds_its_turn(
    stored: tuple[httpx.AsyncClient, Provider],
) -> None:
    c, provider = stored
    conversation = (await c.post("/v1/conversations", json={
        "items": [{"role": "user", "content": "My name is Ada."}]})).json()  # fmt: skip
    first = await c.post(
        "/v1/responses", json={"input": "What is my name?", "conversation": conversation["id"]}
    )
    assert first.status_code == 200, first.text
    assert first.json()["conversation"] == {"id": conversation["id"]}
    assert [m["content"] for m in provider.bodies[0]["messages"]] == [
        "My name is Ada.", "What is my name?"]  # fmt: skip
    second = await c.post(
        "/v1/responses",
        json={"input": "Again?", "conversation": {"id": conversation["id"]}, "store": False},
    )
    assert second.status_code == 200
    final = second.json()
    assert final["store"] is False and final["conversation"] == {"id": conversation["id"]}
    assert len(provider.bodies[1]["messages"]) == 4
    assert (await c.get(f"/v1/responses/{final['id']}")).status_code == 404  # not stored
    listed = (
        await c.get(f"/v1/conversations/{conversation['id']}/items", params={"order": "asc"})
    ).json()
    assert [i["role"] for i in listed["data"]] == ["user", "user", "assistant", "user",
                                                    "assistant"]  # fmt: skip


async def test_a_conversation_is_its_keys_alone(
    stored: tuple[httpx.AsyncClient, Provider],
) -> None:
    c, provider = stored
    conversation = (await c.post("/v1/conversations", json={
        "items": [{"role": "user", "content": "secret"}]})).json()  # fmt: skip
    path = f"/v1/conversations/{conversation['id']}"
    item = (await c.get(path + "/items")).json()["data"][0]["id"]
    for method, sub, body in (
        ("GET", "", None), ("POST", "", {"metadata": {}}), ("DELETE", "", None),
        ("GET", "/items", None), ("POST", "/items", {"items": [{"role": "user", "content": "x"}]}),
        ("GET", f"/items/{item}", None), ("DELETE", f"/items/{item}", None),
    ):  # fmt: skip
        r = await c.request(method, path + sub, json=body, headers=other(c))
        assert r.status_code == 404, (method, sub, r.text)
        assert "secret" not in r.text
    used = await c.post("/v1/responses", json={"input": "tell me",
                                               "conversation": conversation["id"]},
                        headers=other(c))  # fmt: skip
    assert used.status_code == 404 and used.json()["error"]["param"] == "conversation"
    assert provider.bodies == []
    assert len((await c.get(path + "/items")).json()["data"]) == 1  # the owner's, untouched


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/conversations", {"items": [{"role": "user", "content": "x"}] * 21}, 400),
        ("/v1/conversations", {"metadata": {"k" * 65: "v"}}, 400),
        ("/v1/conversations", {"metadata": {str(i): "v" for i in range(17)}}, 400),
        ("/v1/conversations", {"items": ["not an item"]}, 400),
        ("/v1/conversations", {"items": [{"role": "robot", "content": "x"}]}, 400),
        ("/v1/conversations", {"title": "not a field"}, 400),
    ],
)
async def test_a_bad_conversation_body_is_refused_naming_the_field(
    stored: tuple[httpx.AsyncClient, Provider], path: str, body: dict[str, Any], status: int
) -> None:
    c, _ = stored
    r = await c.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == "invalid_request"


async def test_a_conversation_and_a_previous_response_together_are_a_400(
    stored: tuple[httpx.AsyncClient, Provider],
) -> None:
    c, provider = stored
    conversation = (await c.post("/v1/conversations", json={})).json()
    r = await c.post("/v1/responses", json={"input": "hi", "conversation": conversation["id"],
                                            "previous_response_id": "resp_x"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "conversation"
    assert provider.bodies == []
