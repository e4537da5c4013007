"""The ledger (store.py): one row per admitted call, written behind the request, kept
across restarts, and asked through GET /usage (dashboard.py). In process, on SQLite; the
same tests run on a real PostgreSQL in test_ledger_e2e.py."""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import store
from config import Settings
from server import create_app
from store import COLUMNS, MIGRATIONS, Backend, Ledger
from tests.conftest import CLIENT_KEY
from tests.helpers import client, openai_answer

pytestmark = pytest.mark.anyio

ADMIN_KEY = "admin-" + "k3y" * 8
OTHER_KEY = "other-" + "k3y" * 8
KEYS = f"""
[[keys]]
name = "team-a"
key = "{CLIENT_KEY}"

[[keys]]
name = "ops"
key = "{ADMIN_KEY}"
admin = true

[[keys]]
name = "team-b"
key = "{OTHER_KEY}"
models = ["gpt-4o-mini"]
"""


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    try:
        cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM calls ORDER BY id")
        return [dict(zip(COLUMNS, found, strict=True)) for found in cursor.fetchall()]
    finally:
        conn.close()


def failing_provider(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if "fail" in json.dumps(body.get("messages")):
        return httpx.Response(500, json={"error": {"message": "boom", "type": "server_error"}})
    return openai_answer(request)


@pytest.fixture
def books(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    db = tmp_path / "ledger.db"
    settings = Settings(
        provider="openai",
        openai_api_key="sk-provider-" + "x" * 20,
        openai_base_url="http://provider.test/v1",
        model="gpt-4o-mini",
        models=("gpt-4o-mini", "gpt-4o"),
        api_keys_file=keys,
        max_retries=0,
        ledger_url=str(db),
    )
    app = create_app(settings, transport=httpx.MockTransport(failing_provider))
    yield app, db
    app.state.ledger.close()


async def test_every_admitted_call_is_one_row_with_its_figures_and_no_text(
    books: tuple[Any, Path],
) -> None:
    app, db = books
    async with client(app) as http:
        done = await http.post(
            "/complete",
            json={"prompt": "a secret prompt", "max_tokens": 30},
            headers={"x-claude-code-session-id": "session-1"},
        )
        assert done.status_code == 200
        streamed = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]},
        )  # fmt: skip
        assert streamed.status_code == 200
        failed = await http.post("/complete", json={"prompt": "fail now"})
        assert failed.status_code == 502
        refused = await http.post("/complete", json={"prompt": "x", "model": "nope"})
        assert refused.status_code in (403, 404)  # never admitted: no row
    assert app.state.ledger.flush(5.0)
    rows = ledger_rows(db)
    assert [r["route"] for r in rows] == ["/complete", "/v1/chat/completions", "/complete"]
    first, second, third = rows
    answer = done.json()
    assert first["request_id"] == done.headers["x-request-id"]
    assert (first["key"], first["model"], first["status"], first["error"]) == (
        "team-a", "gpt-4o-mini", 200, None,
    )  # fmt: skip
    assert (first["input_tokens"], first["output_tokens"]) == (
        answer["input_tokens"], answer["output_tokens"],
    )  # fmt: skip
    assert first["cost_usd"] == pytest.approx(answer["cost_usd"])
    assert first["finish_reason"] == answer["finish_reason"]
    assert first["session"] == "session-1"
    assert first["deployment"] and first["provider"] == "openai"
    assert first["upstream_model"] == "gpt-4o-mini"
    assert first["duration_ms"] > 0 and first["provider_ms"] is not None
    assert first["estimated"] in (0, False)
    # the stream: the provider's own counts, its time to first token
    assert (second["model"], second["input_tokens"], second["output_tokens"]) == (
        "gpt-4o", 1000, 2000,
    )  # fmt: skip
    assert second["ttft_ms"] is not None and second["cost_usd"] > 0
    # the provider's failure is a row too, with nothing billed
    assert (third["status"], third["error"], third["output_tokens"]) == (502, "upstream_error", 0)
    assert "secret prompt" not in db.read_bytes().decode("latin-1")
    assert all(CLIENT_KEY not in json.dumps(r) for r in rows)


async def test_usage_answers_from_the_ledger_by_group_as_json_and_csv(
    books: tuple[Any, Path],
) -> None:
    app, _ = books
    async with client(app) as http:
        for model in ("gpt-4o-mini", "gpt-4o", "gpt-4o"):
            await http.post("/complete", json={"prompt": "one two", "model": model})
        other = {"X-API-Key": OTHER_KEY}
        await http.post("/complete", json={"prompt": "b"}, headers=other)
        by_model = (await http.get("/usage?group_by=model")).json()
        assert by_model["keys"] == ["team-a"] and by_model["group_by"] == "model"
        assert [(r["model"], r["requests"]) for r in by_model["rows"]] == [
            ("gpt-4o", 2), ("gpt-4o-mini", 1),
        ]  # fmt: skip
        assert by_model["total"]["requests"] == 3
        assert by_model["total"]["cost_usd"] == pytest.approx(
            sum(r["cost_usd"] for r in by_model["rows"])
        )
        by_day = (await http.get("/usage", params={"group_by": "day"})).json()
        assert len(by_day["rows"]) == 1 and len(by_day["rows"][0]["day"]) == 10
        as_csv = await http.get("/usage?group_by=model", headers={"Accept": "text/csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [(r["model"], r["requests"]) for r in table] == [
            ("gpt-4o", "2"),
            ("gpt-4o-mini", "1"),
        ]
        # the admin sees every key, or the one it names; the others only their own
        admin = {"X-API-Key": ADMIN_KEY}
        every = (await http.get("/usage?group_by=key", headers=admin)).json()
        assert [(r["key"], r["requests"]) for r in every["rows"]] == [("team-a", 3), ("team-b", 1)]
        named = (await http.get("/usage?key=team-b", headers=admin)).json()
        assert named["total"]["requests"] == 1
        peek = await http.get("/usage?key=team-b")
        assert peek.status_code == 403 and peek.json()["error"]["message"].startswith("key:")
        own = (await http.get("/usage?group_by=key", headers=other)).json()
        assert [r["key"] for r in own["rows"]] == ["team-b"]
        # an empty range is no rows, not an error
        empty = (await http.get("/usage?from=2020-01-01&to=2020-01-02")).json()
        assert empty["rows"] == [] and empty["total"]["requests"] == 0
        # without parameters: since start, as before
        assert (await http.get("/usage")).json()["requests"] == 3


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("group_by=color", "group_by"),
        ("from=2026-12-02&to=2026-12-01", "from"),
        ("limit=5&group_by=day", "limit"),
    ],
)
async def test_a_bad_usage_parameter_is_a_400_naming_it(
    books: tuple[Any, Path], query: str, param: str
) -> None:
    app, _ = books
    async with client(app) as http:
        answer = await http.get(f"/usage?{query}")
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].startswith(f"{param}:")


async def test_usage_of_the_ledger_is_a_clear_400_when_it_is_off() -> None:
    settings = Settings(api_keys=(CLIENT_KEY,))  # made in code: no ledger unless given
    async with client(create_app(settings)) as http:
        answer = await http.get("/usage?group_by=model")
        assert answer.status_code == 400 and "LEDGER_URL" in answer.json()["error"]["message"]
        assert (await http.get("/usage")).status_code == 200


async def test_a_restart_reads_back_this_periods_spend_and_token_window(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "capped"\nkey = "{CLIENT_KEY}"\nbudget_usd = 0.03\n'
        'token_limit = "6000/hour"\n'
    )
    settings = Settings(
        provider="openai",
        openai_api_key="sk-provider-" + "x" * 20,
        openai_base_url="http://provider.test/v1",
        model="gpt-4o",
        api_keys_file=keys,
        max_retries=0,
        ledger_url=str(tmp_path / "ledger.db"),
    )
    chat = {"stream": True, "max_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]}
    app = create_app(settings, transport=httpx.MockTransport(openai_answer))
    async with client(app) as http:
        first = await http.post("/v1/chat/completions", json=chat)  # 1,000 in, 2,000 out
        assert first.status_code == 200
        await first.aread()
    app.state.ledger.close()  # as at SIGTERM
    again = create_app(settings, transport=httpx.MockTransport(openai_answer))
    try:
        async with client(again) as http:
            # 3,000 tokens are in the hour's window, a worst case of 2,000 + input fits;
            # the budget: gpt-4o's 1,000 in and 2,000 out cost $0.0225, and a worst case
            # of $0.02 more is over $0.03
            refused = await http.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        quotas = again.state.admission.quotas
        assert sum(entry[1] for entry in quotas.windows["capped"]) == 3000
    finally:
        again.state.ledger.close()


def test_the_schema_upgrades_from_every_earlier_version(tmp_path: Path) -> None:
    for version in range(len(MIGRATIONS)):
        path = tmp_path / f"v{version}.db"
        db = store.backend(str(path))
        conn = db.connect()
        if version:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
            for statements in MIGRATIONS[:version]:
                for statement in statements:
                    conn.execute(statement.format(serial=db.serial))
        assert store.upgrade(conn, db) == len(MIGRATIONS)
        assert store.upgrade(conn, db) == len(MIGRATIONS)  # and again: nothing to do
        conn.close()


def test_sqlite_url_forms_name_the_same_file(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/a.db", f"{tmp_path}/a.db"):
        assert store.backend(url).where == f"{tmp_path}/a.db"
    assert store.backend("sqlite:rel.db").where == "rel.db"
    assert store.backend("sqlite:///rel.db").where == "rel.db"


class Flaky:
    """A database that is down until `up` is set (a connect that fails), then SQLite."""

    def __init__(self, path: Path) -> None:
        self.real = store.backend(str(path))
        self.up = threading.Event()
        self.up.set()

    def backend(self) -> Backend:
        def connect() -> Any:
            if not self.up.is_set():
                raise sqlite3.OperationalError("database is down")
            return self.real.connect()

        return Backend(**{**self.real.__dict__, "connect": connect})


def row(n: int) -> tuple[Any, ...]:
    values: dict[str, Any] = dict.fromkeys(COLUMNS, 0)
    values.update(at=float(n), request_id=f"r{n}", key="k", route="/complete",
                  estimated=0, duration_ms=1.0)  # fmt: skip
    return tuple(values[c] for c in COLUMNS)


def test_rows_wait_while_the_database_is_down_and_none_are_lost(tmp_path: Path) -> None:
    flaky = Flaky(tmp_path / "flaky.db")
    logger = logging.getLogger("test.ledger")
    ledger = Ledger(flaky.backend(), logger=logger, interval_s=0.05)
    ledger.open()
    flaky.up.clear()
    for n in range(300):
        ledger.add(row(n))
    assert not ledger.flush(0.3)  # down: nothing written, every row waiting
    assert ledger.waiting == 300 and ledger.written == 0
    flaky.up.set()
    assert ledger.flush(5.0)
    ledger.close()
    assert [r["request_id"] for r in ledger_rows(tmp_path / "flaky.db")] == [
        f"r{n}" for n in range(300)
    ]


def test_past_the_bound_rows_are_dropped_and_counted_not_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Flaky(tmp_path / "bounded.db")
    ledger = Ledger(flaky.backend(), logger=logging.getLogger("test.ledger"),
                    interval_s=0.05, bound=100)  # fmt: skip
    ledger.open()
    flaky.up.clear()
    with caplog.at_level(logging.ERROR, logger="test.ledger"):
        for n in range(250):
            ledger.add(row(n))
    assert (ledger.waiting, ledger.dropped) == (100, 150)
    assert any(getattr(r, "event", "") == "ledger_dropped" for r in caplog.records)
    flaky.up.set()
    assert ledger.flush(5.0)
    ledger.close()
    assert len(ledger_rows(tmp_path / "bounded.db")) == 100


def test_close_writes_every_row_left(tmp_path: Path) -> None:
    path = tmp_path / "close.db"
    ledger = Ledger(store.backend(str(path)), logger=logging.getLogger("t"), interval_s=60)
    ledger.open()
    for n in range(1234):
        ledger.add(row(n))
    ledger.close()  # the writer was asleep for a minute: close wakes it and waits
    assert len(ledger_rows(path)) == 1234


def test_an_unreachable_ledger_stops_the_start_with_one_line(tmp_path: Path) -> None:
    from config import SettingsError

    (tmp_path / "dir").mkdir()
    with pytest.raises(SettingsError, match=r"^LEDGER_URL: cannot open the ledger at "):
        create_app(Settings(ledger_url=str(tmp_path / "dir")))


def test_the_environment_keeps_a_ledger_by_default() -> None:
    assert Settings.from_env({}, env_file=None).ledger_url == "text-tool.db"
    assert Settings.from_env({"LEDGER_URL": "off"}, env_file=None).ledger_url == "off"
    assert Settings().ledger_url == "off"


def test_rows_past_the_retention_are_pruned(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    now = 1_000 * 86400.0
    ledger = Ledger(store.backend(str(path)), logger=logging.getLogger("t"), interval_s=0.05,
                    retention_days=30, clock=lambda: now)  # fmt: skip
    ledger.open()
    for age_days in (40, 31, 29, 1):
        ledger.add(row(int(now - age_days * 86400)))
    assert ledger.flush(5.0)
    stored = "INSERT INTO responses VALUES (?, 'k', ?, NULL, '[]', '{}')"
    conn = ledger.db.connect()
    for age_days in (8, 6):  # stored responses, kept 7 days
        ledger.execute(conn, stored, (f"r{age_days}", now - age_days * 86400))
        # a message thread, kept 7 days after its last use, its turns with it
        at = now - age_days * 86400
        ledger.execute(conn, "INSERT INTO threads VALUES (?, 'k', ?, ?, '{}')",
                       (f"t{age_days}", at - 86400 * 30, at))  # fmt: skip
        ledger.execute(conn, "INSERT INTO thread_messages VALUES (?, ?, ?, NULL, '[]', '{}')",
                       (f"m{age_days}", f"t{age_days}", at))  # fmt: skip
    conn.close()
    ledger.close()
    again = Ledger(store.backend(str(path)), logger=logging.getLogger("t"), interval_s=0.05,
                   retention_days=30, state_retention_days=7, clock=lambda: now)  # fmt: skip
    again.open()  # prunes on its first round, then about once an hour
    deadline = time.monotonic() + 5
    while (
        len(ledger_rows(path)) > 2
        or len(again.read("SELECT id FROM responses")) > 1
        or len(again.read("SELECT id FROM thread_messages")) > 1
    ):
        assert time.monotonic() < deadline, "the old rows were not pruned"
        time.sleep(0.02)
    assert again.read("SELECT id FROM responses") == [("r6",)]  # deleted, not flagged
    assert again.read("SELECT id FROM threads") == [("t6",)]
    assert again.read("SELECT id, thread_id FROM thread_messages") == [("m6", "t6")]
    again.close()
    assert [r["at"] for r in ledger_rows(path)] == [now - 29 * 86400, now - 86400]
