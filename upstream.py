"""The network under every provider: the app's one shared `httpx.AsyncClient` (the
card's shared client), the table that turns transport exceptions into our
`ProviderError`s, and the one that turns a provider's non-2xx answer into one.

Departures from the libraries' ordinary use, each for a measured reason (the figures
are in bench/README.md, "Why the departures"); do not undo one without measuring:
- httpx-aiohttp's `AiohttpTransport` under httpx, over one tuned `aiohttp.ClientSession`,
  rather than httpx's own pool, which polls every idle connection on each request;
- a client that keeps no cookies (`ProviderClient`), rather than a jar refusing them,
  which urllib still consults on every call;
- a closed answer's stream dropped (`close`), breaking httpx's reference cycle, which
  only the cyclic collector would free;
- requests made whole by `HttpProvider` (llm.py), not by `build_request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

import jsonio
from config import Settings
from dialects import error_message
from errors import (
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)

# --- the shared client -------------------------------------------------------------


class SharedClient:
    """The app's one `httpx.AsyncClient` (the card's shared client), made on first use:
    a mounted sub-app gets no lifespan from its parent, so nothing else would create
    it in time.

    Under it, by default, httpx-aiohttp's `AiohttpTransport` over one tuned
    `aiohttp.ClientSession` (see the module's departures). `LLM_TRANSPORT=httpx`
    selects httpx's own transport, which honours `HTTPS_PROXY`; a `transport` passed in
    (the tests') replaces both."""

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
    on other callers' calls. (A jar whose policy refuses every cookie is still asked,
    through urllib's request objects, on every call.)"""

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


# --- a provider's answer, as an error ---------------------------------------------


# The most one decompression step writes: a gzip bomb (zeros deflate 1,000 to 1) is
# inflated this much at a time, with a turn of the loop between steps.
INFLATE_STEP = 64 << 10


async def inflated(response: httpx.Response) -> AsyncIterator[bytes]:
    """A provider's body, decompressed by us rather than by httpx, a bounded step at a
    time: httpx inflates each chunk whole (64 KB of a bomb is 64 MB at once, the loop
    held meanwhile); here the bounds that read the body cut it at their limit, and other
    requests run between steps. gzip and deflate, the encodings we ask for."""
    if response.is_stream_consumed:  # read whole already, and decoded (a test's transport)
        yield response.content
        return
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in response.aiter_raw():
            yield chunk
        return
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ProviderError(f"the provider's answer is encoded as {encoding[:40]!r}, not asked for")
    # gzip, or deflate in its zlib wrapper (raw deflate too, as httpx reads it)
    inflater = zlib.decompressobj(31 if "gzip" in encoding else zlib.MAX_WBITS)
    may_be_raw = encoding == "deflate"  # until its first bytes read as zlib's
    async for chunk in response.aiter_raw():
        data = chunk
        while data:
            try:
                piece = inflater.decompress(data, INFLATE_STEP)
            except zlib.error:
                if not may_be_raw:
                    raise ProviderError("the provider's answer does not decompress") from None
                inflater, may_be_raw = zlib.decompressobj(-zlib.MAX_WBITS), False
                continue
            may_be_raw = False
            data = inflater.unconsumed_tail
            if piece:
                yield piece
            if data:
                await asyncio.sleep(0)  # a bomb's next step, after the others' turn
    rest = inflater.flush()
    if rest:
        yield rest


def redact(text: str, secrets: tuple[str, ...]) -> str:
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
        detail = redact(error_message(jsonio.loads(body)), secrets)
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


_CLOSED = httpx.ByteStream(b"")


async def close(response: httpx.Response) -> None:
    """Close an answer (an unfinished one's connection is dropped, not pooled); a
    failure to close is no news to anyone.

    httpx's client wraps each answer's stream in one that points back at the answer,
    for its `elapsed`: a reference cycle (the request and its body among them), which
    only the cyclic collector frees, and whose collections then hold the event loop.
    The closed answer's stream is dropped, so reference counting frees the call at once."""
    with contextlib.suppress(httpx.TransportError, aiohttp.ClientError, OSError):
        await response.aclose()
    response.stream = _CLOSED
