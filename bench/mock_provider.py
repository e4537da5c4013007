"""A fast fake LLM provider speaking the OpenAI and Anthropic HTTP protocols.

A raw ASGI app (no framework) on uvicorn with uvloop and httptools, so that it is
never the bottleneck of a benchmark, and a real process for end-to-end tests.

    python bench/mock_provider.py --port 9100 [--ttft-ms 0] [--token-delay-ms 0]

Routes: POST /v1/chat/completions (OpenAI), POST /v1/responses (OpenAI's Responses),
POST /v1/embeddings (OpenAI), POST /v1/messages (Anthropic),
GET /_stats (streams open, the most open at once, finished, aborted by the client; requests served),
POST /_reset, GET /_last (the last request's body and headers).

Behaviour per request, from `x-mock-*` headers (for direct calls) or from a first
line `mock:{...json...}` in the last message (for calls through text-tool):
  ttft_ms, token_delay_ms   latency before the first token and between tokens
  tokens                    answer with this many tokens instead of echoing
  text                      answer with exactly this text (split after whitespace)
  status                    answer with this HTTP status and the provider's error body
  retry_after               with status 429: the Retry-After header
  error_after               stream this many tokens, then a provider error event
  drop_after                stream this many tokens, then cut the connection
  no_usage                  send no usage (as some OpenAI-compatible servers do)
  garbage                   answer 200 with a body that is not JSON
  cached                    report this many cached input tokens
  fail_times, id            with status: fail only the first fail_times requests of this id
  empty                     stream: answer 200 and end with no event at all
  malformed_after           stream this many tokens, then a data line that is not JSON
  split                     stream every frame in pieces of this many bytes
  set_cookie                non-streaming: answer with this Set-Cookie header
  location                  with a 3xx status: the Location header
  tool_call                 answer with this call ({"name", "arguments"}), or a list of them;
                            a request that forces a tool gets a call of it anyway, its
                            arguments from `input` (else {"answer": the prompt})
  thinking                  reason first with this text (Anthropic: a signed thinking block;
                            OpenAI: reasoning_content)
  echo_key                  quote the key the request came with everywhere it can: in error
                            bodies and error events, a header, the answer's text, a count
Hostile ones (tests of the service's bounds; each stops by itself within 60 s):
  endless_body              non-streaming: 200 JSON that never ends (stops after this many MB)
  gzip_bomb                 non-streaming: this many MB of zeros, gzipped (about 1 KB a MB)
  trickle_body_ms           non-streaming: one byte of the answer every this many ms
  no_newline                stream: 200, then this many MB with no newline
  trickle_ms                stream: a token, then a byte of an endless line every this many ms
  endless_tokens            stream: tokens until the client leaves, whatever max_tokens says
  odd_framing               stream: each event's JSON over two data: lines, with a bare CR in it
  big_chunk                 stream: the whole answer in one write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CHUNK = re.compile(r"\S+\s*|\s+")


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.failed: dict[str, int] = {}
        self.open = 0
        self.peak = 0  # the most streams open at once
        self.finished = 0
        self.aborted = 0
        self.last: dict[str, Any] = {}

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "open": self.open,
            "peak": self.peak,
            "finished": self.finished,
            "aborted": self.aborted,
        }


class MockProvider:
    def __init__(self, *, ttft_ms: float = 0, token_delay_ms: float = 0) -> None:
        self.defaults = {"ttft_ms": ttft_ms, "token_delay_ms": token_delay_ms}
        self.stats = Stats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if path == "/_stats":
            await _json(send, 200, self.stats.as_dict())
        elif path == "/_reset" and method == "POST":
            self.stats.reset()
            await _json(send, 200, {"ok": True})
        elif path == "/_last":
            await _json(send, 200, self.stats.last)
        elif method == "POST" and path.endswith("/messages/count_tokens"):
            await self.count_tokens(scope, receive, send)
        elif method == "POST" and path.endswith("/chat/completions"):
            await self.answer(scope, receive, send, "openai")
        elif method == "POST" and path.endswith("/responses"):
            await self.answer(scope, receive, send, "responses")
        elif method == "POST" and path.endswith("/embeddings"):
            await self.embeddings(scope, receive, send)
        elif method == "POST" and path.endswith("/messages"):
            await self.answer(scope, receive, send, "anthropic")
        else:
            await _json(send, 404, {"error": {"message": "not found", "type": "not_found"}})

    async def count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anthropic's count: the words of the messages, the system prompt and the tools
        (with a `status` directive, that status instead, as a server without the route)."""
        body = json.loads(await _read(receive))
        self.stats.last = {"protocol": "anthropic", "body": body, "count": True}
        options, _ = self.options(_headers(scope), body)
        key = str(options.get("key", ""))
        if "status" in options:
            status = int(options["status"])
            await _json(send, status, _error_body("anthropic", status, key), _quoted(key))
            return
        words = len(json.dumps(body.get("messages")).split()) + len(
            str(body.get("system", "")).split()
        )
        count = {"input_tokens": words + 10 * len(body.get("tools") or ())}
        await _json(send, 200, {**count, **({"key": key} if key else {})}, _quoted(key))

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        """OpenAI's embeddings: a vector of 8 floats an input, from its hash, and a
        token a word (a `status` directive in the first input answers that status)."""
        self.stats.requests += 1
        body = json.loads(await _read(receive))
        self.stats.last = {"protocol": "openai", "body": body, "embeddings": True}
        raw = body.get("input")
        items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        first = str(items[0]) if items else ""
        options = json.loads(first[5:].partition("\n")[0]) if first.startswith("mock:") else {}
        key = _their_key(_headers(scope)) if options.get("echo_key") else ""
        if "status" in options:
            status = int(options["status"])
            await _json(send, status, _error_body("openai", status, key), _quoted(key))
            return
        data = []
        for i, item in enumerate(items or ()):
            digest = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [(b - 127.5) / 127.5 for b in digest[:8]]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(i) if isinstance(i, list) else len(str(i).split()) for i in items or ())
        await _json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                **({"key": key} if key else {}),
            },
            _quoted(key),
        )

    async def answer(self, scope: Scope, receive: Receive, send: Send, protocol: str) -> None:
        self.stats.requests += 1
        body = json.loads(await _read(receive))
        headers = _headers(scope)
        query = scope.get("query_string", b"").decode()
        self.stats.last = {"protocol": protocol, "body": body, "headers": headers, "query": query}
        options, prompt = self.options(headers, body)

        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.respond(send, protocol, body, options, prompt, gone)
        finally:
            watcher.cancel()

    def options(self, headers: dict[str, str], body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        options: dict[str, Any] = dict(self.defaults)
        for name, value in headers.items():
            if name.startswith("x-mock-"):
                key = name[7:].replace("-", "_")
                options[key] = value if key == "text" else json.loads(value)
        messages = body.get("messages") or [{}]
        if "input" in body:  # Responses: a string, or items
            raw = body["input"]
            messages = [{"content": raw}] if isinstance(raw, str) else (raw or [{}])
        content = messages[-1].get("content") or messages[-1].get("output") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        if content.startswith("mock:"):
            directive, _, content = content[5:].partition("\n")
            options.update(json.loads(directive))
        if options.get("echo_key"):
            options["key"] = _their_key(headers)
        return options, content

    async def respond(
        self,
        send: Send,
        protocol: str,
        body: dict[str, Any],
        options: dict[str, Any],
        prompt: str,
        gone: asyncio.Event,
    ) -> None:
        if options.get("hang"):
            await gone.wait()
            self.stats.aborted += 1
            return
        status = int(options.get("status", 200))
        if status != 200 and "fail_times" in options:
            key = str(options.get("id", ""))
            if self.stats.failed.get(key, 0) >= int(options["fail_times"]):
                status = 200
            else:
                self.stats.failed[key] = self.stats.failed.get(key, 0) + 1
        key = str(options.get("key", ""))
        if status != 200:
            await _sleep(options["ttft_ms"], gone)
            headers = _quoted(key)
            if "retry_after" in options:
                headers["retry-after"] = str(options["retry_after"])
            if "location" in options:
                headers["location"] = str(options["location"])
            await _json(send, status, _error_body(protocol, status, key), headers)
            return
        if options.get("garbage"):
            await _raw(send, 200, b"<html>not json", "text/html")
            return
        if await _hostile(send, options, gone, bool(body.get("stream"))):
            self.stats.aborted += gone.is_set()
            return

        forced = _forced_tool(body)
        if forced and "tool_call" not in options:
            options["tool_call"] = {
                "name": forced,
                "arguments": options.get("input", {"answer": prompt}),
            }
        if "text" in options:
            chunks = _CHUNK.findall(str(options["text"]))
        elif "tokens" in options:
            chunks = [f"tok{i} " for i in range(int(options["tokens"]))]
        else:
            chunks = [w if i == 0 else " " + w for i, w in enumerate(prompt.split())]
        if "tool_call" in options and "text" not in options:
            chunks = []
        if key:
            chunks = [f"{key} ", *chunks]
        max_tokens = int(
            body.get("max_tokens")
            or body.get("max_completion_tokens")
            or body.get("max_output_tokens")
            or 1 << 30
        )
        finish = "length" if len(chunks) > max_tokens else "stop"
        if "tool_call" in options:
            finish = "tool_calls"
        chunks = chunks[:max_tokens]
        input_tokens = (
            sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            + len(str(body.get("system", "")).split())
            + (len(json.dumps(body["input"]).split()) if "input" in body else 0)
        )
        usage = (input_tokens, len(chunks), int(options.get("cached", 0)))
        model = str(body.get("model", "mock"))

        if not body.get("stream"):
            await _sleep(options["ttft_ms"], gone)
            if gone.is_set():
                self.stats.aborted += 1
                return
            await _sleep(options["token_delay_ms"] * len(chunks), gone)
            make = {"openai": _openai_completion, "responses": _responses_object}.get(
                protocol, _anthropic_message
            )
            headers = {"set-cookie": str(options["set_cookie"])} if "set_cookie" in options else {}
            headers.update(_quoted(key))
            await _json(send, 200, make(model, "".join(chunks), finish, usage, options), headers)
            self.stats.finished += 1
            return

        self.stats.open += 1
        self.stats.peak = max(self.stats.peak, self.stats.open)
        try:
            if await _sleep(options["ttft_ms"], gone):
                self.stats.aborted += 1
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]
                    + [(k.encode(), v.encode()) for k, v in _quoted(key).items()],
                }
            )
            if options.get("empty"):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.stats.finished += 1
                return
            framer = {"openai": _openai_frames, "responses": _responses_frames}.get(
                protocol, _anthropic_frames
            )
            frames = framer(model, chunks, finish, usage, options)
            if options.get("big_chunk"):
                whole = b"".join(frame for _, frame in frames)
                await send({"type": "http.response.body", "body": whole, "more_body": False})
                self.stats.finished += 1
                return
            for i, frame in enumerate(frames):
                if i and frame[0] == "token" and await _sleep(options["token_delay_ms"], gone):
                    self.stats.aborted += 1
                    return
                if frame[0] == "drop":
                    raise ConnectionAbortedError("mock drops the connection")
                if options.get("odd_framing") and frame[1].startswith(b"data: {"):
                    frame = (frame[0], _odd(frame[1]))
                piece = int(options.get("split", 0)) or len(frame[1])
                for at in range(0, len(frame[1]), piece):
                    part = frame[1][at : at + piece]
                    await send({"type": "http.response.body", "body": part, "more_body": True})
                    if piece < len(frame[1]):
                        await asyncio.sleep(0.001)  # separate TCP reads
                if gone.is_set():
                    self.stats.aborted += 1
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.stats.finished += 1
        finally:
            self.stats.open -= 1


HOSTILE_FOR_S = 60  # no hostile answer goes on longer, even if nobody hangs up


async def _hostile(send: Send, options: dict[str, Any], gone: asyncio.Event, stream: bool) -> bool:
    """The hostile answers (see the module's docstring); False when none was asked for."""
    stop = time.monotonic() + HOSTILE_FOR_S

    async def start(kind: bytes, *headers: tuple[bytes, bytes]) -> None:
        head = [(b"content-type", kind), *headers]
        await send({"type": "http.response.start", "status": 200, "headers": head})

    async def body(piece: bytes) -> bool:
        """Send a piece; False once the client has gone or time is up."""
        if gone.is_set() or time.monotonic() > stop:
            return False
        await send({"type": "http.response.body", "body": piece, "more_body": True})
        await asyncio.sleep(0)
        return True

    async def pieces(first: bytes, piece: bytes, megabytes: float) -> None:
        sent = 0
        ok = await body(first)
        while ok and sent < megabytes * (1 << 20):
            sent += len(piece)
            ok = await body(piece)

    async def trickle(first: bytes, every_ms: float) -> None:
        ok = await body(first)
        while ok and not await _sleep(every_ms, gone):
            ok = await body(b"x")

    chunk = b"a" * (64 << 10)
    if not stream and "endless_body" in options:
        await start(b"application/json")
        await pieces(
            b'{"id": "x", "choices": [{"message": {"content": "', chunk, options["endless_body"]
        )
    elif not stream and "gzip_bomb" in options:
        await start(b"application/json", (b"content-encoding", b"gzip"))
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        zeros, ok, left = b"0" * (1 << 20), True, int(options["gzip_bomb"])
        while ok and left > 0:
            left -= 1
            ok = await body(packer.compress(zeros) + (packer.flush() if left == 0 else b""))
    elif not stream and "trickle_body_ms" in options:
        await start(b"application/json")
        await trickle(b'{"id": "x", "choices": [', options["trickle_body_ms"])
    elif stream and "no_newline" in options:
        await start(b"text/event-stream")
        await pieces(b"data: ", chunk, options["no_newline"])
    elif stream and "trickle_ms" in options:
        await start(b"text/event-stream")
        role = _sse(
            {"id": "t", "model": "m", "choices": [{"index": 0, "delta": {"content": "tok"}}]}
        )
        await trickle(role + b"data: ", options["trickle_ms"])
    elif stream and options.get("endless_tokens"):
        await start(b"text/event-stream")
        token = {"id": "e", "model": "m", "choices": [{"index": 0, "delta": {"content": "more "}}]}
        ok, count = True, 0
        while ok and count < 1_000_000:
            count += 1
            ok = await body(_sse(token))
    else:
        return False
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return True


def _odd(frame: bytes) -> bytes:
    r"""`data: {"a": 1, "b": 2}` as `data: {"a": 1,\ndata: \r"b": 2}`: valid JSON once joined."""
    head, comma, rest = frame.partition(b", ")
    return head + comma.rstrip() + b"\ndata: \r" + rest if comma else frame


async def _sleep(ms: float, gone: asyncio.Event) -> bool:
    """Sleep, waking early when the client leaves; True when it left."""
    if ms <= 0:
        return gone.is_set()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(gone.wait(), ms / 1000)
    return gone.is_set()


def _sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


def _openai_usage(usage: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": usage[0],
        "completion_tokens": usage[1],
        "total_tokens": usage[0] + usage[1],
        "prompt_tokens_details": {"cached_tokens": usage[2], "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The tool a request forces, in either protocol."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool":
        return str(choice.get("name"))
    function = choice.get("function")
    return str(function.get("name")) if isinstance(function, dict) else None


def _calls(options: dict[str, Any]) -> list[dict[str, Any]]:
    calls = options.get("tool_call")
    calls = [] if calls is None else calls if isinstance(calls, list) else [calls]
    return [
        {"id": f"call_mock{i}", "name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}
        for i, c in enumerate(calls)
    ]


def _signature(thinking: str) -> str:
    return "mocksig-" + hashlib.sha256(thinking.encode()).hexdigest()[:16]


def _openai_completion(
    model: str, text: str, finish: str, usage: tuple[int, int, int], options: dict[str, Any]
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    calls = _calls(options)
    if calls:
        message["content"] = text or None
        message["tool_calls"] = [
            {"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ]  # fmt: skip
    if "thinking" in options:
        message["reasoning_content"] = str(options["thinking"])
    answer: dict[str, Any] = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    if not options.get("no_usage"):
        answer["usage"] = _openai_usage(usage)
    return answer


def _openai_frames(
    model: str,
    chunks: list[str],
    finish: str,
    usage: tuple[int, int, int],
    options: dict[str, Any],
) -> list[tuple[str, bytes]]:
    base = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_mock",
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice], "usage": None})

    frames = [("start", chunk({"role": "assistant", "content": "", "refusal": None}))]
    for word in _CHUNK.findall(str(options.get("thinking", ""))):
        frames.append(("token", chunk({"reasoning_content": word})))
    for i, text in enumerate(chunks):
        frames += _fault(options, i) + [("token", chunk({"content": text}))]
    for index, call in enumerate(_calls(options)):
        first = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        frames.append(("token", chunk({"tool_calls": [first]})))
        half = len(call["arguments"]) // 2
        for piece in (call["arguments"][:half], call["arguments"][half:]):
            frames.append(
                (
                    "token",
                    chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                )
            )
    frames += _fault(options, len(chunks))
    frames.append(("end", chunk({}, finish)))
    if not options.get("no_usage"):
        frames.append(("usage", _sse({**base, "choices": [], "usage": _openai_usage(usage)})))
    frames.append(("done", _sse("[DONE]")))
    return frames


def _responses_usage(usage: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "input_tokens": usage[0],
        "input_tokens_details": {"cached_tokens": usage[2]},
        "output_tokens": usage[1],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage[0] + usage[1],
    }


def _responses_items(text: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if "thinking" in options:
        summary = [{"type": "summary_text", "text": str(options["thinking"])}]
        items.append(
            {
                "type": "reasoning",
                "id": "rs_mock",
                "summary": summary,
                "encrypted_content": "openai-encrypted-" + _signature(str(options["thinking"])),
            }
        )
    if text:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        items.append(
            {
                "type": "message",
                "id": "msg_mock",
                "status": "completed",
                "role": "assistant",
                "content": [part],
            }
        )
    for call in _calls(options):
        items.append(
            {
                "type": "function_call",
                "id": "fc_" + call["id"],
                "call_id": call["id"],
                "name": call["name"],
                "arguments": call["arguments"],
                "status": "completed",
            }
        )
    return items


def _responses_object(
    model: str, text: str, finish: str, usage: tuple[int, int, int], options: dict[str, Any],
    status: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """OpenAI's response object, with the fields a client reads."""
    incomplete = finish == "length"
    return {
        "id": "resp_mock",
        "object": "response",
        "created_at": int(time.time()),
        "status": status or ("incomplete" if incomplete else "completed"),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "model": model,
        "output": _responses_items(text, options) if status != "in_progress" else [],
        "parallel_tool_calls": True,
        "store": False,
        "tools": [],
        "tool_choice": "auto",
        "usage": None if options.get("no_usage") or status else _responses_usage(usage),
    }


def _responses_frames(
    model: str,
    chunks: list[str],
    finish: str,
    usage: tuple[int, int, int],
    options: dict[str, Any],
) -> list[tuple[str, bytes]]:
    """The Responses event sequence: each event named, with its sequence_number."""
    frames: list[tuple[str, bytes]] = []

    def event(kind: str, label: str = "token", **fields: Any) -> None:
        data = {"type": kind, "sequence_number": len(frames), **fields}
        frames.append((label, _sse(data, kind)))

    start = _responses_object(model, "", finish, usage, options, status="in_progress")
    event("response.created", "start", response=start)
    event("response.in_progress", "start", response=start)
    index = 0
    if "thinking" in options:
        item = _responses_items("", {"thinking": options["thinking"]})[0]
        event("response.output_item.added", output_index=index, item={**item, "summary": []})
        event("response.output_item.done", output_index=index, item=item)
        index += 1
    if chunks:
        text = "".join(chunks)
        message = _responses_items(text, {})[0]
        event(
            "response.output_item.added",
            output_index=index,
            item={**message, "status": "in_progress", "content": []},
        )
        event(
            "response.content_part.added",
            item_id="msg_mock",
            output_index=index,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )
        for i, piece in enumerate(chunks):
            frames.extend(_fault(options, i))
            event(
                "response.output_text.delta",
                item_id="msg_mock",
                output_index=index,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        frames.extend(_fault(options, len(chunks)))
        event(
            "response.output_text.done",
            item_id="msg_mock",
            output_index=index,
            content_index=0,
            text=text,
            logprobs=[],
        )
        event(
            "response.content_part.done",
            item_id="msg_mock",
            output_index=index,
            content_index=0,
            part=message["content"][0],
        )
        event("response.output_item.done", output_index=index, item=message)
        index += 1
    for call in _responses_items("", {"tool_call": options.get("tool_call") or []}):
        event(
            "response.output_item.added",
            output_index=index,
            item={**call, "arguments": "", "status": "in_progress"},
        )
        event(
            "response.function_call_arguments.delta",
            item_id=call["id"],
            output_index=index,
            delta=call["arguments"],
        )
        event(
            "response.function_call_arguments.done",
            item_id=call["id"],
            output_index=index,
            arguments=call["arguments"],
        )
        event("response.output_item.done", output_index=index, item=call)
        index += 1
    whole = _responses_object(model, "".join(chunks), finish, usage, options)
    kind = "response.incomplete" if whole["status"] == "incomplete" else "response.completed"
    event(kind, "done", response=whole)
    return frames


def _anthropic_usage(usage: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "input_tokens": usage[0] - usage[2],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage[2],
        "output_tokens": usage[1],
        "service_tier": "standard",
    }


def _anthropic_stop(finish: str) -> str:
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish, "end_turn")


def _anthropic_message(
    model: str, text: str, finish: str, usage: tuple[int, int, int], options: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _anthropic_content(text, options),
        "stop_reason": _anthropic_stop(finish),
        "stop_sequence": None,
        "usage": _anthropic_usage(usage),
    }


def _anthropic_content(text: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if "thinking" in options:
        thought = str(options["thinking"])
        content.append({"type": "thinking", "thinking": thought, "signature": _signature(thought)})
    calls = _calls(options)
    if text or not calls:
        content.append({"type": "text", "text": text})
    for call in calls:
        content.append(
            {
                "type": "tool_use",
                "id": call["id"].replace("call_", "toolu_"),
                "name": call["name"],
                "input": json.loads(call["arguments"]),
            }
        )
    return content


def _anthropic_frames(
    model: str,
    chunks: list[str],
    finish: str,
    usage: tuple[int, int, int],
    options: dict[str, Any],
) -> list[tuple[str, bytes]]:
    start_usage = _anthropic_usage((usage[0], 1, usage[2]))
    message: dict[str, Any] = {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }

    def block_start(index: int, block: dict[str, Any]) -> tuple[str, bytes]:
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return ("start", _sse(start, "content_block_start"))

    def block_delta(index: int, delta: dict[str, Any]) -> tuple[str, bytes]:
        return (
            "token",
            _sse(
                {"type": "content_block_delta", "index": index, "delta": delta},
                "content_block_delta",
            ),
        )

    def block_stop(index: int) -> tuple[str, bytes]:
        return ("end", _sse({"type": "content_block_stop", "index": index}, "content_block_stop"))

    frames = [("start", _sse({"type": "message_start", "message": message}, "message_start"))]
    index = 0
    if "thinking" in options:
        thought = str(options["thinking"])
        frames.append(block_start(index, {"type": "thinking", "thinking": "", "signature": ""}))
        for word in _CHUNK.findall(thought):
            frames.append(block_delta(index, {"type": "thinking_delta", "thinking": word}))
        frames.append(
            block_delta(index, {"type": "signature_delta", "signature": _signature(thought)})
        )
        frames.append(block_stop(index))
        index += 1
    calls = _calls(options)
    if chunks or not calls:
        frames += [
            block_start(index, {"type": "text", "text": ""}),
            ("start", _sse({"type": "ping"}, "ping")),
        ]
        for i, text in enumerate(chunks):
            frames += _fault(options, i, anthropic=True)
            frames.append(block_delta(index, {"type": "text_delta", "text": text}))
        frames += _fault(options, len(chunks), anthropic=True)
        frames.append(block_stop(index))
        index += 1
    for call in calls:
        block = {
            "type": "tool_use",
            "id": call["id"].replace("call_", "toolu_"),
            "name": call["name"],
            "input": {},
        }
        frames.append(block_start(index, block))
        half = len(call["arguments"]) // 2
        for piece in (call["arguments"][:half], call["arguments"][half:]):
            frames.append(block_delta(index, {"type": "input_json_delta", "partial_json": piece}))
        frames.append(block_stop(index))
        index += 1
    delta_usage = {"output_tokens": usage[1]}
    frames.append(
        (
            "end",
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": _anthropic_stop(finish), "stop_sequence": None},
                    "usage": delta_usage,
                },
                "message_delta",
            ),
        )
    )
    frames.append(("done", _sse({"type": "message_stop"}, "message_stop")))
    return frames


def _fault(options: dict[str, Any], index: int, anthropic: bool = False) -> list[tuple[str, bytes]]:
    quoted = f" (called with {options['key']})" if options.get("key") else ""
    if options.get("drop_after") == index:
        return [("drop", b"")]
    if options.get("malformed_after") == index:
        return [("error", b"data: {not json\n\n")]
    if options.get("error_after") == index:
        if anthropic:
            error = {
                "type": "error",
                "error": {"type": "overloaded_error", "message": "Overloaded" + quoted},
            }
            return [("error", _sse(error, "error"))]
        error = {"error": {"message": "The server had an error" + quoted, "type": "server_error"}}
        return [("error", _sse(error))]
    return []


def _error_body(protocol: str, status: int, key: str = "") -> dict[str, Any]:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
    kind = kinds.get(status, "api_error")
    message = f"mock error {status}"
    if status == 401:
        # the real OpenAI quotes part of the key it refused
        message = "Incorrect API key provided: sk-mock***oops"
    if key:  # as a proxy quoting the request it failed to forward might
        message += f" (x-api-key: {key})"
    if protocol == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": key or None}}


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in scope["headers"]}


def _their_key(headers: dict[str, str]) -> str:
    """The key the request was made with, as either protocol sends it."""
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")


def _quoted(key: str) -> dict[str, str]:
    """The header an echoing provider quotes the key in."""
    return {"x-echoed-key": key} if key else {}


async def _read(receive: Receive) -> bytes:
    raw = b""
    while True:
        message: Message = await receive()
        raw += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return raw


async def _json(send: Send, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
    await _raw(send, status, json.dumps(data).encode(), "application/json", headers)


async def _raw(
    send: Send, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
) -> None:
    raw_headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft-ms", type=float, default=0)
    parser.add_argument("--token-delay-ms", type=float, default=0)
    args = parser.parse_args()
    serve(
        MockProvider(ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms), args.port, args.host
    )


def serve(app: Any, port: int, host: str = "127.0.0.1") -> None:
    """uvicorn as fast as it goes (uvloop, httptools, no access log): how the mock and
    bench/floor.py are served."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
