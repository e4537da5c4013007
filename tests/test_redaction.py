"""A provider that quotes its key, in every place it can, never gets it to a client.

Real processes: the mock provider with `echo_key` puts the key it was called with in
its error bodies (400, 429, 500, 529), its error events, a header and the text of its
answers; the service in front of it speaks every route, passed through and translated,
whole and streamed. Neither provider key the service holds may appear in any answer's
headers or body, nor in its log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from redaction import MIN_SECRET, Redactor, mask
from tests.conftest import AUTH_HEADERS, CLIENT_KEY, Process, start_mock, start_service

OPENAI_KEY = "sk-proj-" + "0penAIsecret" * 4
ANTHROPIC_KEY = "sk-ant-api03-" + "AnthropicSecret" * 4
KEYS = (OPENAI_KEY, ANTHROPIC_KEY)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    """One service a protocol, each holding both keys, in front of one mock."""
    tmp = tmp_path_factory.mktemp("redaction")
    mock = start_mock(tmp)
    common = {
        "API_KEYS": CLIENT_KEY,
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": mock.url + "/v1",
        "OPENAI_RESPONSES": "on",  # Responses bodies pass through to it
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": mock.url,
        "LLM_MAX_RETRIES": "0",
    }
    started: dict[str, Process] = {}
    try:
        for provider, model in (("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5")):
            env = {**common, "LLM_PROVIDER": provider, "LLM_MODEL": model}
            started[provider] = start_service(tmp, env)
        yield started
    finally:
        for proc in started.values():
            proc.stop()
        mock.stop()


def body_for(path: str, directive: dict[str, Any], stream: bool) -> dict[str, Any]:
    prompt = "mock:" + json.dumps({"echo_key": True, **directive}) + "\nhello there"
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": prompt}], "stream": stream}
    if path in ("/v1/messages", "/v1/messages/count_tokens"):
        messages = {"messages": [{"role": "user", "content": prompt}]}
        if path.endswith("count_tokens"):
            return messages
        return {**messages, "max_tokens": 50, "stream": stream}
    if path == "/v1/responses":
        return {"input": prompt, "stream": stream}
    if path == "/v1/embeddings":
        return {"input": [prompt]}
    return {"prompt": prompt}  # /complete, /stream


ROUTES = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/complete"]
CASES = [
    *[(path, {"status": status}, False) for path in ROUTES for status in (400, 429, 500, 529)],
    *[(path, {}, False) for path in ROUTES],
    *[(path, {}, True) for path in ROUTES if path != "/complete"],
    ("/stream", {}, True),
    *[(path, {"error_after": 1}, True) for path in ROUTES if path != "/complete"],
    ("/stream", {"error_after": 1}, True),
    ("/v1/embeddings", {}, False),
    ("/v1/embeddings", {"status": 400}, False),
    ("/v1/messages/count_tokens", {}, False),
    ("/v1/messages/count_tokens", {"status": 400}, False),
    ("/v1/messages/count_tokens", {"status": 529}, False),
]


def leaked(response: httpx.Response, raw: bytes) -> list[str]:
    heads = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    return [key[:12] for key in KEYS if key in heads or key.encode() in raw]


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_no_provider_key_reaches_a_client_on_any_route(
    services: dict[str, Process], provider: str
) -> None:
    service = services[provider]
    seen: list[tuple[str, int]] = []
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH_HEADERS, timeout=10) as client:
        for path, directive, stream in CASES:
            body = body_for(path, directive, stream)
            if provider == "anthropic" and path == "/v1/embeddings":
                continue  # no embeddings there: nothing of the provider's to echo
            async with client.stream("POST", path, json=body) as response:
                raw = await response.aread()
            where = f"{provider} {path} {directive} stream={stream}: {response.status_code}"
            assert not leaked(response, raw), where + "\n" + raw.decode(errors="replace")[:800]
            assert b"internal_error" not in raw, where  # a provider's 500 may come back as is
            seen.append((path, response.status_code))
    # The hostile answers really came back (not refused before the provider).
    statuses = {status for _, status in seen}
    assert 200 in statuses and {400, 429} <= statuses, seen
    log = service.output()
    assert not [key for key in KEYS if key in log], "a provider key is in the service's log"


@pytest.mark.e2e
def test_a_provider_answer_quoting_the_key_comes_back_masked_to_the_same_length(
    services: dict[str, Process],
) -> None:
    """A Messages error comes back as the provider wrote it (Claude Code matches on its
    words), but for the key: masked, with a Content-Length that is still true."""
    service = services["anthropic"]
    body = body_for("/v1/messages", {"status": 400}, False)
    response = httpx.post(service.url + "/v1/messages", json=body, headers=AUTH_HEADERS)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("mock error 400 (x-api-key: [redacted]*")
    assert len(message) == len("mock error 400 (x-api-key: )") + len(ANTHROPIC_KEY)
    assert int(response.headers["content-length"]) == len(response.content)


def test_the_redactor_masks_every_key_whole_and_leaves_placeholders_alone() -> None:
    redactor = Redactor(["short", "", "abcdefgh", "abcdefghijkl"])
    assert redactor.scrub(b"x abcdefghijkl y abcdefgh z") == (
        b"x [redacted]** y ******** z"
    )  # the longer key first, each masked to its own length
    assert redactor.scrub(b"short words stay") == b"short words stay"  # under MIN_SECRET
    assert not Redactor(["EMPTY", "ollama"])  # placeholders: nothing to mask, no cost
    assert len(mask(b"k" * MIN_SECRET)) == MIN_SECRET


def test_headers_are_masked_too() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from redaction import RedactionMiddleware

    async def echo(request: Any) -> PlainTextResponse:
        return PlainTextResponse("key " + OPENAI_KEY, headers={"x-quoted": OPENAI_KEY})

    app = Starlette(
        routes=[Route("/", echo)],
        middleware=[Middleware(RedactionMiddleware, redactor=Redactor(KEYS))],
    )
    response = TestClient(app).get("/")
    assert OPENAI_KEY not in response.text and OPENAI_KEY not in response.headers["x-quoted"]
    assert response.headers["x-quoted"].startswith("[redacted]")
