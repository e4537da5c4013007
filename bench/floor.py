"""The floor: what the service's stack costs with none of the service in it.

A raw ASGI app on the same uvicorn (uvloop, httptools) that takes `POST /complete`
and `POST /stream`, forwards the prompt to the provider through aiohttp as text-tool
does, and answers with the text, or relays the provider's stream byte for byte: no
Starlette, no auth, no limits, no validation, no parsing of the stream, no
accounting, no log. bench/run.py --floor runs it as a third column, so a target that
the floor itself misses on a machine shows as such, measured in the same run.

    python bench/floor.py --port 9200 --provider http://127.0.0.1:9100/v1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Forwarder:
    def __init__(self, provider: str) -> None:
        self.url = provider.rstrip("/") + "/chat/completions"
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self.session is not None:
                await self.session.close()
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
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4096), cookie_jar=aiohttp.DummyCookieJar()
            )
        headers = {"content-type": "application/json"}
        async with self.session.post(self.url, data=json.dumps(upstream), headers=headers) as r:
            if streaming:
                await relay(send, r)
                return
            data = json.loads(await r.read())
        text = data["choices"][0]["message"]["content"]
        await answer(send, 200, json.dumps({"text": text}).encode())


async def relay(send: Send, response: aiohttp.ClientResponse) -> None:
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    async for chunk in response.content.iter_any():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    from mock_provider import serve  # bench/, beside this file: the same uvicorn settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--provider", default="http://127.0.0.1:9100/v1")
    args = parser.parse_args()
    serve(Forwarder(args.provider), args.port)


if __name__ == "__main__":
    main()
