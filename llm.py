"""Providers: plain REST calls through the app's one shared `httpx.AsyncClient`, no
provider SDKs.

A provider takes a `chat.Request`: `stream()` yields `chat` events, `complete()`
returns the `chat.Completion` they add up to. The OpenAI and Anthropic providers are
one `HttpProvider` each, speaking the wire format of their dialect module; echo needs
no network. Failures are raised as the `ProviderError`s of errors.py, where they are
mapped to HTTP answers; no message carries our provider key.

A client speaking the provider's own format gets its body passed through instead
(`passthrough`), the provider's answer relayed: one decision, made here, for every
pairing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

import chat
import jsonio
import schemas
from config import DeploymentSpec, Settings
from dialects import error_message, json_object
from errors import (
    ApiError,
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from requestlog import CALL
from sse import StreamStalled, StreamTooLarge, sse_events
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


# --- the shared client -------------------------------------------------------------


class SharedClient:
    """The app's one `httpx.AsyncClient` (the card's shared client), made on first use:
    a mounted sub-app gets no lifespan from its parent, so nothing else would create
    it in time.

    Under it, by default, httpx-aiohttp's `AiohttpTransport` over one tuned
    `aiohttp.ClientSession`: httpx's own pool polls every idle connection on each
    request and costs several times the CPU past a few dozen connections
    (bench/README.md). `LLM_TRANSPORT=httpx` selects httpx's own transport, which
    honours `HTTPS_PROXY`; a `transport` passed in (the tests') replaces both."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self._settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def get(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            s = self._settings
            transport = self._transport
            if transport is None and s.transport == "aiohttp":
                transport = AiohttpTransport(client=lambda: _aiohttp_session(s))
            self._client = ProviderClient(
                transport=transport,
                # httpx's own pool (LLM_TRANSPORT=httpx): one connection per call in
                # flight at most; MAX_INFLIGHT refuses the rest.
                limits=httpx.Limits(
                    max_connections=s.max_inflight,
                    max_keepalive_connections=min(s.max_inflight, 256),
                    keepalive_expiry=30.0,
                ),
                # Per read: a slow first token must not be cut at httpx's 5 s default.
                timeout=httpx.Timeout(
                    connect=s.connect_timeout_s,
                    read=s.timeout_s,
                    write=s.timeout_s,
                    pool=s.connect_timeout_s,
                ),
                follow_redirects=False,  # a 3xx is an error, never a call to another host
                trust_env=s.transport == "httpx",
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


USER_AGENT = "text-tool"


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        pass  # none kept, so none to look for


class ProviderClient(httpx.AsyncClient):
    """httpx's client, keeping no cookies: a cookie a provider sets must not ride along
    on other callers' calls. (A jar whose policy refuses every cookie still made
    urllib's request objects to ask it: a third of httpx's CPU time a call.)"""

    _none = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._none

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        pass


def _aiohttp_session(s: Settings) -> aiohttp.ClientSession:
    """Made by the transport on its first request, inside the running loop."""
    return aiohttp.ClientSession(
        # One connection per call in flight at most: MAX_INFLIGHT refuses the rest.
        connector=aiohttp.TCPConnector(
            limit=s.max_inflight, limit_per_host=0, keepalive_timeout=30
        ),
        # No HTTPS_PROXY or .netrc lookups: aiohttp repeats them on every request (in a
        # thread). Behind a proxy, use LLM_TRANSPORT=httpx.
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


# Transport exceptions as ours, the most specific match winning (as httpx's own map
# from httpcore does). httpx-aiohttp raises httpx's classes from aiohttp's: its cause
# is looked at first, as it tells a dropped connection from a connect timeout.
TRANSPORT_ERRORS: dict[type[BaseException], tuple[type[ProviderError], str]] = {
    httpx.TransportError: (ProviderUnavailable, "the connection to the provider failed"),
    httpx.ConnectError: (ProviderUnavailable, "could not connect to the provider"),
    httpx.TimeoutException: (ProviderTimeout, "the provider did not answer in time"),
    httpx.ConnectTimeout: (
        ProviderUnavailable, "could not connect to the provider (connect timeout)"
    ),
    httpx.PoolTimeout: (
        ProviderUnavailable, "too many concurrent provider calls; no connection was free in time"
    ),
    aiohttp.ClientError: (ProviderUnavailable, "the connection to the provider failed"),
    aiohttp.ClientConnectorError: (ProviderUnavailable, "could not connect to the provider"),
    aiohttp.ServerTimeoutError: (ProviderTimeout, "the provider did not answer in time"),
    # aiohttp's connect timeout covers the wait for a free connection from the pool too.
    aiohttp.ConnectionTimeoutError: (
        ProviderUnavailable, "could not connect to the provider (connect timeout)"
    ),
}  # fmt: skip


def transport_error(exc: BaseException) -> ProviderError:
    for candidate in (exc.__cause__, exc):
        found: type[BaseException] | None = None
        for cls in TRANSPORT_ERRORS:
            if isinstance(candidate, cls) and (found is None or issubclass(cls, found)):
                found = cls
        if found is not None:
            kind, message = TRANSPORT_ERRORS[found]
            if message.endswith("failed"):
                message += f" ({type(candidate).__name__})"
            return kind(message)
    return ProviderUnavailable(f"the connection to the provider failed ({type(exc).__name__})")


@contextlib.contextmanager
def provider_errors() -> Iterator[None]:
    try:
        yield
    except (httpx.TransportError, aiohttp.ClientError) as exc:
        raise transport_error(exc) from None


# --- what the HTTP providers share --------------------------------------------------


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text[:500]


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after-ms")
    if raw:
        with contextlib.suppress(ValueError):
            return float(raw) / 1000
    raw = headers.get("retry-after")
    if raw:
        with contextlib.suppress(ValueError):
            value = float(raw)
            if math.isfinite(value) and value >= 0:
                return value
    return None


def status_error(
    status: int, headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...]
) -> ProviderError:
    """The exception for a provider's non-2xx answer."""
    try:
        detail = _redact(error_message(jsonio.loads(body)), secrets)
    except ValueError:
        detail = ""
    suffix = f": {detail}" if detail else ""
    if 300 <= status < 400:
        # Never followed: a redirect would send the prompt (and our key) to another host.
        return ProviderError(f"the provider answered with a redirect (HTTP {status}), not followed")
    if status in (401, 403):
        return ProviderRejected(f"the provider refused our provider key (HTTP {status})")
    if status == 429:
        return ProviderRateLimited(
            f"the provider is rate limiting this service (HTTP 429){suffix}",
            _retry_after(headers),
        )
    if status == 408 or status >= 500:
        return ProviderUnavailable(f"the provider failed (HTTP {status}){suffix}")
    if 400 <= status < 500:
        return ProviderBadRequest(f"the provider rejected the request (HTTP {status}){suffix}")
    return ProviderError(f"unexpected provider answer (HTTP {status})")


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
    `idle_s` between two events of a stream, however the bytes trickle in."""

    max_response_bytes: int = 16 * 1024 * 1024
    total_s: float = 600.0
    idle_s: float = 60.0


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
    ) -> None:
        self.name = name
        self.codec = codec
        self.wire = codec.WIRE
        # The wire formats whose bodies can pass through to it, each at its endpoint:
        # its codec's, and any other it serves (`also`: OpenAI's embeddings, Responses).
        self.paths = {codec.WIRE: codec.PATH, **(also or {})}
        # What reasoning only this provider can read back (signed, encrypted) is tagged with.
        self.origin = f"{name}:{url.removesuffix(codec.PATH)}"
        self._client = client
        self._url = httpx.URL(url)  # parsed once, not per call
        self._base = url.removesuffix(codec.PATH)
        # Built once: httpx normalises every header it is given.
        self._headers = httpx.Headers(
            {"host": self._url.netloc.decode("ascii"), "content-type": "application/json",
             "accept-encoding": "gzip, deflate", "user-agent": USER_AGENT, **headers}
        )  # fmt: skip
        self._secrets = (secret,) if secret else ()
        self._retry_policy = retry or RetryPolicy()
        self._bounds = bounds or Bounds()

    def redact(self, text: str) -> str:
        return _redact(text, self._secrets)

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
        url = self._url if path is None else httpx.URL(self._base + path)
        return url if query is None else url.copy_with(query=query.encode())

    async def _send(
        self, data: bytes, headers: httpx.Headers, url: httpx.URL | None = None
    ) -> httpx.Response:
        """The provider's answer, its body still to be read (and closed).

        The request is made here, whole, rather than by `build_request`, which merges
        the client's defaults into it anew on every call, or from `content=`, which
        rebuilds its headers to add Host and Content-Length: together half of httpx's
        CPU time a call (bench/README.md)."""
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
        await _close(response)

    async def _read(self, response: httpx.Response, deadline: float, scale: int = 1) -> bytes:
        """A whole answer, bounded: at most `max_response_bytes` (times `scale`) once
        decompressed (so a gzip bomb is cut as it expands), and done by `deadline`, which
        a trickle of bytes, each within the per-read timeout, would otherwise never reach."""
        limit = self._bounds.max_response_bytes * scale
        chunks: list[bytes] = []
        size = 0
        with provider_errors():
            async for chunk in response.aiter_bytes():
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
        data, sent = jsonio.dumps(body), self.headers(request_id, extra=headers)
        deadline = time.monotonic() + self._bounds.total_s
        url = self.url(path, query)

        async def once() -> bytes:
            return await self._whole(await self._send(data, sent, url), deadline, scale)

        return json_object(await self._retrying(once))

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
            response = await self._send(data, sent, url)
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
            yield sse_events(response.aiter_bytes(), max_bytes=bounds.max_response_bytes,
                             idle_s=bounds.idle_s)  # fmt: skip
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            raise transport_error(exc) from None
        except StreamTooLarge as exc:
            raise ProviderError(f"the provider's stream broke a bound: {exc}") from None
        except StreamStalled as exc:
            raise ProviderTimeout(f"the provider did not answer in time: {exc}") from None
        finally:
            await self._done(response)


_CLOSED = httpx.ByteStream(b"")


async def _close(response: httpx.Response) -> None:
    """Close an answer (an unfinished one's connection is dropped, not pooled); a
    failure to close is no news to anyone.

    httpx's client wraps each answer's stream in one that points back at the answer,
    for its `elapsed`: a reference cycle of 18 objects a call (the request and its
    body among them), which only the cyclic collector frees. With thousands of calls
    a second the young generation filled with them, and each of its collections held
    the event loop for 4 ms (a p99 of 3 ms at one request at a time). The closed
    answer's stream is dropped, so reference counting frees the call at once."""
    with contextlib.suppress(httpx.TransportError, aiohttp.ClientError, OSError):
        await response.aclose()
    response.stream = _CLOSED


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


def _tool_to_call(request: chat.Request, last: chat.Message) -> chat.Tool | None:
    choice = request.tool_choice
    if not request.tools or (choice is not None and choice.mode == "none"):
        return None
    forced = choice is not None and choice.mode in ("required", "tool")
    after_result = any(isinstance(p, chat.ToolResult) for p in last.parts)
    if after_result and not forced:
        return None  # the tool has answered: say so, and end the loop
    if choice is not None and choice.mode == "tool":
        return next((t for t in request.tools if t.name == choice.name), request.tools[0])
    return request.tools[0]


def _example(tool: chat.Tool, prompt: str) -> Any:
    if tool.kind == "custom":
        return {"input": prompt or "echo"}
    return _example_of(tool.parameters or {"type": "object"}, prompt)


def _example_of(schema: Any, prompt: str) -> Any:
    try:
        return schemas.example(schema, (prompt.split() or ["echo"])[0])
    except schemas.SchemaError as exc:
        raise ApiError(400, "invalid_request", f"the schema cannot be used: {exc}") from None


# --- the providers of an app: deployments -------------------------------------------


# The longest a deployment is cooled down for: a provider's Retry-After, or a growing
# interval (1 s, 2 s, 4 s... after failures in a row), never more than this.
MOST_COOLING_S = 60.0


class Deployment:
    """One provider at one address, with the models it serves (each under its upstream
    name, or `""` for its own; `*`: any model), its weight and priority,
    and its health: cooled down after a failure before the first byte of an answer,
    so calls go elsewhere until it has had time to come back."""

    def __init__(
        self,
        name: str,
        provider: Provider,
        models: Mapping[str, str],
        *,
        weight: float = 1.0,
        priority: int = 0,
        cools: bool = True,
    ) -> None:
        self.name = name
        self.provider = provider
        self.models = dict(models)
        self.weight = weight
        self.priority = priority
        self.cools = cools  # the single provider of the settings (and its fallback) do not
        self.cooling_until = 0.0
        self.calls = 0  # begun here
        self.failed_calls = 0  # of them, failed before the answer began
        self.failures = 0  # in a row
        self.failed_at = -math.inf
        self.current = 0.0  # smooth weighted round robin, among equally loaded ones

    def upstream(self, model: str) -> str | None:
        """The model's name upstream, or None: not served here."""
        name = self.models.get(model, self.models.get("*"))
        return None if name is None else name or model

    def cooling_s(self, now: float) -> float:
        return max(0.0, self.cooling_until - now)

    def failed(self, exc: ProviderError, now: float) -> None:
        self.failed_calls += 1
        self.failures += 1
        self.failed_at = now
        if not self.cools or isinstance(exc, ProviderTimeout):
            return  # a timeout may be a slow answer, not a sick deployment
        wait = exc.retry_after_s if isinstance(exc, ProviderRateLimited) else None
        if wait is None:
            wait = 2.0 ** min(self.failures - 1, 8)
        self.cooling_until = now + min(wait, MOST_COOLING_S)

    def served(self, began: float) -> None:
        """A call begun at `began` was answered: the deployment is well again, unless
        it has failed since (a long call outliving the deployment's death says nothing)."""
        if began >= self.failed_at:
            self.failures, self.cooling_until = 0, 0.0

    def state(self, now: float) -> dict[str, Any]:
        """What /ready shows of it."""
        cooling = self.cooling_s(now)
        shown: dict[str, Any] = {
            "name": self.name,
            "provider": self.provider.name,
            "state": "cooling" if cooling else "up",
            "in_flight": self.provider.inflight,
            "weight": self.weight,
            "priority": self.priority,
            "calls": self.calls,
            "failed_calls": self.failed_calls,
        }
        if cooling:
            shown["cooling_s"] = round(cooling, 1)
        if self.failures:  # what failed is in the log (provider_fallback), not here: public
            shown["failures_in_a_row"] = self.failures
        return shown


class Deployments:
    """The app's providers: for each call, the healthy deployment of its model with the
    fewest calls in flight relative to its weight (equally loaded ones taken in turn,
    by weight); on a failure before the answer began, the next, until every one has
    been tried or the retry deadline passed. A request the provider refused as invalid
    is not tried again elsewhere: it is the request that is wrong. A deployment of a
    higher priority is tried only when none of the lowest is left; every one cooling
    down is a 503 with Retry-After until the first is back. The answer names the model
    that served."""

    def __init__(self, deployments: Iterable[Deployment], *, deadline_s: float = 30.0) -> None:
        self.all = sorted(deployments, key=lambda d: d.priority)
        self.deadline_s = deadline_s
        self.name = self.all[0].provider.name  # what /v1/models says owns the models

    def first(self, model: str) -> tuple[Provider, str]:
        """The provider a call of `model` goes to first (not cooling down, if one is
        not), and the model's name there: what decides whether a client's body could
        pass through, and where a token count is asked."""
        now = time.monotonic()
        serving = [d for d in self.all if d.upstream(model) is not None] or self.all[:1]
        d = next((d for d in serving if not d.cooling_s(now)), serving[0])
        return d.provider, d.upstream(model) or model

    def takes(self, model: str, wire: str) -> bool:
        """Whether a deployment of `model` takes a body in `wire` format as it is."""
        return any(passthrough(d.provider, wire) for d in self.all if d.upstream(model) is not None)

    async def run(
        self,
        model: str,
        attempt: Callable[[Provider, str], Awaitable[T]],
        *,
        fallback: bool = True,
        noted: dict[str, Any] | None = None,
        as_is: str | None = None,
    ) -> T:
        """`attempt(provider, upstream model)` on one deployment after another, as above;
        `fallback=False`: only those of the first priority. `noted`: the call's fields
        for the access line, where the deployment that served is written. `as_is`: a
        body that only passes through (in that wire format) goes only to deployments
        that take it, if any of the first priority does."""
        candidates = [d for d in self.all if d.upstream(model) is not None]
        if as_is is not None and candidates:  # among the first priority, which a fallback follows
            first = candidates[0].priority
            taking = [
                d for d in candidates if d.priority != first or passthrough(d.provider, as_is)
            ]
            if any(d.priority == first for d in taking):
                candidates = taking
        if not fallback and candidates:
            candidates = [d for d in candidates if d.priority == candidates[0].priority]
        serving = list(candidates)  # what a 503 waits for, when all of them are cooling
        started = time.monotonic()
        last: ProviderError | None = None
        while True:
            now = time.monotonic()
            pick = self._pick(candidates, now)
            if pick is None:
                break
            candidates.remove(pick)
            if last is not None:
                logger.warning(
                    "deployment failed; trying the next",
                    extra={"event": "provider_fallback", "error": str(last),
                           "deployment": pick.name, "model": pick.upstream(model)},
                )  # fmt: skip
            if noted is not None:
                noted["deployment"], noted["provider"] = pick.name, pick.provider.name
            pick.calls += 1
            try:
                result = await attempt(pick.provider, pick.upstream(model) or model)
            except ProviderError as exc:
                if isinstance(exc, ProviderBadRequest):
                    raise
                pick.failed(exc, time.monotonic())
                last = exc
                if time.monotonic() - started > self.deadline_s:
                    raise
                continue
            pick.served(now)
            return result
        if last is not None:
            raise last
        raise self._all_cooling(model, serving)

    def _pick(self, candidates: list[Deployment], now: float) -> Deployment | None:
        ready = [d for d in candidates if not d.cooling_s(now)]
        if not ready:
            return None
        ready = [d for d in ready if d.priority == ready[0].priority]
        least = min(d.provider.inflight / d.weight for d in ready)
        even = [d for d in ready if d.provider.inflight / d.weight == least]
        if len(even) == 1:
            return even[0]
        total = 0.0
        for d in even:  # nginx's smooth weighted round robin
            d.current += d.weight
            total += d.weight
        chosen = max(even, key=lambda d: d.current)
        chosen.current -= total
        return chosen

    def _all_cooling(self, model: str, serving: list[Deployment]) -> ApiError:
        now = time.monotonic()
        waits = [d.cooling_s(now) for d in serving]
        wait = max(1, math.ceil(min(waits, default=1.0)))
        return ApiError(
            503,
            "upstream_unavailable",
            f"every deployment of {model} is cooling down after failing; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    def states(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [d.state(now) for d in self.all]


def passthrough(provider: Provider, wire: str) -> HttpProvider | None:
    """The provider, when a client's body in `wire` format can go to it as it is."""
    return provider if isinstance(provider, HttpProvider) and wire in provider.paths else None


def make_deployments(
    settings: Settings, client: SharedClient, codecs: Mapping[str, Codec]
) -> Deployments:
    """The app's providers, from its settings: the LLM_DEPLOYMENTS file's, or the one
    provider (and its fallback, as a deployment of a higher priority that serves every
    model under LLM_FALLBACK_MODEL); `codecs` by provider kind ("openai", "anthropic")."""
    if settings.deployments:
        specs = settings.deployments
        made = []
        for spec in specs:
            # The next deployment is the retry; one with no other for its models is
            # retried itself, as the single provider is.
            retries = None if _alone(spec, specs) else 0
            provider = _make(spec.provider, settings, client, codecs, spec.base_url,
                             spec.api_key, retries=retries)  # fmt: skip
            made.append(
                Deployment(
                    spec.name,
                    provider,
                    dict(spec.models),
                    weight=spec.weight,
                    priority=spec.priority,
                )  # fmt: skip
            )
        return Deployments(made, deadline_s=settings.retry_deadline_s)
    kind = settings.provider
    base, key = _address(kind, settings)
    first = Deployment(
        kind, _make(kind, settings, client, codecs, base, key), {"*": ""}, cools=False
    )
    if not settings.fallback_provider:
        return Deployments([first], deadline_s=math.inf)
    kind = settings.fallback_provider
    base, key = _address(kind, settings)
    second = Deployment(
        "fallback-" + kind,
        _make(kind, settings, client, codecs, base, key),
        {"*": settings.fallback_model},
        priority=1,
        cools=False,
    )
    return Deployments([first, second], deadline_s=math.inf)


def _alone(spec: DeploymentSpec, specs: Iterable[DeploymentSpec]) -> bool:
    """No other deployment serves any of its models."""
    others = {model for other in specs if other is not spec for model, _ in other.models}
    return not others & {model for model, _ in spec.models}


def _address(kind: str, settings: Settings) -> tuple[str, str]:
    if kind == "openai":
        return settings.openai_base_url, settings.openai_api_key
    if kind == "anthropic":
        return settings.anthropic_base_url, settings.anthropic_api_key
    return "", ""


def _make(
    kind: str,
    settings: Settings,
    client: SharedClient,
    codecs: Mapping[str, Codec],
    base: str,
    key: str,
    *,
    retries: int | None = None,
) -> Provider:
    if kind == "echo":
        return EchoProvider()
    codec = codecs[kind]
    also: dict[str, str] = {}
    if kind == "openai":
        also["openai_embeddings"] = "/embeddings"  # what every OpenAI-protocol server serves
        if settings.serves_responses(base):
            also["openai_responses"] = "/responses"
    return HttpProvider(
        client,
        name=kind,
        codec=codec,
        url=base + codec.PATH,
        headers=codec.auth_headers(key),
        secret=key,
        retry=RetryPolicy(
            retries=settings.max_retries if retries is None else retries,
            deadline_s=settings.retry_deadline_s,
        ),
        bounds=Bounds(
            max_response_bytes=settings.max_response_bytes,
            total_s=settings.total_timeout_s,
            idle_s=settings.timeout_s,
        ),
        also=also,
    )


def of(request: Any) -> Deployments:
    """The app's providers (`app.state.deployments`)."""
    providers: Deployments = request.app.state.deployments
    return providers


async def serve(
    request: Any,
    model: str,
    attempt: Callable[[Provider, str], Awaitable[T]],
    *,
    fallback: bool = True,
    as_is: str | None = None,
) -> T:
    """A route's call of `attempt` on the app's deployments (`Deployments.run`), the one
    that served named in the request's access line."""
    noted = request.scope.get(CALL)
    return await of(request).run(model, attempt, fallback=fallback, noted=noted, as_is=as_is)
