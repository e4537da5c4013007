"""The app's own cost, with no network: the app called in process.

    uv run python bench/inprocess.py [--route complete|chat|responses] [--stream]
        [-n 5000] [--rounds 5]

The OpenAI provider answers from a fake transport under the shared httpx client (a
canned answer, or a stream of `--tokens` events, one a read as over a socket), so what
is measured is the service's own code with Starlette, pydantic and httpx's client:
auth, limits, validation, the provider call's bodies, accounting, metrics and the
access line (written to /dev/null). It prints the best round's CPU time a request.

The VM this project is measured on can change speed by 2x from one hour to the
next, which hides a change of a few percent. Instruction counts do not move with
it: run the script under callgrind twice, with two request counts, and take the
difference (bench/README.md):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        uv run python bench/inprocess.py -n 200 --rounds 1     # then -n 2200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KEY = "bench-key-0123456789abcdef"
os.environ.update(
    {
        "API_KEYS": KEY,
        "RATE_LIMIT": "100000000/hour",
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # never called
        "LLM_MODEL": "gpt-4o-mini",
        "MAX_INFLIGHT": "4096",
        "LOG_FORMAT": "json",
    }
)

import httpx  # noqa: E402

Message = MutableMapping[str, Any]


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class FakeEvents(httpx.AsyncByteStream):
    def __init__(self, events: list[bytes]) -> None:
        self.events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            await asyncio.sleep(0)  # one event a read, as from a socket
            yield event


class FakeProvider(httpx.AsyncBaseTransport):
    """The shared client's transport without a network: the same answer to every call."""

    def __init__(self, tokens: int) -> None:
        text = " ".join(f"tok{i}" for i in range(tokens))
        self.answer = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 12,
                    "completion_tokens": tokens,
                    "total_tokens": 12 + tokens,
                },
            }
        ).encode()
        self.events = [chunk({"role": "assistant", "content": ""})]
        self.events += [chunk({"content": f"tok{i} "}) for i in range(tokens)]
        self.events += [
            chunk({}, "stop"),
            chunk({}, usage={"prompt_tokens": 12, "completion_tokens": tokens}),
            b"data: [DONE]\n\n",
        ]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if b'"stream":true' in request.content:
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, stream=FakeEvents(self.events)
            )
        return httpx.Response(
            200, headers={"content-type": "application/json"}, content=self.answer
        )


async def call(app: Any, path: str, body: bytes) -> list[Message]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"x-api-key", KEY.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    incoming: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    never = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        await never.wait()  # the client stays
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


PROMPT = "Write one haiku about Nairobi."
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {  # a route, and its body
    "complete": ("/complete", {"prompt": PROMPT}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
    "responses": ("/v1/responses", {"input": PROMPT}),
}


def route(name: str, stream: bool) -> tuple[str, bytes]:
    path, body = ROUTES[name]
    if name == "complete":
        return ("/stream" if stream else path), json.dumps(body).encode()
    return path, json.dumps({**body, "stream": stream}).encode()


async def measure(app: Any, path: str, body: bytes, requests: int, rounds: int) -> float:
    sent = await call(app, path, body)
    assert sent[0]["status"] == 200, sent
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            await call(app, path, body)
        best = min(best, (time.process_time() - started) / requests)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--route",
        choices=list(ROUTES),
        default="complete",
        help="/complete (and /stream), /v1/chat/completions or /v1/responses",
    )
    parser.add_argument("--stream", action="store_true", help="a stream (/stream for complete)")
    parser.add_argument("--tokens", type=int, default=50, help="tokens in each answer")
    parser.add_argument("-n", "--requests", type=int, default=5000, help="requests a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--ledger-interval",
        type=float,
        help="seconds between the ledger's batches (1 s; under valgrind, 50x slower, take "
        "50 so that a batch holds as many rows as at full speed); the ledger is flushed "
        "before the figure is printed, its writing counted",
    )
    args = parser.parse_args()
    path, body = route(args.route, args.stream)
    import server
    import store

    if args.ledger_interval is not None:
        kwdefaults = store.Ledger.__init__.__kwdefaults__
        assert kwdefaults is not None
        kwdefaults["interval_s"] = args.ledger_interval
    app = server.create_app(transport=FakeProvider(args.tokens))

    for handler in logging.getLogger("text_tool").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # for the life of the process
    us = uvloop.run(measure(app, path, body, args.requests, args.rounds))
    if app.state.ledger is not None:
        app.state.ledger.close()  # every row written, within what is measured
    shown = path + (" stream" if args.stream else "")
    rounds = f"best of {args.rounds} rounds of {args.requests}"
    print(f"{shown}: {us:.1f} us of CPU a request ({rounds})")


if __name__ == "__main__":
    main()
