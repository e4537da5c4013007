"""Helpers that several test modules share; the fixtures are in conftest.py.

The app in process with a MockTransport as its provider, the golden transcripts, the
Responses API's conformance checks, the mock provider's directives and counters, and a
real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import openresponses_types as spec
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel
from starlette.applications import Starlette

from config import Settings
from server import create_app
from tests.conftest import AUTH_HEADERS, CLIENT_KEY, PROVIDER_KEY, Process, free_port

# The app in process, its provider a MockTransport

Handler = Callable[[httpx.Request], httpx.Response]


def openai_app(handler: Handler, *, tracer_provider: Any = None, **changes: object) -> Starlette:
    settings = Settings(
        provider="openai",
        openai_api_key=PROVIDER_KEY,
        openai_base_url="http://provider.test/v1",
        model="gpt-4o-mini",
        models=("gpt-4o-mini", "my-local-model"),
        api_keys=(CLIENT_KEY,),
        max_retries=0,
    ).replace(**changes)
    return create_app(
        settings, transport=httpx.MockTransport(handler), tracer_provider=tracer_provider
    )


def client(app: Starlette, base: str = "http://testserver") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base, headers=AUTH_HEADERS
    )


def openai_answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        frames = [
            {"id": "c1", "model": body["model"], "choices": [{"index": 0, "delta": {"content": t}}]}
            for t in ("Line one\n", 'line "two"\n\n', "end")
        ]
        frames.append(
            {
                "id": "c1",
                "model": body["model"],
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
        )
        frames.append(
            {
                "id": "c1",
                "model": body["model"],
                "choices": [],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 2000},
            }
        )
        raw = "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"
        return httpx.Response(
            200, content=raw.encode(), headers={"content-type": "text/event-stream"}
        )
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-1",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"content": "Hi!"}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 1_000_000,
                "completion_tokens": 1_000_000,
                "prompt_tokens_details": {"cached_tokens": 400_000},
            },
        },
    )


# Golden transcripts (tests/golden/) and a provider that keeps what it was sent

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text())


class Provider:
    """A MockTransport that answers every call with `answer` and keeps what it was sent."""

    def __init__(self, answer: Callable[[dict[str, Any]], httpx.Response]) -> None:
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        return self.answer(body)


def sse_file(name: str) -> Callable[[dict[str, Any]], httpx.Response]:
    raw = (GOLDEN / name).read_bytes()
    return lambda body: httpx.Response(
        200, content=raw, headers={"content-type": "text/event-stream"}
    )


MESSAGE_WITH_TOOLS = {
    "id": "msg_01Whole",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5-20251001",
    "content": [
        {"type": "text", "text": "Checking."},
        {
            "type": "tool_use",
            "id": "toolu_01A",
            "name": "get_weather",
            "input": {"location": "Paris"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "cache_read_input_tokens": 30,
        "cache_creation_input_tokens": 5,
        "output_tokens": 20,
    },
}


# The Responses API: objects and events checked against the Open Responses schema
# and the openai SDK's types


def _event_models() -> dict[str, type[BaseModel]]:
    """The Open Responses streaming events, by their `type`."""
    models: dict[str, type[BaseModel]] = {}
    for name in dir(spec):
        cls = getattr(spec, name)
        if name.endswith("StreamingEvent") and isinstance(cls, type) and issubclass(cls, BaseModel):
            kind = cls.model_fields["type"].annotation
            if isinstance(kind, type) and issubclass(kind, Enum):
                models[next(iter(kind)).value] = cls
    return models


def _sdk_event_models() -> dict[str, type[BaseModel]]:
    """The openai SDK's streaming events, by their `type`."""
    union = typing.get_args(ResponseStreamEvent)[0]
    return {
        typing.get_args(cls.model_fields["type"].annotation)[0]: cls
        for cls in typing.get_args(union)
    }


EVENTS = _event_models()
SDK_EVENTS = _sdk_event_models()
# OpenAI's own extension for freeform tools, which the Open Responses schema lacks.
OPENAI_ONLY = ("response.custom_tool_call_input.delta", "response.custom_tool_call_input.done")


def conforming_response(data: dict[str, Any]) -> dict[str, Any]:
    """`data`, checked to be a response object of both the spec and the SDK."""
    assert data["object"] == "response"
    if not _freeform(data):
        spec.ResponseResource.model_validate(_for_the_typed_models(data))
    SdkResponse.model_validate(data)
    return data


def _for_the_typed_models(data: dict[str, Any]) -> dict[str, Any]:
    """The spec's JsonSchemaResponseFormat.json has `schema` an object or null (and
    OpenAI's SDK needs the object), but openresponses-types generated it as None
    only: the echoed schema is checked as the spec says, then left out. And Open
    Responses requires `description` (a string or null) where OpenAI's OpenAPI
    document allows a string or nothing: we follow OpenAI's, and the absent one is
    given as null here."""
    form = data["text"]["format"]
    if form["type"] != "json_schema":
        return data
    assert form["schema"] is None or isinstance(form["schema"], dict)
    assert isinstance(form.get("description", ""), str)  # OpenAI's: never null
    shown = {"description": None, **form, "schema": None}
    return {**data, "text": {**data["text"], "format": shown}}


def _in_the_spec(event: dict[str, Any]) -> bool:
    """Whether the Open Responses schema has the event: it has no freeform tools."""
    return (
        event["type"] in EVENTS
        and not _freeform(event.get("response") or {})
        and ((event.get("item") or {}).get("type") != "custom_tool_call")
    )


def _freeform(response: dict[str, Any]) -> bool:
    """Whether a response has OpenAI's custom tools, which Open Responses lacks."""
    things = [*response.get("output", []), *response.get("tools", [])]
    return any(t.get("type") in ("custom_tool_call", "custom") for t in things)


def conforming_events(text: str) -> list[dict[str, Any]]:
    """The SSE body's events, each checked: named as its type, numbered from 0 up by
    one, valid in the spec (OpenAI's own events aside) and in the SDK; no [DONE]."""
    assert "[DONE]" not in text
    events = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1][6:])
        assert lines[0][7:] == data["type"]
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        kind = event["type"]
        assert kind in EVENTS or kind in OPENAI_ONLY, kind
        if _in_the_spec(event):
            typed = event
            if "response" in event:
                typed = {**event, "response": _for_the_typed_models(event["response"])}
            EVENTS[kind].model_validate(typed)
        SDK_EVENTS[kind].model_validate(event)
    return events


# The mock provider (bench/mock_provider.py): directives in a prompt, its counters; and the
# (event, data) pairs of an SSE answer


async def stats(mock: Process) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=5) as c:
        answer: dict[str, int] = (await c.get(mock.url + "/_stats")).json()
        return answer


def directive(**options: object) -> str:
    return "mock:" + json.dumps(options) + "\nhello there"


def events(text: str) -> list[tuple[str, str]]:
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            event = next((x[7:] for x in lines if x.startswith("event: ")), "message")
            out.append((event, next(x[6:] for x in lines if x.startswith("data: "))))
    return out


# A real redis-server on a free port of 127.0.0.1

REDIS = shutil.which("redis-server")


class Redis:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with __import__("socket").create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# A real PostgreSQL, from Debian's package, on a free port of 127.0.0.1

POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


class Postgres:
    """A throwaway PostgreSQL server: its own data directory, trust authentication on
    127.0.0.1 only, no fsync; stopped (and its files removed) by `stop`. As root (CI),
    it runs as Debian's `postgres` user, since PostgreSQL refuses to run as root."""

    def __init__(self) -> None:
        assert POSTGRES_BIN is not None
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # not under pytest's tmp_path: its parents are closed to other users
        self.dir = Path(tempfile.mkdtemp(prefix="text-tool-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["runuser", "-u", "postgres", "--", *argv]

    def start(self) -> None:
        assert POSTGRES_BIN is not None
        data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            self._as_owner([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-A", "trust",
                            "-U", "postgres", "--no-sync"]),
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            self._as_owner([str(POSTGRES_BIN / "postgres"), "-D", str(data), "-p", str(self.port),
                            "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
                            "-c", "fsync=off", "-c", "full_page_writes=off"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                assert self.proc.poll() is None, "postgres exited"
                assert time.monotonic() < deadline, "postgres did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # a fast shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk `delay_s` before passing it on, in
    order, both ways: a network with that much latency a packet (a slow store)."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port, self.delay_s = target_port, delay_s
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(5), "the proxy did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def later() -> None:
                while True:
                    due, chunk = await queue.get()
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    if not chunk:
                        writer.close()
                        return
                    writer.write(chunk)
                    await writer.drain()

            sender = asyncio.ensure_future(later())
            try:
                while chunk := await reader.read(65536):
                    queue.put_nowait((time.monotonic() + self.delay_s, chunk))
            finally:
                queue.put_nowait((time.monotonic() + self.delay_s, b""))
                await asyncio.wait([sender], timeout=self.delay_s + 5)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.close()
                return
            try:
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                                     return_exceptions=True)  # fmt: skip
            finally:
                writer.close()
                up_writer.close()

        async def serve() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self._ready.set()
            async with server:
                await server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            self._loop.run_until_complete(serve())
        left = asyncio.all_tasks(self._loop)
        for task in left:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            self._loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self._loop.close()

    def stop(self) -> None:
        def cancel() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        with contextlib.suppress(RuntimeError):  # closed already
            self._loop.call_soon_threadsafe(cancel)
        self._thread.join(timeout=10)
