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
from typing import Any, ClassVar, TypeVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

import jsonio
from config import Settings
from sse import StreamStalled, StreamTooLarge, sse_events
from usage import Usage

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


def status_error(
    status: int, headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...]
) -> ProviderError:
    """The exception for a provider's non-2xx answer."""
    detail = _redact(_provider_message(body), secrets)
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


# What a request without max_tokens may get (OpenAI then means the model's maximum).
UNSET_MAX_TOKENS = 131_072


class OutputCap:
    """A stream that runs on past its request's `max_tokens` is stopped here, not
    relayed until the client leaves. Every delta a provider streams carries a token
    or more, and hardly any token is over 32 characters, so an honest stream stays
    under both counts; an endless one passes one of them and ends as `length`."""

    __slots__ = ("chars", "deltas", "max_chars", "max_deltas")

    def __init__(self, max_tokens: int | None, choices: int = 1) -> None:
        tokens = (max_tokens or UNSET_MAX_TOKENS) * max(choices, 1)
        self.max_deltas = 2 * tokens + 64
        self.max_chars = 32 * tokens + 1024
        self.deltas = 0
        self.chars = 0

    def over(self, text: str) -> bool:
        """True if this delta of output would take the stream past its cap; else it
        is counted (so `deltas` is what was let through)."""
        if self.deltas >= self.max_deltas or self.chars + len(text) > self.max_chars:
            return True
        self.deltas += 1
        self.chars += len(text)
        return False


def _overran(model: str, cap: OutputCap) -> None:
    logger.warning(
        "the provider streamed past max_tokens; stream stopped",
        extra={"event": "max_tokens_enforced", "model": model, "deltas": cap.deltas},
    )


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """What one call may take of us, whatever the provider sends: `max_response_bytes`
    of a whole answer or of one event of a stream; `total_s` for a whole answer; and
    `idle_s` between two events of a stream, however the bytes trickle in."""

    max_response_bytes: int = 16 * 1024 * 1024
    total_s: float = 600.0
    idle_s: float = 60.0


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
        bounds: Bounds | None = None,
    ) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._url = httpx.URL(self._base_url + self.path)  # parsed once, not per call
        self._headers: httpx.Headers | None = None
        self._secrets = (api_key,) if api_key else ()
        self._retry_policy = retry or RetryPolicy()
        self._bounds = bounds or Bounds()

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

    def own_headers(self) -> dict[str, str]:
        """The provider's own headers (its key, its version)."""
        return {}

    def headers(self, request_id: str | None, accept: str = "application/json") -> httpx.Headers:
        if self._headers is None:
            # Built once: httpx normalises every header it is given.
            self._headers = httpx.Headers(
                {"content-type": "application/json", "accept-encoding": "gzip, deflate",
                 "user-agent": USER_AGENT, **self.own_headers()}
            )  # fmt: skip
        headers = self._headers.copy()
        headers["accept"] = accept
        if request_id:
            headers["x-request-id"] = request_id
        return headers

    async def _send(self, data: bytes, headers: httpx.Headers) -> httpx.Response:
        """The provider's answer, its body still to be read (and closed). The request is
        made here rather than by `build_request`, which merges the client's defaults
        into it anew on every call."""
        request = httpx.Request("POST", self._url, headers=headers, content=data)
        with provider_errors():
            return await self._client.get().send(request, stream=True)

    async def _read(self, response: httpx.Response, deadline: float) -> bytes:
        """A whole answer, bounded: at most `max_response_bytes` once decompressed (so a
        gzip bomb is cut as it expands), and done by `deadline`, which a trickle of bytes,
        each within the per-read timeout, would otherwise never reach."""
        limit = self._bounds.max_response_bytes
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

    async def post(self, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        data, headers = jsonio.dumps(body), self.headers(request_id)
        deadline = time.monotonic() + self._bounds.total_s

        async def once() -> bytes:
            response = await self._send(data, headers)
            try:
                raw = await self._read(response, deadline)
            finally:
                await _close(response)
            if response.status_code != 200:
                raise status_error(response.status_code, response.headers, raw, self._secrets)
            return raw

        return _json_object(await self._retrying(once))

    @contextlib.asynccontextmanager
    async def open_stream(
        self, body: dict[str, Any], request_id: str | None
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """The provider's SSE events; the response is closed however the caller leaves.
        Errors of the stream, raised inside the caller's loop, come out as ours."""
        data, headers = jsonio.dumps(body), self.headers(request_id, "text/event-stream")
        deadline = time.monotonic() + self._bounds.total_s

        async def once() -> httpx.Response:
            response = await self._send(data, headers)
            kind = response.headers.get("content-type", "")
            if response.status_code == 200 and (not kind or "event-stream" in kind):
                return response
            try:
                raw = await self._read(response, deadline)
            finally:
                await _close(response)
            if response.status_code == 200:
                raise ProviderError(
                    f"the provider sent an answer that is not an event stream ({kind or 'no type'})"
                )
            raise status_error(response.status_code, response.headers, raw, self._secrets)

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
            await _close(response)


async def _close(response: httpx.Response) -> None:
    """Close an answer (an unfinished one's connection is dropped, not pooled); a
    failure to close is no news to anyone."""
    with contextlib.suppress(httpx.TransportError, aiohttp.ClientError, OSError):
        await response.aclose()


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

    def own_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._secrets[0]}"} if self._secrets else {}

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
        cap = OutputCap(request.max_tokens)
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
                over = False
                for choice in obj.get("choices") or ():
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(text, str) and text:
                        over = cap.over(text)
                        if over:
                            break
                        yield text
                    if choice.get("finish_reason"):
                        finish = OPENAI_FINISH.get(str(choice["finish_reason"]), "stop")
                if over:
                    _overran(request.model, cap)
                    finish, usage = "length", None
                    break
                if obj.get("usage"):  # the last chunk only, mostly
                    usage = openai_usage(obj["usage"]) or usage
        if not done and finish is None:
            raise ProviderError("the provider's stream ended before the answer was complete")
        if usage is None:
            usage = _estimated_usage(request, None, chunks=cap.deltas)
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
        """The provider's chunks, as (data, parsed), up to and without [DONE]; a stream
        that runs past the body's max tokens is cut with a `length` chunk of ours."""
        finished = False
        most = body.get("max_completion_tokens") or body.get("max_tokens")
        choices = body.get("n")
        cap = OutputCap(
            most if isinstance(most, int) else None, choices if isinstance(choices, int) else 1
        )
        async with self.open_stream(body, request_id) as events:
            async for _, data in events:
                if data == "[DONE]":
                    return
                obj = _json_object(data)
                if "error" in obj:
                    message = _redact(_provider_message(data.encode()), self._secrets)
                    raise ProviderError(f"the provider failed mid-stream: {message}")
                for choice in obj.get("choices") or ():
                    if not isinstance(choice, dict):
                        continue
                    finished = finished or bool(choice.get("finish_reason"))
                    text = _delta_text(choice.get("delta"))
                    if text is not None and cap.over(text):
                        _overran(str(body.get("model")), cap)
                        cut = {
                            "id": obj.get("id"), "object": "chat.completion.chunk",
                            "created": obj.get("created"), "model": obj.get("model"),
                            "choices": [{"index": choice.get("index", 0), "delta": {},
                                         "logprobs": None, "finish_reason": "length"}],
                        }  # fmt: skip
                        yield "", cut
                        return
                yield data, obj
        if not finished:
            raise ProviderError("the provider's stream ended before the answer was complete")


def _delta_text(delta: Any) -> str | None:
    """The output a Chat Completions delta carries (text, reasoning, refusal, tool
    arguments), for `OutputCap`; None for a delta with none (the role chunk)."""
    if not isinstance(delta, dict):
        return None
    parts = [
        value
        for name in ("content", "reasoning_content", "reasoning", "refusal")
        if isinstance(value := delta.get(name), str) and value
    ]
    for call in delta.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str) and arguments:
            parts.append(arguments)
    return "".join(parts) if parts else None


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

    def own_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
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
        cap = OutputCap(request.max_tokens)
        async with self.open_stream(self.body(request, stream=True), request.request_id) as events:
            async for event, data in events:
                obj = _json_object(data)
                kind = event if event != "message" else str(obj.get("type", ""))
                if kind == "content_block_delta":
                    delta = obj.get("delta") or {}
                    text = delta.get("text") if isinstance(delta, dict) else None
                    if isinstance(text, str) and text:
                        if cap.over(text):
                            _overran(request.model, cap)
                            finish = "length"
                            usage = dataclasses.replace(
                                usage, output_tokens=cap.deltas, estimated=True
                            )
                            break
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
    bounds = Bounds(
        max_response_bytes=settings.max_response_bytes,
        total_s=settings.total_timeout_s,
        idle_s=settings.timeout_s,
    )
    return cls(client, base_url=base_url, api_key=api_key, retry=retry, bounds=bounds)
