"""The ledger with real processes: the service writes its rows behind the requests, every
one of them at SIGTERM, all but the last second's at SIGKILL, and a restarted service
reads its budgets back, on SQLite (its default, a file in its working directory) and on
a real PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import store
from tests.conftest import AUTH_HEADERS, CLIENT_KEY, Process, openai_env, start_service
from tests.helpers import POSTGRES_BIN, REDIS, Postgres, Redis
from usage import Usage

pytestmark = pytest.mark.e2e


def count_rows(url: str) -> int:
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url) as pg:
            found = pg.execute("SELECT COUNT(*) FROM calls").fetchone()
    else:
        conn = sqlite3.connect(url)
        try:
            found = conn.execute("SELECT COUNT(*) FROM calls").fetchone()
        finally:
            conn.close()
    assert found is not None
    return int(found[0])


def complete(service: Process, prompt: str = "hello there", **body: object) -> httpx.Response:
    return httpx.post(
        service.url + "/complete",
        json={"prompt": prompt, **body},
        headers=AUTH_HEADERS,
        timeout=20,
    )


def mock_stats(mock: Process) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(mock.url + "/_stats", timeout=5).json()
    return stats


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "text-tool.db")  # where the service keeps it by default
        return
    if POSTGRES_BIN is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package)")
    server = Postgres()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def env_for(ledger_url: str, tmp_path: Path, mock: Process, **extra: str) -> dict[str, str]:
    env = openai_env(mock, LLM_MODEL="gpt-4o-mini", **extra)
    if ledger_url.startswith("postgresql://"):
        env["LEDGER_URL"] = ledger_url  # else unset: the default file in its directory
    return env


def test_a_call_without_notes_is_written_with_nulls_and_one_with_them_as_they_are(
    ledger_url: str,
) -> None:
    """A row holds "" and -1 for what a call did not have (sqlite3 binds those as they
    are, None and bool slowly); the INSERT makes them NULL again, on both databases."""
    ledger = store.Ledger(store.backend(ledger_url), logger=logging.getLogger("test.ledger"))
    ledger.open()
    try:
        fields = {"key": "k", "route": "/complete", "status": 200, "duration_ms": 1.5}
        ledger.record(1.0, "bare", fields, {})
        noted = {"call": type("Call", (), {"model": "m"})(), "upstream": "u", "deployment": "d",
                 "provider": "p", "error": "upstream_error", "finish_reason": "stop",
                 "cost_usd": 0.0, "provider_ms": 0.0, "ttft_ms": 2.5, "session": "s",
                 "usage": Usage(input_tokens=3, estimated=True)}  # fmt: skip
        ledger.record(2.0, "noted", fields, noted)
        assert ledger.flush(10.0)
        nullable = sorted(store.NULL_TEXT | store.NULL_NUMBER)
        found = ledger.read(
            f"SELECT request_id, input_tokens, estimated, {', '.join(nullable)} "
            "FROM calls ORDER BY at"
        )
    finally:
        ledger.close()
    bare, full = (
        dict(zip(["request_id", "input_tokens", "estimated", *nullable], r, strict=True))
        for r in found
    )
    assert bare == {
        "request_id": "bare",
        "input_tokens": 0,
        "estimated": False,
        **dict.fromkeys(nullable),
    }
    assert full == {"request_id": "noted", "input_tokens": 3, "estimated": True,
                    "model": "m", "upstream_model": "u",
                    "deployment": "d", "provider": "p", "error": "upstream_error",
                    "finish_reason": "stop", "cost_usd": 0.0, "provider_ms": 0.0,
                    "ttft_ms": 2.5, "session": "s"}  # fmt: skip


def test_sigterm_writes_a_row_for_every_call_in_flight(
    tmp_path: Path, mock_provider: Process, ledger_url: str
) -> None:
    service = start_service(tmp_path, env_for(ledger_url, tmp_path, mock_provider))
    try:
        assert complete(service).status_code == 200
        slow = 'mock:{"ttft_ms": 1500}\nslow one'
        calls = 8
        with concurrent.futures.ThreadPoolExecutor(calls) as pool:
            answers = [pool.submit(complete, service, slow) for _ in range(calls)]
            deadline = time.monotonic() + 10
            while mock_stats(mock_provider).get("requests", 0) < 1 + calls:
                assert time.monotonic() < deadline, "the calls did not reach the provider"
                time.sleep(0.05)
            service.proc.send_signal(signal.SIGTERM)
            statuses = [a.result(timeout=20).status_code for a in answers]
        assert statuses == [200] * calls  # each let finish, and each a row
        service.proc.wait(timeout=15)
        assert count_rows(ledger_url) == 1 + calls
        assert "ledger_lost" not in service.output()
    finally:
        service.stop()


def test_sigkill_loses_at_most_the_last_second_of_calls(
    tmp_path: Path, mock_provider: Process
) -> None:
    service = start_service(tmp_path, openai_env(mock_provider, LLM_MODEL="gpt-4o-mini"))
    db = str(tmp_path / "text-tool.db")
    try:
        for _ in range(10):
            assert complete(service).status_code == 200
        deadline = time.monotonic() + 5  # the writer takes what waits at most 1 s apart
        while count_rows(db) < 10:
            assert time.monotonic() < deadline, "the rows were not written within 5 s"
            time.sleep(0.1)
        for _ in range(5):
            assert complete(service).status_code == 200
        service.proc.kill()
        service.proc.wait(timeout=10)
        assert 10 <= count_rows(db) <= 15  # the last second's 5 may be lost, no more
    finally:
        service.stop()


def test_a_restart_gives_no_key_a_fresh_budget(
    tmp_path: Path, mock_provider: Process, ledger_url: str
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "capped"\nkey = "{CLIENT_KEY}"\nbudget_usd = 0.001\n'
        'budget_period = "month"\n'
    )
    env = env_for(ledger_url, tmp_path, mock_provider, API_KEYS_FILE=str(keys))
    del env["API_KEYS"]
    big = 'mock:{"tokens": 1000}\nspend it'  # gpt-4o-mini: 1,000 out cost $0.0006
    service = start_service(tmp_path, env)
    try:
        spent = complete(service, big, max_tokens=1000)
        assert spent.status_code == 200 and spent.json()["output_tokens"] == 1000
        usage = httpx.get(
            service.url + "/usage?group_by=model", headers=AUTH_HEADERS, timeout=10
        ).json()
        assert usage["keys"] == ["capped"]
        assert [(r["model"], r["requests"], r["output_tokens"]) for r in usage["rows"]] == [
            ("gpt-4o-mini", 1, 1000)
        ]
    finally:
        service.stop()
    again = start_service(tmp_path, env)
    try:
        # its worst case ($0.0006) on top of what the ledger says was spent is over $0.001
        refused = complete(again, big, max_tokens=1000)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "budget_exceeded"
        by_day = httpx.get(
            again.url + "/usage", params={"group_by": "day"}, headers=AUTH_HEADERS, timeout=10
        ).json()
        assert by_day["total"]["requests"] == 2  # the call before, and the refusal
        assert [r["requests"] for r in by_day["rows"]] == [2]
        lines = [json.loads(line) for line in again.output().splitlines() if line.startswith("{")]
        (start,) = [line for line in lines if line.get("event") == "start"]
        assert start["ledger"].startswith(("sqlite", "postgresql"))
    finally:
        again.stop()


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (.ci/run does it)")
def test_an_emptied_redis_is_refilled_from_the_ledger_before_it_admits(
    tmp_path: Path, mock_provider: Process
) -> None:
    import redis as redis_client

    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "capped"\nkey = "{CLIENT_KEY}"\nbudget_usd = 0.0025\n'
        'budget_period = "month"\n'
    )
    server = Redis(tmp_path)
    server.start()
    env = openai_env(mock_provider, LLM_MODEL="gpt-4o-mini", API_KEYS_FILE=str(keys),
                     RATE_LIMIT_STORE=server.url)  # fmt: skip
    del env["API_KEYS"]
    # two replicas of one machine: one Redis, one ledger file (the default, in their
    # shared working directory)
    one, two = start_service(tmp_path, env), start_service(tmp_path, env)
    big = 'mock:{"tokens": 1000}\nspend it'  # each about $0.0006 of a $0.0025 budget
    try:
        for replica in (one, two):
            assert complete(replica, big, max_tokens=1000).status_code == 200
        redis_client.Redis.from_url(server.url).flushall()  # restarted without persistence
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = [pool.submit(complete, (one, two)[i % 2], big, max_tokens=1000)
                       for i in range(10)]  # fmt: skip
            statuses = sorted(a.result(timeout=30).status_code for a in answers)
        # two more fit what the ledger says is left, not four (an empty store's)
        assert statuses == [200] * 2 + [429] * 8
        assert "store_refilled" in one.output() + two.output()
    finally:
        one.stop()
        two.stop()
        server.stop()


def test_a_stored_response_is_continued_on_another_replica_and_after_a_restart(
    tmp_path: Path, mock_provider: Process, ledger_url: str
) -> None:
    env = env_for(ledger_url, tmp_path, mock_provider)
    if not ledger_url.startswith("postgresql://"):
        env["LEDGER_URL"] = ledger_url  # one file, both replicas
    one, two = start_service(tmp_path, env), start_service(tmp_path, env)
    try:
        first = httpx.post(one.url + "/v1/responses", json={"input": "My name is Ada."},
                           headers=AUTH_HEADERS, timeout=20)  # fmt: skip
        assert first.status_code == 200 and first.json()["store"] is True
        second = httpx.post(
            two.url + "/v1/responses",
            json={"input": "What is my name?", "previous_response_id": first.json()["id"]},
            headers=AUTH_HEADERS, timeout=20,
        )  # fmt: skip
        assert second.status_code == 200, second.text
        sent = httpx.get(mock_provider.url + "/_last", timeout=5).json()["body"]
        assert "My name is Ada." in json.dumps(sent["messages"])
        # An Anthropic message thread, the same way
        turn = {"max_tokens": 50, "messages": [{"role": "user", "content": "I am Bo."}],
                "thread": {"type": "create"}}  # fmt: skip
        created = httpx.post(one.url + "/v1/messages", json=turn, headers=AUTH_HEADERS,
                             timeout=20)  # fmt: skip
        assert created.status_code == 200, created.text
        turn["thread"] = {"type": "continue", "previous_message_id": created.json()["id"]}
        turn["messages"] = [{"role": "user", "content": "Who am I?"}]
        continued = httpx.post(two.url + "/v1/messages", json=turn, headers=AUTH_HEADERS,
                               timeout=20)  # fmt: skip
        assert continued.status_code == 200, continued.text
    finally:
        one.stop()
        two.stop()
    again = start_service(tmp_path, env)
    try:
        turn["thread"]["previous_message_id"] = continued.json()["id"]  # type: ignore[index]
        turn["messages"] = [{"role": "user", "content": "And now?"}]
        last = httpx.post(again.url + "/v1/messages", json=turn, headers=AUTH_HEADERS, timeout=20)
        assert last.status_code == 200, last.text
        sent = httpx.get(mock_provider.url + "/_last", timeout=5).json()["body"]
        assert [m["content"] for m in sent["messages"] if m["role"] == "user"] == [
            "I am Bo.", "Who am I?", "And now?"]  # fmt: skip
        got = httpx.get(again.url + f"/v1/responses/{second.json()['id']}",
                        headers=AUTH_HEADERS, timeout=10)  # fmt: skip
        assert got.status_code == 200 and got.json() == second.json()
        listed = again.url + f"/v1/responses/{second.json()['id']}/input_items"
        items = httpx.get(listed, params={"order": "asc"}, headers=AUTH_HEADERS, timeout=10).json()
        assert len(items["data"]) == 3
    finally:
        again.stop()


def test_two_replicas_adding_to_one_conversation_at_once_lose_no_item(
    tmp_path: Path, mock_provider: Process, ledger_url: str
) -> None:
    env = {**env_for(ledger_url, tmp_path, mock_provider), "LEDGER_URL": ledger_url}
    replicas = [start_service(tmp_path, env), start_service(tmp_path, env)]
    try:
        made = httpx.post(replicas[0].url + "/v1/conversations", json={},
                          headers=AUTH_HEADERS, timeout=10).json()  # fmt: skip
        path = f"/v1/conversations/{made['id']}/items"

        def add(n: int) -> int:
            items = [{"role": "user", "content": f"{n}-{i}"} for i in range(3)]
            return httpx.post(replicas[n % 2].url + path, json={"items": items},
                              headers=AUTH_HEADERS, timeout=20).status_code  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(add, range(16))) == [200] * 16
        listed = httpx.get(replicas[1].url + path, params={"limit": 100, "order": "asc"},
                           headers=AUTH_HEADERS, timeout=10).json()["data"]  # fmt: skip
    finally:
        for replica in replicas:
            replica.stop()
    texts = [item["content"][0]["text"] for item in listed]
    assert sorted(texts) == sorted(f"{n}-{i}" for n in range(16) for i in range(3))
    for n in range(16):  # each request's items together, in their order
        at = texts.index(f"{n}-0")
        assert texts[at : at + 3] == [f"{n}-0", f"{n}-1", f"{n}-2"]
