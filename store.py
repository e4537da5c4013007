"""The durable store: the ledger, one row per call that reached admission.

What a row holds is what the access line says of a call (who, which route and model,
which deployment, the status and error, the token counts and whether they were
estimated, the cost, the times, the client's session), never a prompt or an answer.

Two databases behind one small interface, both through their DB-API drivers:
SQLite by default (the standard library's `sqlite3`: nothing to install; a file in
WAL mode, which several workers of one machine share), PostgreSQL (`psycopg` 3, the
`postgres` extra) when replicas on several machines keep one book. Why not a layer
such as SQLAlchemy: the ledger is one table written in batches and a few grouped
sums read back; the two drivers differ in three small things (the parameter mark,
the id column, a bucket's expression), which `Backend` holds, and a layer would add
its import and an object per row for nothing (bench/README.md has the figures).

Writing costs a request nothing it waits for: `Ledger.add` appends a tuple to a
bounded deque on the event loop's thread; one writer thread of its own takes what is
there at most `interval_s` apart and writes it in one transaction. A database that
stalls or is down stalls only that thread: rows wait (a gauge and one log line say
how many), and past `bound` are dropped (a counter and a log line, with the count);
they are written when it is back. `close` writes every row left (SIGTERM); a SIGKILL
loses what was not yet written, at most the last `interval_s` of calls.

The schema is versioned (`MIGRATIONS`, `schema_version`) and upgraded at start, each
step in a transaction that one process at a time runs.
"""

from __future__ import annotations

import asyncio
import atexit
import calendar
import collections
import contextlib
import itertools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from quotas import period_bucket
from usage import Usage

# One row of the ledger, in this order.
COLUMNS = (
    "at",  # when the request began, seconds since the epoch (UTC)
    "request_id",
    "key",
    "route",
    "model",  # as the client named it
    "upstream_model",  # as the deployment serving it was asked
    "deployment",
    "provider",
    "status",
    "error",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "estimated",
    "cost_usd",
    "duration_ms",
    "provider_ms",
    "ttft_ms",
    "session",
)

# Each version of the schema is the statements that make it from the one before.
# `{serial}` is the backend's auto-numbered id column.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the ledger of calls
        """CREATE TABLE calls (
            id {serial} PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            key TEXT NOT NULL,
            route TEXT NOT NULL,
            model TEXT,
            upstream_model TEXT,
            deployment TEXT,
            provider TEXT,
            status INTEGER NOT NULL,
            error TEXT,
            finish_reason TEXT,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,
            reasoning_tokens BIGINT NOT NULL,
            estimated BOOLEAN NOT NULL,
            cost_usd DOUBLE PRECISION,
            duration_ms DOUBLE PRECISION NOT NULL,
            provider_ms DOUBLE PRECISION,
            ttft_ms DOUBLE PRECISION,
            session TEXT
        )""",
        "CREATE INDEX calls_at ON calls (at)",
        "CREATE INDEX calls_key_at ON calls (key, at)",
    ),
    (  # 2: stored responses (the Responses API's state), each owned by the key that made it
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            key TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            previous_id TEXT,
            input TEXT NOT NULL,
            response TEXT NOT NULL
        )""",
        "CREATE INDEX responses_created ON responses (created_at)",
    ),
    (  # 3: conversations (OpenAI's Conversations API) and their items, in order
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            key TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION NOT NULL,
            metadata TEXT NOT NULL
        )""",
        "CREATE INDEX conversations_used ON conversations (used_at)",
        """CREATE TABLE conversation_items (
            conversation_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            id TEXT NOT NULL,
            item TEXT NOT NULL,
            PRIMARY KEY (conversation_id, position)
        )""",
        "CREATE INDEX conversation_items_id ON conversation_items (conversation_id, id)",
    ),
    (  # 4: Anthropic's message threads: the fields each keeps, and its turns
        """CREATE TABLE threads (
            id TEXT PRIMARY KEY,
            key TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION NOT NULL,
            fields TEXT NOT NULL
        )""",
        "CREATE INDEX threads_used ON threads (used_at)",
        """CREATE TABLE thread_messages (
            id TEXT PRIMARY KEY,
            thread_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            previous_id TEXT,
            messages TEXT NOT NULL,
            reply TEXT NOT NULL
        )""",
        "CREATE INDEX thread_messages_thread ON thread_messages (thread_id)",
    ),
)

# What the rows left waiting may hold at most: about 400 bytes each, 20 MB.
DEFAULT_BOUND = 50_000
# Rows a transaction writes at most (a backlog is written in several).
BATCH_ROWS = 5_000
# Questions of the books answered at once (the rest wait their turn), and the most rows
# one answers with: a grouping by a client's own session ids is bounded too.
READERS = 2
MAX_READ_ROWS = 10_000

T = TypeVar("T")


class Connection(Protocol):
    """What the ledger uses of a DB-API connection (sqlite3's and psycopg's)."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def close(self) -> None: ...


class StoreError(Exception):
    """The store cannot be opened or upgraded: a start-up error naming LEDGER_URL."""


@dataclass(frozen=True)
class Backend:
    """One database: how to connect, and the little SQL in which the two differ."""

    name: str  # "sqlite" or "postgresql"
    where: str  # the file or the server, for the start-up line (no password)
    connect: Callable[[], Any]
    mark: str  # the parameter mark: "?" or "%s"
    serial: str  # the auto-numbered id column
    lock: str  # serializes upgrades of the schema, inside a transaction
    begin: str  # opens a transaction that writes

    def bucket(self, seconds: int) -> str:
        """SQL for the start of the `seconds`-long bucket (a day, an hour) of `at`."""
        if self.name == "sqlite":
            return f"(CAST(at / {seconds} AS INTEGER) * {seconds})"
        return f"(FLOOR(at / {seconds}) * {seconds})"

    def marks(self, n: int) -> str:
        return ", ".join([self.mark] * n)


def backend(url: str) -> Backend:
    """The backend LEDGER_URL names: `postgresql://...` (or `postgres://`), or an SQLite
    file (`sqlite:////abs/path` and `sqlite:///rel/path` as SQLAlchemy writes them,
    `sqlite:rel/path`, or a plain path)."""
    if url.startswith(("postgresql://", "postgres://")):
        return _postgresql(url)
    path = url
    for prefix in ("sqlite:///", "sqlite://", "sqlite:"):
        if url.startswith(prefix):
            path = url[len(prefix) :]  # as SQLAlchemy reads it: sqlite:////abs, sqlite:///rel
            break
    return _sqlite(Path(path))


def _sqlite(path: Path) -> Backend:
    def connect() -> sqlite3.Connection:
        # autocommit (isolation_level None): transactions are the ledger's own BEGINs
        conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers and other workers' writers
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL's durable-enough, much cheaper
        return conn

    return Backend(
        name="sqlite",
        where=str(path),
        connect=connect,
        mark="?",
        serial="INTEGER",
        lock="SELECT 1",  # BEGIN IMMEDIATE has the write lock already
        begin="BEGIN IMMEDIATE",
    )


def _postgresql(url: str) -> Backend:
    try:
        import psycopg
    except ImportError:
        raise StoreError("PostgreSQL needs the postgres extra (uv sync --extra postgres)") from None
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    shown = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"

    def connect() -> Any:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)

    return Backend(
        name="postgresql",
        where=shown,
        connect=connect,
        mark="%s",
        serial="BIGSERIAL",
        lock="SELECT pg_advisory_xact_lock(7447101)",  # one upgrader among the replicas
        begin="BEGIN",
    )


def upgrade(conn: Any, db: Backend) -> int:
    """Bring the schema to the newest version, each step in its own transaction; the
    version it is at now."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    while True:
        conn.execute(db.begin)
        try:
            conn.execute(db.lock)
            found = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if found is None else int(found[0])
            if version >= len(MIGRATIONS):
                conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                conn.execute(statement.format(serial=db.serial))
            if found is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            else:
                conn.execute(f"UPDATE schema_version SET version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# A row holds "" for a NULL text and -1 for a NULL number, and `estimated` as 0 or 1
# (an int: PostgreSQL has no `boolean <> integer`), which the INSERT turns back
# (`insert_sql`): the standard library's sqlite3 binds str, int and float as they are
# but passes None and bool through its adapters' registry, which looks up a protocol
# attribute that is not there and formats the AttributeError, each time: 8.7k of a
# row's 48.7k instructions (bench/README.md). None works as well. So an empty text or
# a -1 is NULL too: neither is a value a call has (a model, an error, a session id; a
# cost, a time).
NULL_TEXT = frozenset(
    {"model", "upstream_model", "deployment", "provider", "error", "finish_reason", "session"}
)
NULL_NUMBER = frozenset({"cost_usd", "provider_ms", "ttft_ms"})


def insert_sql(mark: str) -> str:
    """The INSERT of one row of the calls, with `mark` the backend's parameter mark."""

    def value(column: str) -> str:
        if column in NULL_TEXT:
            return f"NULLIF({mark}, '')"
        if column in NULL_NUMBER:
            return f"NULLIF({mark}, -1)"
        if column == "estimated":
            return f"({mark} <> 0)"
        return mark

    return f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join(map(value, COLUMNS))})"


def call_row(
    started: float, rid: str, fields: Mapping[str, Any], call: Mapping[str, Any]
) -> tuple[Any, ...]:
    """The ledger's row of one call, from what the access line and the call's notes say
    (requestlog.CALL): `started` is the request's wall-clock start."""
    usage: Usage = call.get("usage") or Usage()
    get = call.get
    cost, provider_ms, ttft_ms = get("cost_usd"), get("provider_ms"), get("ttft_ms")
    return (
        started,
        rid,
        fields.get("key") or "anonymous",
        fields["route"],
        getattr(get("call"), "model", None) or "",
        get("upstream") or "",
        get("deployment") or "",
        get("provider") or "",
        fields["status"],
        get("error") or "",
        get("finish_reason") or "",
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
        1 if usage.estimated else 0,
        -1 if cost is None else cost,
        fields["duration_ms"],
        -1 if provider_ms is None else provider_ms,
        -1 if ttft_ms is None else ttft_ms,
        get("session") or "",
    )


class Ledger:
    """The rows of calls, written behind the requests by a thread of its own."""

    def __init__(
        self,
        db: Backend,
        *,
        logger: logging.Logger,
        interval_s: float = 1.0,
        bound: int = DEFAULT_BOUND,
        retention_days: float = 0.0,
        state_retention_days: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.logger = logger
        self.interval_s = interval_s
        self.bound = bound
        self.retention_days = retention_days
        self.state_retention_days = state_retention_days
        self._clock = clock
        self._waiting: collections.deque[tuple[Any, ...]] = collections.deque()
        self.added = 0  # rows taken (the loop's thread counts them)
        self.written = 0  # rows written (the writer's thread counts them)
        self.dropped = 0
        self._dropped_logged = 0
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._insert = insert_sql(db.mark)
        self._pruned_at = 0.0
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="ledger-reader")

    # --- on the event loop's thread -------------------------------------------------

    def open(self) -> None:
        """Upgrade the schema and start the writer; a StoreError naming the database when
        it cannot be reached or upgraded."""
        try:
            conn = self.db.connect()
            try:
                upgrade(conn, self.db)
            finally:
                conn.close()
        except Exception as exc:  # the drivers' own errors: any is a failed start
            raise StoreError(f"cannot open the ledger at {self.db.where}: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        # An app mounted in another gets no lifespan, so no shutdown of ours: the rows
        # still waiting are written as the interpreter exits.
        atexit.register(self.close)

    def add(self, row: tuple[Any, ...]) -> None:
        """Take one row to be written; never waits. Past `bound` rows waiting (the
        database has been down a while), the row is dropped and counted."""
        if len(self._waiting) >= self.bound:
            self.dropped += 1
            if self.dropped >= 2 * self._dropped_logged:  # 1, 2, 4, 8...: a few lines
                self._dropped_logged = self.dropped
                self.logger.error(
                    "ledger rows dropped: the database is not taking them",
                    extra={"event": "ledger_dropped", "dropped": self.dropped},
                )
            return
        self._waiting.append(row)
        self.added += 1

    def record(
        self, started: float, rid: str, fields: Mapping[str, Any], call: Mapping[str, Any]
    ) -> None:
        """The access line's hook (requestlog): one admitted call's row."""
        self.add(call_row(started, rid, fields, call))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def flush(self, timeout_s: float) -> bool:
        """Wait (in a thread, not on the loop) until every row taken so far is written;
        False if that did not happen within `timeout_s`."""
        target = self.added
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        with self._done:
            while self.written < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._done.wait(left)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write every row left, then stop the writer (SIGTERM's shutdown); rows still
        waiting when `timeout_s` runs out (the database is down) are logged as lost."""
        self._readers.shutdown(wait=False, cancel_futures=True)
        thread = self._thread
        if thread is None:
            return
        atexit.unregister(self.close)
        self._stopping = True
        self._wake.set()
        thread.join(timeout_s)
        self._thread = None
        lost = len(self._waiting)
        if lost:
            self.logger.error(
                "ledger rows lost at shutdown: the database did not take them",
                extra={"event": "ledger_lost", "rows": lost},
            )

    # --- on the writer's thread --------------------------------------------------------

    def _run(self) -> None:
        conn: Any = None
        failing = False
        while True:
            stopping = self._stopping
            if not stopping:
                self._wake.wait(self.interval_s)
                self._wake.clear()
            try:
                if conn is None:
                    conn = self.db.connect()
                while self._waiting:
                    self._write(conn)
                self._prune(conn)
                if failing:
                    failing = False
                    self.logger.info("ledger written again", extra={"event": "ledger_resumed"})
            except Exception as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                if not failing:
                    failing = True
                    self.logger.error(
                        "ledger rows waiting: the database is not taking them",
                        extra={"event": "ledger_waiting", "rows": len(self._waiting),
                               "error": f"{type(exc).__name__}: {exc}"[:300]},
                    )  # fmt: skip
                if stopping:
                    return  # close() logs what is lost
                time.sleep(min(self.interval_s, 1.0))
                continue
            if stopping and not self._waiting:
                if conn is not None:
                    conn.close()
                return

    def _write(self, conn: Any) -> None:
        """One transaction of the rows waiting (up to BATCH_ROWS); put back if it fails,
        so nothing is lost to a database that is down for a while."""
        waiting = self._waiting
        # popleft() n times, in C: the loop's thread only appends, so n are there.
        n = min(len(waiting), BATCH_ROWS)
        batch = list(itertools.starmap(waiting.popleft, itertools.repeat((), n)))
        try:
            conn.execute(self.db.begin)
            cursor = conn.cursor()
            cursor.executemany(self._insert, batch)
            conn.execute("COMMIT")
        except BaseException:
            waiting.extendleft(reversed(batch))
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        with self._done:
            self.written += len(batch)
            self._done.notify_all()

    def _prune(self, conn: Any) -> None:
        """Rows and stored responses older than their retention, deleted (not flagged)
        about once an hour."""
        now = self._clock()
        if now - self._pruned_at < 3600:
            return
        self._pruned_at = now
        m = self.db.mark
        if self.retention_days > 0:
            conn.execute(f"DELETE FROM calls WHERE at < {m}", (now - self.retention_days * 86400,))
        if self.state_retention_days > 0:
            cutoff = now - self.state_retention_days * 86400
            conn.execute(f"DELETE FROM responses WHERE created_at < {m}", (cutoff,))
            # A conversation is kept while it is used; its items go with it.
            conn.execute(
                "DELETE FROM conversation_items WHERE conversation_id IN "
                f"(SELECT id FROM conversations WHERE used_at < {m})",
                (cutoff,),
            )
            conn.execute(f"DELETE FROM conversations WHERE used_at < {m}", (cutoff,))
            # So is a thread, its turns with it.
            conn.execute(
                "DELETE FROM thread_messages WHERE thread_id IN "
                f"(SELECT id FROM threads WHERE used_at < {m})",
                (cutoff,),
            )
            conn.execute(f"DELETE FROM threads WHERE used_at < {m}", (cutoff,))

    # --- reading ------------------------------------------------------------------------

    async def reading(self, work: Callable[[], T]) -> T:
        """`work` (queries, with `read`) in one of the ledger's own reader threads: never on
        the event loop, and never in the loop's default executor, which resolves the
        providers' host names, so that slow questions of the books (a year of rows, a
        database that stalls) wait for each other and hold up no call."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, work)

    def with_connection(self, work: Callable[[Any], T]) -> T:
        """`work` on a connection of its own, closed after; blocking: run it in
        `reading`. What a client reads back the next moment (a stored response) is
        written this way, at once, not behind the calls' batches."""
        conn = self.db.connect()
        try:
            return work(conn)
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        """A transaction on `conn` (taking the write lock at once on SQLite): committed
        when the block ends, rolled back if it raises."""
        conn.execute(self.db.begin)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def execute(self, conn: Any, sql: str, params: Iterable[Any] = ()) -> int:
        """One statement in a transaction of its own on `conn`: the rows it changed."""
        with self.transaction(conn):
            return int(conn.execute(sql, tuple(params)).rowcount)

    def read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query (at most MAX_READ_ROWS), on a connection of its own; blocking:
        run it in `reading`."""
        conn = self.db.connect()
        try:
            return list(conn.execute(sql, tuple(params)).fetchmany(MAX_READ_ROWS))
        finally:
            conn.close()

    def spent_since(self, since: float) -> dict[str, float]:
        """Each key's cost since `since`."""
        rows = self.read(
            f"SELECT key, SUM(cost_usd) FROM calls WHERE at >= {self.db.mark} GROUP BY key",
            (since,),
        )
        return {key: float(cost or 0.0) for key, cost in rows}

    def spent_this_period(self, now: float) -> dict[tuple[str, str], float]:
        """Each key's spend this UTC day and this UTC month, keyed as the budgets keep
        it: (key, "2026-12-03") and (key, "2026-12")."""
        spent = {}
        for period in ("day", "month"):
            bucket = period_bucket(period, now)[0]
            for key, cost in self.spent_since(period_start(period, now)).items():
                spent[(key, bucket)] = cost
        return spent

    def books(
        self, now: float
    ) -> tuple[dict[tuple[str, str], float], list[tuple[str, float, int]]]:
        """What the limits need of the books: this period's spend by key and bucket, and
        the last hour's calls (an hour is the longest token window)."""
        return self.spent_this_period(now), self.tokens_since(now - 3600)

    async def read_books(
        self,
    ) -> tuple[dict[tuple[str, str], float], list[tuple[str, float, int]]]:
        """`books` now, in a reader thread, once every process's writer has written what
        it held: this one's flushed, the others' (replicas sharing the database) given
        the time in which each writes what it holds."""

        def read() -> tuple[dict[tuple[str, str], float], list[tuple[str, float, int]]]:
            self.flush(5.0)
            time.sleep(self.interval_s + 0.5)
            return self.books(time.time())

        return await self.reading(read)

    def tokens_since(self, since: float) -> list[tuple[str, float, int]]:
        """Each call's key, time and tokens since `since` (a token window's worth)."""
        rows = self.read(
            "SELECT key, at, input_tokens + output_tokens FROM calls "
            f"WHERE at >= {self.db.mark} ORDER BY at",
            (since,),
        )
        return [(key, float(at), int(tokens)) for key, at, tokens in rows]


GROUPS = ("key", "model", "day", "hour", "deployment", "session")


def usage_query(
    db: Backend, start: float, end: float, groups: Sequence[str], keys: Sequence[str] | None
) -> tuple[str, list[Any]]:
    """SQL and parameters of the calls' sums between `start` and `end`, by `groups`
    (each one of GROUPS; none: one line), of `keys` (None: every key)."""
    buckets = {"day": db.bucket(86400), "hour": db.bucket(3600)}
    columns = [f"{buckets.get(g, g)} AS g{i}" for i, g in enumerate(groups)]
    where = f"at >= {db.mark} AND at < {db.mark}"
    params: list[Any] = [start, end]
    if keys is not None:
        where += f" AND key IN ({db.marks(len(keys))})"
        params.extend(keys)
    sql = (
        f"SELECT {''.join(c + ', ' for c in columns)}COUNT(*), "
        "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
        "SUM(input_tokens), SUM(output_tokens), SUM(cached_tokens), SUM(reasoning_tokens), "
        "SUM(cost_usd), SUM(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN estimated THEN 1 ELSE 0 END) "
        f"FROM calls WHERE {where}"
    )
    if groups:
        named = ", ".join(f"g{i}" for i in range(len(groups)))
        sql += f" GROUP BY {named} ORDER BY {named}"
    return sql, params


USAGE_FIELDS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
    "estimated_requests",
)


def usage_lines(rows: Iterable[tuple[Any, ...]], groups: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of `usage_query` as dicts, each group first; a day or an hour is kept as
    its epoch start (the caller writes it as a date)."""
    lines = []
    n = len(groups)
    for found in rows:
        if not found[n]:
            continue  # no call in the range: SUM() of nothing
        line: dict[str, Any] = dict(zip(groups, found[:n], strict=True))
        for name, value in zip(USAGE_FIELDS, found[n:], strict=True):
            if name == "cost_usd":
                line[name] = round(float(value or 0.0), 10)
            else:
                line[name] = int(value or 0)
        lines.append(line)
    return lines


def period_start(period: str, now: float) -> float:
    """The start of the UTC day or month `now` falls in."""
    if period == "month":
        t = time.gmtime(now)
        return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))
    return float(math.floor(now / 86400) * 86400)
