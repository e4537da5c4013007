"""The provider's HTTP exchange through an httpx.AsyncClient.

Used with `LLM_TRANSPORT=httpx` (httpx honours HTTPS_PROXY and the like) and whenever
a `transport` is passed to `create_app` (the tests' respx and MockTransport). Only
imported then: httpx and its pool hold about 6 MB of memory the default aiohttp path
never uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from config import Settings
from llm import Answer, ProviderTimeout, ProviderUnavailable, Streamed


@contextlib.contextmanager
def translate_transport_errors() -> Iterator[None]:
    """httpx's exceptions, as ours: callers handle one hierarchy."""
    try:
        yield
    except httpx.ConnectTimeout:
        raise ProviderUnavailable("could not connect to the provider (connect timeout)") from None
    except httpx.PoolTimeout:
        raise ProviderUnavailable(
            "too many concurrent provider calls; no connection was free in time"
        ) from None
    except httpx.TimeoutException:
        raise ProviderTimeout("the provider did not answer in time") from None
    except httpx.ConnectError:
        raise ProviderUnavailable("could not connect to the provider") from None
    except httpx.TransportError as exc:
        raise ProviderUnavailable(
            f"the connection to the provider failed ({type(exc).__name__})"
        ) from None


class HttpxUpstream:
    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            s = self._settings
            self._client = httpx.AsyncClient(
                transport=self._transport,
                # A cookie a provider sets must not ride along on other callers' calls.
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
                # One connection per call in flight at most: MAX_INFLIGHT refuses the
                # rest (httpx's default of 100 would queue the 101st concurrent stream).
                limits=httpx.Limits(
                    max_connections=s.max_inflight,
                    max_keepalive_connections=min(s.max_inflight, 256),
                    keepalive_expiry=30.0,
                ),
                # A slow first token must not be cut at httpx's 5 s default.
                timeout=httpx.Timeout(
                    connect=s.connect_timeout_s,
                    read=s.timeout_s,
                    write=s.timeout_s,
                    pool=s.connect_timeout_s,
                ),
            )
        return self._client

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        with translate_transport_errors():
            response = await self.client().post(url, content=body, headers=headers)
        return Answer(response.status_code, response.headers, response.content)

    async def open(self, url: str, body: bytes, headers: dict[str, str]) -> Streamed:
        client = self.client()
        request = client.build_request("POST", url, content=body, headers=headers)
        with translate_transport_errors():
            return _HttpxStreamed(await client.send(request, stream=True))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _HttpxStreamed:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        with translate_transport_errors():
            async for chunk in self._response.aiter_bytes():
                yield chunk

    async def read(self) -> bytes:
        with translate_transport_errors():
            return await self._response.aread()

    async def close(self) -> None:
        await self._response.aclose()
