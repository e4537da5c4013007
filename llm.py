"""Providers: plain REST calls through the app's one shared `httpx.AsyncClient`, no
provider SDKs.

A provider takes a `chat.Request`: `stream()` yields `chat` events, `complete()`
returns the `chat.Completion` they add up to. The OpenAI and Anthropic providers are
one `HttpProvider` each, speaking the wire format of their dialect module; echo needs
no network. Failures are raised as the `ProviderError`s of errors.py, where they are
mapped to HTTP answers; no message carries our provider key.

A client speaking the provider's own format gets its body passed through instead
(`passthrough`), the provider's answer relayed: one decision, made here, for every
pairing. The network under them is upstream.py's; which of them serves a call,
deployments.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
import httpx

import chat
import jsonio
import schemas
from dialects import anthropic_messages, json_object, openai_chat
from errors import (
    ApiError,
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from sse import StreamStalled, StreamTooLarge, sse_events
from upstream import (
    USER_AGENT,
    SharedClient,
    close,
    inflated,
    provider_errors,
    redact,
    status_error,
    transport_error,
)
from usage import Usage

logger = logging.getLogger("text_tool")
T = TypeVar("T")

# The trace of the call being served (`traceparent`, `tracestate`), for the provider's
# request: set by tracing.py while it serves one, when traces are on.
TRACE_HEADERS: ContextVar[Mapping[str, str] | None] = ContextVar("trace_headers", default=None)

__all__ = [
    "ProviderBadRequest",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderUnavailable",
]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retries of a provider call that failed before its answer began: a connection
    refused, 408, 429 or 5xx. Waits grow exponentially with full jitter; a provider's
    Retry-After is honoured when it is within `cap_s`, and a longer one is passed on
    to the client instead. No retry starts after `deadline_s` from the first try."""

    retries: int = 2
    base_s: float = 0.25
    cap_s: float = 10.0
    deadline_s: float = 30.0

    def delay(self, attempt: int, error: ProviderError) -> float | None:
        """Seconds to wait before retry number `attempt` (0-based), or None: give up."""
        if attempt >= self.retries:
            return None
        if not isinstance(error, ProviderUnavailable | ProviderRateLimited):
            return None
        backoff = random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
        retry_after = error.retry_after_s if isinstance(error, ProviderRateLimited) else None
        if retry_after is None:
            return backoff
        return max(retry_after, backoff) if retry_after <= self.cap_s else None


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """What one call may take of us, whatever the provider sends: `max_response_bytes`
    of a whole answer or of one event of a stream; `total_s` for a whole answer; and
    `idle_s` between two events of a stream, however the bytes trickle in; and
    `first_byte_s` for a stream's answer to begin: a server that accepts and never
    answers is a failed deployment (cooled, the call moved on), not a 60 s wait."""

    max_response_bytes: int = 16 * 1024 * 1024
    total_s: float = 600.0
    idle_s: float = 60.0
    first_byte_s: float = 30.0


class StreamDecoder(Protocol):
    """A provider's stream, event by event, as `chat` events."""

    done: bool  # the provider said its answer is complete

    def feed(self, event: str, data: str) -> Iterable[chat.Event]: ...

    def end(self) -> chat.End | None: ...


class Codec(Protocol):
    """What a dialect module gives the provider that speaks its format."""

    WIRE: str
    PATH: str  # the endpoint, under the provider's base URL

    def auth_headers(self, key: str) -> dict[str, str]: ...

    def encode_request(
        self, request: chat.Request, *, stream: bool, origin: str = ""
    ) -> dict[str, Any]: ...

    def decode_response(
        self, data: dict[str, Any], request: chat.Request, origin: str = ""
    ) -> chat.Completion: ...

    def stream_decoder(self, request: chat.Request, origin: str = "") -> StreamDecoder: ...


class Provider:
    """One LLM API: `stream()` yields the `chat` events of an answer; `complete()` is
    that answer whole."""

    name: str
    wire: str | None = None  # the dialect it speaks, when a client's body can pass through
    inflight: int = 0  # calls open with it, a stream's until it is closed

    async def complete(self, request: chat.Request) -> chat.Completion:
        return await chat.gather(self.stream(request))

    def stream(self, request: chat.Request) -> AsyncGenerator[chat.Event, None]:
        raise NotImplementedError

    async def embed(self, request: chat.Embeddings) -> chat.Vectors:
        """Embeddings made by the provider itself; an HTTP provider's are passed through."""
        raise ApiError(
            400,
            "invalid_request",
            f"the {self.name} provider has no embeddings endpoint; "
            "use an OpenAI-protocol provider for embeddings",
        )


class HttpProvider(Provider):
    """A provider behind an HTTP API in one of our dialects: the shared client, the
    URL, its headers, errors, bounds, and retries of what failed before the first byte
    of an answer."""

    def __init__(
        self,
        client: SharedClient,
        *,
        name: str,
        codec: Codec,
        url: str,
        headers: Mapping[str, str],
        secret: str = "",
        retry: RetryPolicy | None = None,
        bounds: Bounds | None = None,
        also: Mapping[str, str] | None = None,
        allows: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        self.codec = codec
        self.allows = allows  # fields choosing models upstream that it may be sent
        self.wire = codec.WIRE
        # The wire formats whose bodies can pass through to it, each at its endpoint:
        # its codec's, and any other it serves (`also`: OpenAI's embeddings, Responses).
        self.paths = {codec.WIRE: codec.PATH, **(also or {})}
        # What reasoning only this provider can read back (signed, encrypted) is tagged with.
        self.origin = f"{name}:{url.removesuffix(codec.PATH)}"
        self._client = client
        self._url = httpx.URL(url)  # parsed once, not per call
        self._base = url.removesuffix(codec.PATH)
        # Each endpoint's URL, parsed once (httpx parses a URL in pure Python).
        self._urls = {path: httpx.URL(self._base + path) for path in self.paths.values()}
        # Built once: httpx normalises every header it is given.
        self._headers = httpx.Headers(
            {"host": self._url.netloc.decode("ascii"), "content-type": "application/json",
             "accept-encoding": "gzip, deflate", "user-agent": USER_AGENT, **headers}
        )  # fmt: skip
        self._secrets = (secret,) if secret else ()
        self._retry_policy = retry or RetryPolicy()
        self._bounds = bounds or Bounds()

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    # --- translated through the hub ---------------------------------------------------

    async def complete(self, request: chat.Request) -> chat.Completion:
        body = self.codec.encode_request(request, stream=False, origin=self.origin)
        data = await self.post(body, request.request_id)
        try:
            completion = self.codec.decode_response(data, request, self.origin)
        except ProviderError as exc:
            raise self.redacted(exc) from None
        if completion.usage.estimated:  # the provider reported none
            usage = estimated_usage(request, chat.estimate_tokens(completion.text))
            completion = dataclasses.replace(completion, usage=usage)
        return completion

    async def stream(self, request: chat.Request) -> AsyncGenerator[chat.Event, None]:
        body = self.codec.encode_request(request, stream=True, origin=self.origin)
        decoder = self.codec.stream_decoder(request, self.origin)
        deltas = 0
        try:
            async with self.open_stream(body, request.request_id) as events:
                async for name, data in events:
                    for event in decoder.feed(name, data):
                        if isinstance(event, chat.TextDelta | chat.ToolCallDelta):
                            deltas += 1
                        yield event
                    if decoder.done:
                        break
            end = decoder.end()
        except ProviderError as exc:
            raise self.redacted(exc) from None
        if end is None:
            raise ProviderError("the provider's stream ended before the answer was complete")
        if end.usage.estimated:
            end = dataclasses.replace(end, usage=estimated_usage(request, deltas))
        yield end

    def redacted(self, exc: ProviderError) -> ProviderError:
        """`exc`, its message without our provider key."""
        exc.args = (self.redact(str(exc)),)
        return exc

    # --- the HTTP exchange (a passed-through body takes it too) -----------------------

    async def _retrying(self, attempt_once: Callable[[], Awaitable[T]]) -> T:
        policy = self._retry_policy
        deadline = time.monotonic() + policy.deadline_s
        attempt = 0
        while True:
            try:
                return await attempt_once()
            except ProviderError as exc:
                wait = policy.delay(attempt, exc)
                if wait is None or time.monotonic() + wait > deadline:
                    raise
                logger.warning(
                    "provider call failed; retrying",
                    extra={"event": "provider_retry", "attempt": attempt + 1, "error": str(exc),
                           "wait_s": round(wait, 3)},
                )  # fmt: skip
                await asyncio.sleep(wait)
                attempt += 1

    def headers(
        self,
        request_id: str | None,
        accept: str = "application/json",
        extra: Mapping[str, str] | None = None,
    ) -> httpx.Headers:
        headers = self._headers.copy()
        headers["accept"] = accept
        if request_id:
            headers["x-request-id"] = request_id
        trace = TRACE_HEADERS.get()
        if trace:
            headers.update(trace)
        if extra:
            headers.update(extra)
        return headers

    def url(self, path: str | None, query: str | None) -> httpx.URL:
        """The endpoint, or another of the provider's (`path`), with a query string."""
        url = self._url if path is None else self._urls.get(path) or httpx.URL(self._base + path)
        return url if query is None else url.copy_with(query=query.encode())

    async def _send(
        self, data: bytes, headers: httpx.Headers, url: httpx.URL | None = None
    ) -> httpx.Response:
        """The provider's answer, its body still to be read (and closed).

        The request is made here, whole, rather than by `build_request`, which merges
        the client's defaults into it anew on every call, or from `content=`, which
        rebuilds its headers to add Host and Content-Length (a departure, upstream.py)."""
        headers["content-length"] = str(len(data))
        request = httpx.Request(
            "POST", url or self._url, headers=headers, stream=httpx.ByteStream(data)
        )
        request.read()  # what transports send: the body, already whole
        self.inflight += 1  # until `_done`
        try:
            with provider_errors():
                return await self._client.get().send(request, stream=True)
        except BaseException:
            self.inflight -= 1
            raise

    async def _done(self, response: httpx.Response) -> None:
        self.inflight -= 1
        await close(response)

    async def _read(self, response: httpx.Response, deadline: float, scale: int = 1) -> bytes:
        """A whole answer, bounded: at most `max_response_bytes` (times `scale`) once
        decompressed (so a gzip bomb is cut as it expands), and done by `deadline`, which
        a trickle of bytes, each within the per-read timeout, would otherwise never reach."""
        limit = self._bounds.max_response_bytes * scale
        chunks: list[bytes] = []
        size = 0
        with provider_errors():
            async for chunk in inflated(response):
                size += len(chunk)
                if size > limit:
                    raise ProviderError(f"the provider's answer is over {limit} bytes")
                if time.monotonic() > deadline:
                    raise ProviderTimeout(
                        f"the provider did not finish its answer within {self._bounds.total_s:g} s"
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    async def post(
        self,
        body: dict[str, Any],
        request_id: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        path: str | None = None,
        query: str | None = None,
        scale: int = 1,
    ) -> dict[str, Any]:
        """The provider's JSON answer; `scale` raises its size bound, for an endpoint
        whose answers are big by nature (embeddings)."""
        raw = await self.post_raw(body, request_id, headers, path=path, query=query, scale=scale)
        return json_object(raw)

    async def post_raw(
        self,
        body: dict[str, Any],
        request_id: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        path: str | None = None,
        query: str | None = None,
        scale: int = 1,
    ) -> bytes:
        """`post`'s answer as it came, not parsed (an answer that is only relayed)."""
        data, sent = jsonio.dumps(body), self.headers(request_id, extra=headers)
        deadline = time.monotonic() + self._bounds.total_s
        url = self.url(path, query)

        async def once() -> bytes:
            return await self._whole(await self._send(data, sent, url), deadline, scale)

        return await self._retrying(once)

    async def _whole(self, response: httpx.Response, deadline: float, scale: int = 1) -> bytes:
        """An answer read whole and closed; the error for it unless it is a 200, with
        the provider's status and body kept for a client of its own format."""
        try:
            raw = await self._read(response, deadline, scale)
        finally:
            await self._done(response)
        if response.status_code != 200:
            error = status_error(response.status_code, response.headers, raw, self._secrets)
            error.answer, error.wire = (response.status_code, raw), self.wire
            raise error
        return raw

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        body: dict[str, Any],
        request_id: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        path: str | None = None,
        query: str | None = None,
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """The provider's SSE events; the response is closed however the caller leaves.
        Errors of the stream, raised inside the caller's loop, come out as ours."""
        data = jsonio.dumps(body)
        sent = self.headers(request_id, "text/event-stream", headers)
        deadline = time.monotonic() + self._bounds.total_s
        url = self.url(path, query)

        async def once() -> httpx.Response:
            try:
                async with asyncio.timeout(self._bounds.first_byte_s):
                    response = await self._send(data, sent, url)
            except TimeoutError:
                raise ProviderUnavailable(
                    f"the provider's stream did not begin within {self._bounds.first_byte_s:g} s"
                ) from None
            kind = response.headers.get("content-type", "")
            if response.status_code == 200 and (not kind or "event-stream" in kind):
                return response
            await self._whole(response, deadline)  # the provider's error, if it is one
            raise ProviderError(
                f"the provider sent an answer that is not an event stream ({kind or 'no type'})"
            )

        response = await self._retrying(once)
        bounds = self._bounds
        try:
            yield sse_events(inflated(response), max_bytes=bounds.max_response_bytes,
                             idle_s=bounds.idle_s)  # fmt: skip
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            raise transport_error(exc) from None
        except StreamTooLarge as exc:
            raise ProviderError(f"the provider's stream broke a bound: {exc}") from None
        except StreamStalled as exc:
            raise ProviderTimeout(f"the provider did not answer in time: {exc}") from None
        finally:
            await self._done(response)


def estimated_usage(request: chat.Request, output_tokens: int) -> Usage:
    """Token counts for a server that reports none: its stream sends about one token a
    delta; the prompt is estimated from its length. Logged, so nobody mistakes it."""
    logger.warning(
        "provider reported no usage; token counts are estimated",
        extra={"event": "usage_estimated", "model": request.model},
    )
    return Usage(
        input_tokens=chat.input_estimate(request), output_tokens=output_tokens, estimated=True
    )


# --- echo: no network ----------------------------------------------------------------


class EchoProvider(Provider):
    """No network, honest counts: it answers with the last message's words, one word a
    token. Asked for a tool (offered tools and a user's turn, or forced to one), it
    calls it with arguments made from the tool's JSON Schema; after a tool's result,
    it answers with the result's words; asked for a JSON schema, its text is a JSON
    document valid against it. So every client library can be tried offline."""

    name = "echo"

    async def stream(self, request: chat.Request) -> AsyncGenerator[chat.Event, None]:
        last = request.messages[-1] if request.messages else chat.Message("user", ())
        prompt = last.text() or " ".join(
            p.text for r in last.parts if isinstance(r, chat.ToolResult) for p in r.content
            if isinstance(p, chat.Text)
        )  # fmt: skip
        input_words = sum(len(m.text().split()) for m in request.messages)
        # What it will say is made before it starts: a schema it cannot follow is a 400,
        # not a stream cut after its first event.
        tool = _tool_to_call(request, last)
        form = request.response_format
        if tool is not None:
            made = jsonio.dumps(_example(tool, prompt)).decode()
        elif form is not None:
            schema = form.schema if form.kind == "json_schema" else None
            made = jsonio.dumps(
                _example_of(schema, prompt) if schema is not None else {"echo": prompt}
            ).decode()
        yield chat.Start(chat.new_id(), request.model)
        if tool is not None:
            pieces = [made[i : i + 16] for i in range(0, len(made), 16)]
            yield chat.ToolCallStart(0, chat.new_id("call_"), tool.name)
            for piece in pieces:
                yield chat.ToolCallDelta(0, piece)
            yield chat.End("tool_calls", Usage(input_tokens=input_words, output_tokens=len(pieces)))
            return
        if form is not None:
            words = [made[i : i + 16] for i in range(0, len(made), 16)]
            for word in words:
                yield chat.TextDelta(word)
            yield chat.End("stop", Usage(input_tokens=input_words, output_tokens=len(words)))
            return
        words = prompt.split()
        most = request.max_tokens if request.max_tokens is not None else len(words)
        out = words[:most]
        for i, word in enumerate(out):
            yield chat.TextDelta(word if i == 0 else " " + word)
        finish = "length" if len(words) > most else "stop"
        yield chat.End(finish, Usage(input_tokens=input_words, output_tokens=len(out)))

    async def embed(self, request: chat.Embeddings) -> chat.Vectors:
        """Deterministic unit vectors (`echo_vector`), a word a token."""
        dimensions = request.dimensions or ECHO_DIMENSIONS
        if len(request.inputs) * dimensions > ECHO_MOST_NUMBERS:
            raise ApiError(
                400, "invalid_request",
                f"echo makes at most {ECHO_MOST_NUMBERS:,} numbers an answer: "
                "fewer inputs or fewer dimensions",
                param="dimensions",
            )  # fmt: skip
        vectors = [echo_vector(item, dimensions) for item in request.inputs]
        tokens = sum(len(_words(item)) for item in request.inputs)
        return chat.Vectors(request.model, vectors, tokens)


ECHO_DIMENSIONS = 256  # echo's vectors unless `dimensions` asks otherwise
ECHO_MOST_NUMBERS = 1_000_000  # echo's answer, whatever inputs x dimensions ask (~20 MB)


def _words(item: str | tuple[int, ...]) -> list[str]:
    if isinstance(item, str):
        return item.lower().split()
    return [str(token) for token in item]


def echo_vector(item: str | tuple[int, ...], dimensions: int) -> list[float]:
    """A unit vector made by hashing each word to a signed coordinate: the same text
    always gives the same vector, and texts sharing words point the same way, so a
    search over echo's embeddings finds the overlapping texts first."""
    vector = [0.0] * dimensions
    words = _words(item) or [""]
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dimensions
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:  # every word cancelled out
        vector[0], norm = 1.0, 1.0
    return [x / norm for x in vector]


def _tool_to_call(request: chat.Request, last: chat.Message) -> chat.Tool | None:
    """The tool echo calls: the one the request forces (`tool_choice` named, or required:
    the one the last message names, else the first), or, left to choose, the one the
    last message names as a word ("use get_weather for Paris"). Otherwise none: Claude
    Code and Codex offer tools on every turn, and a plain "hello" is answered in words."""
    choice = request.tool_choice
    if not request.tools or (choice is not None and choice.mode == "none"):
        return None
    if choice is not None and choice.mode == "tool":
        return next((t for t in request.tools if t.name == choice.name), request.tools[0])
    text = last.text()
    named = next((t for t in request.tools if _names(text, t.name)), None)
    if choice is not None and choice.mode == "required":
        return named or request.tools[0]
    if any(isinstance(p, chat.ToolResult) for p in last.parts):
        return None  # the tool has answered: say so, and end the loop
    return named


def _names(text: str, name: str) -> bool:
    """Whether `text` has `name` as a word of its own (not inside another)."""
    return re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", text) is not None


def _example(tool: chat.Tool, prompt: str) -> Any:
    if tool.kind == "custom":
        return {"input": prompt or "echo"}
    # The prompt's last word: what "use get_weather for Paris" asks about.
    words = [w.strip(".,;:!?\"'()") for w in prompt.split()]
    hint = next((w for w in reversed(words) if w), "echo")
    return _example_of(tool.parameters or {"type": "object"}, hint)


def _example_of(schema: Any, prompt: str) -> Any:
    try:
        return schemas.example(schema, (prompt.split() or ["echo"])[0])
    except schemas.SchemaError as exc:
        raise ApiError(400, "invalid_request", f"the schema cannot be used: {exc}") from None


def passthrough(provider: Provider, wire: str) -> HttpProvider | None:
    """The provider, when a client's body in `wire` format can go to it as it is."""
    return provider if isinstance(provider, HttpProvider) and wire in provider.paths else None


# The wire format each kind of HTTP provider is called in.
CODECS: Mapping[str, Codec] = {"openai": openai_chat, "anthropic": anthropic_messages}
