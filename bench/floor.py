"""The floor: what the service's stack costs with none of the service in it.

A raw ASGI app on the same uvicorn (uvloop, httptools) that takes `POST /complete`
and `POST /stream`, forwards the prompt to the provider through one shared
`httpx.AsyncClient` over httpx-aiohttp's `AiohttpTransport`, as text-tool does (the
card's stack), and answers with the text, or relays the provider's stream byte for
byte: no Starlette, no auth, no limits, no validation, no parsing of the stream, no
accounting, no log. With `--client aiohttp` it calls aiohttp directly instead, for
reference. bench/run.py --floor runs both as columns beside the service, so a
target is a ratio to what the stack itself costs on this machine, in the same run.

    python bench/floor.py --port 9200 --provider http://127.0.0.1:9100/v1 [--client aiohttp]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4096), cookie_jar=aiohttp.DummyCookieJar()
    )


class Forwarder:
    def __init__(self, provider: str, client: str) -> None:
        self.url = provider.rstrip("/") + "/chat/completions"
        self.client = client
        self.session: aiohttp.ClientSession | None = None
        self.httpx: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self.session is not None:
                await self.session.close()
            if self.httpx is not None:
                await self.httpx.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] not in ("/complete", "/stream"):
            await answer(send, 200, b'{"status":"ok"}')
            return
        streaming = scope["path"] == "/stream"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        upstream: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": json.loads(body)["prompt"]}],
        }
        if streaming:
            upstream |= {"stream": True, "stream_options": {"include_usage": True}}
        headers = {"content-type": "application/json"}
        if self.client == "aiohttp":
            await self.by_aiohttp(send, json.dumps(upstream), headers, streaming)
        else:
            await self.by_httpx(send, json.dumps(upstream), headers, streaming)

    async def by_httpx(
        self, send: Send, body: str, headers: dict[str, str], streaming: bool
    ) -> None:
        if self.httpx is None:
            self.httpx = httpx.AsyncClient(
                transport=AiohttpTransport(client=session), timeout=httpx.Timeout(60)
            )
        if streaming:
            async with self.httpx.stream("POST", self.url, content=body, headers=headers) as r:
                await start_stream(send)
                async for chunk in r.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            return
        r = await self.httpx.post(self.url, content=body, headers=headers)
        await answer(send, 200, json.dumps({"text": text_of(r.content)}).encode())

    async def by_aiohttp(
        self, send: Send, body: str, headers: dict[str, str], streaming: bool
    ) -> None:
        if self.session is None:
            self.session = session()
        async with self.session.post(self.url, data=body, headers=headers) as r:
            if streaming:
                await start_stream(send)
                async for chunk in r.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            data = await r.read()
        await answer(send, 200, json.dumps({"text": text_of(data)}).encode())


def text_of(data: bytes) -> str:
    return str(json.loads(data)["choices"][0]["message"]["content"])


async def start_stream(send: Send) -> None:
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    from mock_provider import serve  # bench/, beside this file: the same uvicorn settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--provider", default="http://127.0.0.1:9100/v1")
    parser.add_argument("--client", choices=["httpx", "aiohttp"], default="httpx")
    args = parser.parse_args()
    serve(Forwarder(args.provider, args.client), args.port)


if __name__ == "__main__":
    main()
