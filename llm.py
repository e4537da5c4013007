"""Providers: plain REST calls through one shared client pool, no provider SDKs.

Every provider answers `complete()` with a `Completion`, and `stream()` with text
chunks followed by one `StreamEnd`. Failures are raised as:

    ProviderError               502 upstream_error: an answer we cannot use
     ├── ProviderTimeout        504 upstream_timeout: no answer within the read timeout
     ├── ProviderUnavailable    502 upstream_error: no connection, or the provider's 5xx
     ├── ProviderRateLimited    429 rate_limit_exceeded: the provider is limiting us
     ├── ProviderRejected       502 upstream_error: the provider refused our credentials
     └── ProviderBadRequest     400 invalid_request: the provider refused this request

The mapping to HTTP lives in one place, `server.py`. No message carries our provider
key: provider messages are redacted, and credential failures never quote the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import aiohttp

import jsonio
from config import Settings
from usage import Usage

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("text_tool")
T = TypeVar("T")


class ProviderError(Exception):
    """The provider's answer could not be used."""


class ProviderTimeout(ProviderError):
    """The provider did not answer within the read timeout."""


class ProviderUnavailable(ProviderError):
    """No connection to the provider, or it failed on its side (5xx)."""


class ProviderRateLimited(ProviderError):
    """The provider rate-limited us (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderRejected(ProviderError):
    """The provider refused our credentials (HTTP 401/403)."""


class ProviderBadRequest(ProviderError):
    """The provider refused this request as invalid (HTTP 400, 404, 413, 422...)."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    system: str | None = None
    max_tokens: int = 512
    temperature: float | None = 0.0  # None: the provider's default
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    user: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    id: str
    model: str
    finish_reason: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class Completion:
    id: str
    model: str
    text: str
    finish_reason: str
    usage: Usage


class Provider:
    """One LLM API. Subclasses set `name` and implement `complete` and `stream`; those
    that speak OpenAI's protocol also take a client's OpenAI body as it is."""

    name: str
    passes_through: bool = False

    async def complete(self, request: ChatRequest) -> Completion:
        raise NotImplementedError

    def stream(self, request: ChatRequest) -> AsyncGenerator[str | StreamEnd, None]:
        raise NotImplementedError

    async def passthrough(self, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def passthrough_stream(
        self, body: dict[str, Any], request_id: str | None
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Answer:
    """A provider's whole answer to one POST."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Streamed(Protocol):
    """A provider's answer to one POST, read as it comes; `close` it in every case."""

    status: int
    headers: Mapping[str, str]

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    """The HTTP exchange with a provider; failures are raised as `ProviderError`s."""

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer: ...

    async def open(self, url: str, body: bytes, headers: dict[str, str]) -> Streamed: ...

    async def aclose(self) -> None: ...


class SharedClient:
    """The app's one connection pool to the provider, made on first use: a mounted
    sub-app gets no lifespan from its parent, so nothing else would create it in time.

    `LLM_TRANSPORT=aiohttp` (the default) calls aiohttp directly; `httpx` goes through
    an httpx.AsyncClient, which is also what a `transport` passed in (tests) plugs into.
    httpcore's pool polls every idle connection's socket on each request and httpx's
    layer costs more CPU than the call itself: see bench/README.md for the figures."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self._settings = settings
        self._transport = transport
        self._upstream: Upstream | None = None

    def upstream(self) -> Upstream:
        if self._upstream is None:
            if self._transport is None and self._settings.transport == "aiohttp":
                self._upstream = AiohttpUpstream(self._settings)
            else:
                # Imported here: httpx and its pool hold 6 MB the default path never uses.
                from httpx_upstream import HttpxUpstream

                self._upstream = HttpxUpstream(self._settings, self._transport)
        return self._upstream

    async def aclose(self) -> None:
        if self._upstream is not None:
            await self._upstream.aclose()
            self._upstream = None


# --- helpers shared by the HTTP providers -------------------------------------------


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text[:500]


def _provider_message(body: bytes) -> str:
    """The human message inside an OpenAI or Anthropic error body, if there is one."""
    try:
        data = jsonio.loads(body)
    except ValueError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return ""


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


def status_error(answer: Answer, secrets: tuple[str, ...]) -> ProviderError:
    """The exception for a provider's non-2xx answer."""
    status = answer.status
    detail = _redact(_provider_message(answer.body), secrets)
    suffix = f": {detail}" if detail else ""
    if status in (401, 403):
        return ProviderRejected(f"the provider refused our provider key (HTTP {status})")
    if status == 429:
        return ProviderRateLimited(
            f"the provider is rate limiting this service (HTTP 429){suffix}",
            _retry_after(answer.headers),
        )
    if status == 408 or status >= 500:
        return ProviderUnavailable(f"the provider failed (HTTP {status}){suffix}")
    if 400 <= status < 500:
        return ProviderBadRequest(f"the provider rejected the request (HTTP {status}){suffix}")
    return ProviderError(f"unexpected provider answer (HTTP {status})")


@contextlib.contextmanager
def translate_aiohttp_errors() -> Iterator[None]:
    """aiohttp's exceptions, as ours."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError:
        # connect_timeout_s covers the wait for a free connection from the pool too
        raise ProviderUnavailable("could not connect to the provider (connect timeout)") from None
    except (aiohttp.ServerTimeoutError, TimeoutError):
        raise ProviderTimeout("the provider did not answer in time") from None
    except aiohttp.ClientConnectorError:
        raise ProviderUnavailable("could not connect to the provider") from None
    except aiohttp.ClientError as exc:
        raise ProviderUnavailable(
            f"the connection to the provider failed ({type(exc).__name__})"
        ) from None


class AiohttpUpstream:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self._settings
            self._session = aiohttp.ClientSession(
                # One connection per call in flight at most: MAX_INFLIGHT refuses the rest.
                connector=aiohttp.TCPConnector(
                    limit=s.max_inflight, limit_per_host=0, keepalive_timeout=30
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=s.connect_timeout_s,
                    sock_connect=s.connect_timeout_s,
                    sock_read=s.timeout_s,  # per read: a slow first token is not cut short
                ),
                # No HTTPS_PROXY or .netrc lookups: aiohttp repeats them on every request
                # (in a thread). Behind a proxy, use LLM_TRANSPORT=httpx.
                trust_env=False,
                # A cookie a provider sets must not ride along on other callers' calls.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        with translate_aiohttp_errors():
            async with self.session().post(url, data=body, headers=headers) as response:
                return Answer(response.status, response.headers, await response.read())

    async def open(self, url: str, body: bytes, headers: dict[str, str]) -> Streamed:
        with translate_aiohttp_errors():
            return _AiohttpStreamed(await self.session().post(url, data=body, headers=headers))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _AiohttpStreamed:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        with translate_aiohttp_errors():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def read(self) -> bytes:
        with translate_aiohttp_errors():
            return await self._response.read()

    async def close(self) -> None:
        # A stream left unread cannot go back to the pool: close its connection.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream; lines split across reads are joined."""
    event = ""
    data: list[str] = []
    pending = b""
    async for chunk in chunks:
        if pending:
            chunk = pending + chunk
        if b"\n" not in chunk:
            pending = chunk
            continue
        *lines, pending = chunk.split(b"\n")
        for raw in lines:
            if raw.startswith(b"data:"):  # nearly every line: no decoding of the rest
                value = raw[6:] if raw.startswith(b"data: ") else raw[5:]
                data.append(value.rstrip(b"\r").decode("utf-8", "replace"))
                continue
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data:
                    yield event or "message", data[0] if len(data) == 1 else "\n".join(data)
                event, data = "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value_text = line.partition(":")
            if name == "event":
                event = value_text[1:] if value_text.startswith(" ") else value_text
            elif name == "data":  # "data" alone: an empty line of data
                data.append(value_text)
    if pending.strip():
        name, _, value_text = pending.rstrip(b"\r").decode("utf-8", "replace").partition(":")
        if name == "data":
            data.append(value_text[1:] if value_text.startswith(" ") else value_text)
    if data:
        yield event or "message", "\n".join(data)


def _json_object(data: str | bytes) -> dict[str, Any]:
    try:
        value = jsonio.loads(data)
    except ValueError:
        raise ProviderError("the provider sent an answer that is not JSON") from None
    if not isinstance(value, dict):
        raise ProviderError("the provider sent an answer that is not a JSON object")
    return value


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def estimate_tokens(text: str) -> int:
    """About four characters a token: used only when a server reports no usage."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


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


class HttpProvider(Provider):
    """What the OpenAI and Anthropic providers share: the client, URL, headers, errors,
    and retries of what failed before the first byte of an answer."""

    def __init__(
        self,
        client: SharedClient,
        *,
        base_url: str,
        api_key: str,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._secrets = (api_key,) if api_key else ()
        self._retry_policy = retry or RetryPolicy()

    path: ClassVar[str]

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

    def headers(self, request_id: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if request_id:
            headers["x-request-id"] = request_id
        return headers

    async def post(self, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        upstream, data = self._client.upstream(), jsonio.dumps(body)

        async def once() -> Answer:
            answer = await upstream.post(self._base_url + self.path, data, self.headers(request_id))
            if answer.status != 200:
                raise status_error(answer, self._secrets)
            return answer

        return _json_object((await self._retrying(once)).body)

    @contextlib.asynccontextmanager
    async def open_stream(
        self, body: dict[str, Any], request_id: str | None
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """The provider's SSE events; the response is closed however the caller leaves."""
        upstream, data = self._client.upstream(), jsonio.dumps(body)
        headers = self.headers(request_id) | {"accept": "text/event-stream"}

        async def once() -> Streamed:
            streamed = await upstream.open(self._base_url + self.path, data, headers)
            kind = streamed.headers.get("content-type", "")
            if streamed.status == 200 and (not kind or "event-stream" in kind):
                return streamed
            try:
                answer = Answer(streamed.status, streamed.headers, await streamed.read())
            finally:
                await streamed.close()
            if answer.status == 200:
                raise ProviderError(
                    f"the provider sent an answer that is not an event stream ({kind or 'no type'})"
                )
            raise status_error(answer, self._secrets)

        streamed = await self._retrying(once)
        try:
            yield sse_events(streamed.chunks())
        finally:
            await streamed.close()


# --- OpenAI and every OpenAI-compatible server ---------------------------------------

OPENAI_FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def openai_usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    details = data.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(
        input_tokens=_int(data.get("prompt_tokens")),
        output_tokens=_int(data.get("completion_tokens")),
        cached_input_tokens=cached,
    )


class OpenAIProvider(HttpProvider):
    name = "openai"
    path = "/chat/completions"
    passes_through = True

    def headers(self, request_id: str | None) -> dict[str, str]:
        headers = super().headers(request_id)
        if self._secrets:
            headers["authorization"] = f"Bearer {self._secrets[0]}"
        return headers

    @staticmethod
    def body(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
        }
        _set_sampling(body, request)
        if request.stop:
            body["stop"] = list(request.stop)
        if request.user:
            body["user"] = request.user
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        data = await self.post(self.body(request, stream=False), request.request_id)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = str(choice.get("finish_reason") or "stop")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ProviderError("the provider's answer has no choices") from None
        usage = openai_usage(data.get("usage"))
        if usage is None:
            usage = _estimated_usage(request, text, chunks=None)
        return Completion(
            id=str(data.get("id") or _new_id()),
            model=str(data.get("model") or request.model),
            text=str(text),
            finish_reason=OPENAI_FINISH.get(finish, "stop"),
            usage=usage,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | StreamEnd, None]:
        id_, model, finish = "", "", None
        usage: Usage | None = None
        chunks: list[int] = []  # lengths only: the text itself is not kept
        done = False
        async with self.open_stream(self.body(request, stream=True), request.request_id) as events:
            async for _, data in events:
                if data == "[DONE]":
                    done = True
                    break
                obj = _json_object(data)
                if "error" in obj:
                    message = _redact(_provider_message(data.encode()), self._secrets)
                    raise ProviderError(f"the provider failed mid-stream: {message}")
                id_ = id_ or str(obj.get("id") or "")
                model = model or str(obj.get("model") or "")
                for choice in obj.get("choices") or ():
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(text, str) and text:
                        chunks.append(len(text))
                        yield text
                    if choice.get("finish_reason"):
                        finish = OPENAI_FINISH.get(str(choice["finish_reason"]), "stop")
                if obj.get("usage"):  # the last chunk only, mostly
                    usage = openai_usage(obj["usage"]) or usage
        if not done and finish is None:
            raise ProviderError("the provider's stream ended before the answer was complete")
        if usage is None:
            usage = _estimated_usage(request, None, chunks=len(chunks))
        yield StreamEnd(
            id=id_ or _new_id(),
            model=model or request.model,
            finish_reason=finish or "stop",
            usage=usage,
        )

    async def passthrough(self, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        """An OpenAI chat body sent as the client wrote it, the answer returned as is."""
        return await self.post(body, request_id)

    async def passthrough_stream(
        self, body: dict[str, Any], request_id: str | None
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """The provider's chunks, as (raw data, parsed), up to and without [DONE]."""
        finished = False
        async with self.open_stream(body, request_id) as events:
            async for _, data in events:
                if data == "[DONE]":
                    return
                obj = _json_object(data)
                if "error" in obj:
                    message = _redact(_provider_message(data.encode()), self._secrets)
                    raise ProviderError(f"the provider failed mid-stream: {message}")
                finished = finished or any(
                    isinstance(c, dict) and c.get("finish_reason") for c in obj.get("choices") or ()
                )
                yield data, obj
        if not finished:
            raise ProviderError("the provider's stream ended before the answer was complete")


def _set_sampling(body: dict[str, Any], request: ChatRequest) -> None:
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p


def _estimated_usage(request: ChatRequest, text: str | None, *, chunks: int | None) -> Usage:
    """Token counts for a server that reports none: its stream sends about one token a
    chunk; the prompt is estimated from its length. Logged, so nobody mistakes it."""
    prompt = (request.system or "") + "".join(m.content for m in request.messages)
    output = chunks if chunks is not None else estimate_tokens(text or "")
    logger.warning(
        "provider reported no usage; token counts are estimated",
        extra={"event": "usage_estimated", "model": request.model},
    )
    return Usage(input_tokens=estimate_tokens(prompt), output_tokens=output, estimated=True)


def _new_id() -> str:
    return "cmpl-" + os.urandom(16).hex()  # as random as uuid4().hex, at a fifth of the cost


# --- Anthropic Messages API ------------------------------------------------------------

ANTHROPIC_VERSION = "2023-06-01"

_ANTHROPIC_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def anthropic_usage(data: Any, previous: Usage | None = None) -> Usage:
    """Anthropic counts cached input apart from `input_tokens`; ours is the total."""
    before = previous or Usage()
    if not isinstance(data, dict):
        return before
    read = _int(data["cache_read_input_tokens"]) if "cache_read_input_tokens" in data else None
    written = (
        _int(data["cache_creation_input_tokens"]) if "cache_creation_input_tokens" in data else None
    )
    cached = before.cached_input_tokens if read is None else read
    creation = before.cache_write_tokens if written is None else written
    if "input_tokens" in data:
        input_tokens = _int(data["input_tokens"]) + cached + creation
    else:
        input_tokens = before.input_tokens
    return Usage(
        input_tokens=input_tokens,
        output_tokens=_int(data["output_tokens"])
        if "output_tokens" in data
        else before.output_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=creation,
    )


_ANTHROPIC_UNAVAILABLE = {"overloaded_error", "api_error"}


class AnthropicProvider(HttpProvider):
    name = "anthropic"
    path = "/v1/messages"

    def headers(self, request_id: str | None) -> dict[str, str]:
        headers = super().headers(request_id)
        headers["anthropic-version"] = ANTHROPIC_VERSION
        if self._secrets:
            headers["x-api-key"] = self._secrets[0]
        return headers

    @staticmethod
    def body(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        _set_sampling(body, request)
        if request.system:
            body["system"] = request.system
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        if request.user:
            body["metadata"] = {"user_id": request.user}
        if stream:
            body["stream"] = True
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        data = await self.post(self.body(request, stream=False), request.request_id)
        content = data.get("content")
        if not isinstance(content, list):
            raise ProviderError("the provider's answer has no content")
        text = "".join(
            str(block.get("text", ""))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
        return Completion(
            id=str(data.get("id") or _new_id()),
            model=str(data.get("model") or request.model),
            text=text,
            finish_reason=_ANTHROPIC_FINISH.get(str(data.get("stop_reason")), "stop"),
            usage=anthropic_usage(data.get("usage")),
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | StreamEnd, None]:
        id_, model, finish = "", "", None
        usage = Usage()
        stopped = False
        async with self.open_stream(self.body(request, stream=True), request.request_id) as events:
            async for event, data in events:
                obj = _json_object(data)
                kind = event if event != "message" else str(obj.get("type", ""))
                if kind == "content_block_delta":
                    delta = obj.get("delta") or {}
                    text = delta.get("text") if isinstance(delta, dict) else None
                    if isinstance(text, str) and text:
                        yield text
                elif kind == "message_start":
                    message = obj.get("message") or {}
                    id_ = str(message.get("id") or "")
                    model = str(message.get("model") or "")
                    usage = anthropic_usage(message.get("usage"), usage)
                elif kind == "message_delta":
                    delta = obj.get("delta") or {}
                    if isinstance(delta, dict) and delta.get("stop_reason"):
                        finish = _ANTHROPIC_FINISH.get(str(delta["stop_reason"]), "stop")
                    usage = anthropic_usage(obj.get("usage"), usage)
                elif kind == "message_stop":
                    stopped = True
                    break
                elif kind == "error":
                    error = obj.get("error") or {}
                    message = _redact(str(error.get("message", "")), self._secrets)
                    cls = (
                        ProviderUnavailable
                        if error.get("type") in _ANTHROPIC_UNAVAILABLE
                        else ProviderError
                    )
                    raise cls(f"the provider failed mid-stream: {message}")
        if not stopped and finish is None:
            raise ProviderError("the provider's stream ended before the answer was complete")
        yield StreamEnd(
            id=id_ or _new_id(),
            model=model or request.model,
            finish_reason=finish or "stop",
            usage=usage,
        )


# --- echo: no network ----------------------------------------------------------------


class EchoProvider(Provider):
    """Answers with the prompt's words, one word a token, so counts are exact."""

    name = "echo"

    @staticmethod
    def _answer(request: ChatRequest) -> tuple[list[str], str, Usage]:
        prompt = request.messages[-1].content if request.messages else ""
        words = prompt.split()
        out = words[: request.max_tokens]
        input_words = sum(len(m.content.split()) for m in request.messages)
        input_words += len((request.system or "").split())
        finish = "length" if len(words) > request.max_tokens else "stop"
        return out, finish, Usage(input_tokens=input_words, output_tokens=len(out))

    async def complete(self, request: ChatRequest) -> Completion:
        out, finish, usage = self._answer(request)
        return Completion(
            id=_new_id(),
            model=request.model,
            text=" ".join(out),
            finish_reason=finish,
            usage=usage,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | StreamEnd, None]:
        out, finish, usage = self._answer(request)
        for i, word in enumerate(out):
            yield word if i == 0 else " " + word
        yield StreamEnd(id=_new_id(), model=request.model, finish_reason=finish, usage=usage)


class FallbackProvider(Provider):
    """A second provider (or model) for calls the first fails before its answer began,
    after its own retries. A request the first refused as invalid is not retried
    elsewhere: it is the request that is wrong. The answer names the model that served."""

    def __init__(self, primary: Provider, secondary: Provider, secondary_model: str) -> None:
        self.primary = primary
        self.secondary = secondary
        self.secondary_model = secondary_model
        self.name = primary.name
        # /v1 bodies pass through when the first speaks OpenAI; they fall back only to a
        # second that does too (there is nothing to translate an arbitrary body with).
        self.passes_through = primary.passes_through

    def _falls_back(self, exc: ProviderError) -> bool:
        if isinstance(exc, ProviderBadRequest):
            return False
        logger.warning(
            "provider failed; trying the fallback",
            extra={"event": "provider_fallback", "error": str(exc), "model": self.secondary_model},
        )
        return True

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            return await self.primary.complete(request)
        except ProviderError as exc:
            if not self._falls_back(exc):
                raise
        return await self.secondary.complete(
            dataclasses.replace(request, model=self.secondary_model)
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | StreamEnd, None]:
        events = self.primary.stream(request)
        try:
            first = await anext(events)
        except ProviderError as exc:
            await events.aclose()
            if not self._falls_back(exc):
                raise
            events = self.secondary.stream(dataclasses.replace(request, model=self.secondary_model))
            first = await anext(events)
        try:
            yield first
            async for item in events:
                yield item
        finally:
            await events.aclose()

    async def passthrough(self, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        try:
            return await self.primary.passthrough(body, request_id)
        except ProviderError as exc:
            if not self.secondary.passes_through or not self._falls_back(exc):
                raise
        return await self.secondary.passthrough({**body, "model": self.secondary_model}, request_id)

    async def passthrough_stream(
        self, body: dict[str, Any], request_id: str | None
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        chunks = self.primary.passthrough_stream(body, request_id)
        try:
            first = await anext(chunks)
        except ProviderError as exc:
            await chunks.aclose()
            if not self.secondary.passes_through or not self._falls_back(exc):
                raise
            chunks = self.secondary.passthrough_stream(
                {**body, "model": self.secondary_model}, request_id
            )
            first = await anext(chunks)
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()


def make_provider(settings: Settings, client: SharedClient) -> Provider:
    primary = _make(settings.provider, settings, client)
    if not settings.fallback_provider:
        return primary
    secondary = _make(settings.fallback_provider, settings, client)
    return FallbackProvider(primary, secondary, settings.fallback_model)


def _make(kind: str, settings: Settings, client: SharedClient) -> Provider:
    if kind == "echo":
        return EchoProvider()
    cls, base_url, api_key = (
        (OpenAIProvider, settings.openai_base_url, settings.openai_api_key)
        if kind == "openai"
        else (AnthropicProvider, settings.anthropic_base_url, settings.anthropic_api_key)
    )
    retry = RetryPolicy(retries=settings.max_retries, deadline_s=settings.retry_deadline_s)
    return cls(client, base_url=base_url, api_key=api_key, retry=retry)
