"""The walk of one request through the service's modules: which of our modules it enters,
in order, and how many times each (a call from one of our modules into another).

    uv run python bench/walk.py [--path /v1/chat/completions] [--stream] [--provider openai]

In process (httpx's ASGITransport), the provider a MockTransport answering in its own
format; Python's profiler hook sees every call. What it prints is the figure the README's
Layout section is held to: a request should meet each stage once on the way down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from config import Settings  # noqa: E402
from server import create_app  # noqa: E402

CHUNKS: list[dict[str, Any]] = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hello"}}]},
    {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
]


def provider(request: httpx.Request) -> httpx.Response:
    """An OpenAI-protocol provider: a stream, or a whole answer."""
    import json

    body = json.loads(request.content)
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": body["model"]}
    if body.get("stream"):
        frames = "".join(f"data: {json.dumps({**base, **c})}\n\n" for c in CHUNKS)
        return httpx.Response(
            200, text=frames + "data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )
    message = {"role": "assistant", "content": "Hello there"}
    return httpx.Response(
        200,
        json={
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    )


def ours(frame: FrameType) -> str | None:
    """The module of the service a frame runs in (dialects/x.py as dialects/x), or None."""
    if frame.f_code.co_filename.startswith("<"):
        return None  # <string>, <frozen abc>: made code, not a module of ours
    path = Path(frame.f_code.co_filename)
    try:
        relative = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if relative.parts[0] in ("bench", "tests", ".venv"):
        return None
    return str(relative.with_suffix(""))


async def walk(path: str, body: dict[str, Any], provider_kind: str) -> list[str]:
    settings = Settings(
        provider=provider_kind, openai_api_key="sk-walk-0123456789", api_keys=("walk-key",)
    )
    app = create_app(settings, transport=httpx.MockTransport(provider))
    entered: list[str] = []
    stack: list[str | None] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            module = ours(frame)
            caller = next((m for m in reversed(stack) if m is not None), None)
            if module is not None and module != caller:
                entered.append(module)
            stack.append(module)
        elif event == "return" and stack:
            stack.pop()

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://walk") as client:
        await client.post(path, json=body, headers={"X-API-Key": "walk-key"})  # warm
        sys.setprofile(profile)
        try:
            response = await client.post(path, json=body, headers={"X-API-Key": "walk-key"})
        finally:
            sys.setprofile(None)
    assert response.status_code == 200, response.text
    return entered


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--path", default="/v1/chat/completions")
    cli.add_argument("--stream", action="store_true")
    cli.add_argument("--provider", default="openai", choices=["openai", "anthropic", "echo"])
    args = cli.parse_args()
    if args.path in ("/complete", "/stream"):
        body: dict[str, Any] = {"prompt": "Hello there"}
    else:
        body = {"messages": [{"role": "user", "content": "Hello there"}], "stream": args.stream}
    entered = asyncio.run(walk(args.path, body, args.provider))
    # Down: from the router to the provider's request (the first entry into upstream).
    down = entered[: entered.index("upstream")] if "upstream" in entered else entered
    after = down[down.index("server") :] if "server" in down else down
    print(f"{args.path} stream={args.stream} provider={args.provider}")
    print("down, after the router:", " > ".join(after))
    print("modules entered on the way down, after the router, and how often:")
    for module, times in Counter(after).items():
        print(f"  {module:24} {times}")
    print(f"the whole request, down and up: {len(entered)} entries into "
          f"{len(set(entered))} modules")  # fmt: skip


if __name__ == "__main__":
    main()
