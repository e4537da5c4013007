"""Browsers: CORS_ORIGINS lets pages of those origins call the service. A preflight is
answered without a key; every answer, errors included, carries the CORS headers and
exposes the request id and the rate-limit headers; other origins get none. Then the
real thing: headless Chromium, on a page served from another 127.0.0.1 port, streams
a chat completion with `fetch`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from config import Settings, SettingsError
from server import create_app
from tests.conftest import CLIENT_KEY, Process, free_port, start_service

pytestmark = pytest.mark.anyio
PAGE_ORIGIN = "http://127.0.0.1:5173"


def app(**changes: object) -> Starlette:
    settings = Settings(provider="echo", api_keys=(CLIENT_KEY,), cors_origins=(PAGE_ORIGIN,))
    return create_app(settings.replace(**changes))


def client(asgi: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://testserver")


PREFLIGHT = {
    "Origin": PAGE_ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


async def test_a_preflight_is_answered_without_a_key() -> None:
    async with client(app()) as c:
        r = await c.options("/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


async def test_answers_and_errors_carry_the_headers_and_expose_the_request_id() -> None:
    origin = {"Origin": PAGE_ORIGIN}
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    async with client(app()) as c:
        ok = await c.post(
            "/v1/chat/completions", json=body,
            headers={**origin, "Authorization": f"Bearer {CLIENT_KEY}"},
        )  # fmt: skip
        refused = await c.post("/v1/chat/completions", json=body, headers=origin)
    for r in (ok, refused):
        assert r.headers["access-control-allow-origin"] == PAGE_ORIGIN
        exposed = r.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed and "ratelimit-remaining" in exposed
    assert ok.status_code == 200 and refused.status_code == 401


async def test_another_origin_gets_no_cors_headers_and_no_setting_means_none() -> None:
    async with client(app()) as c:
        other = await c.options("/v1/chat/completions", headers={**PREFLIGHT,
                                "Origin": "http://evil.test"})  # fmt: skip
        plain = await c.get("/health", headers={"Origin": "http://evil.test"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in plain.headers
    async with client(app(cors_origins=())) as c:
        r = await c.get("/health", headers={"Origin": PAGE_ORIGIN})
    assert "access-control-allow-origin" not in r.headers


def test_a_cors_origin_with_a_path_stops_the_start() -> None:
    with pytest.raises(SettingsError, match="CORS_ORIGINS"):
        Settings.from_env(environ={"CORS_ORIGINS": "https://app.example.com/page"}, env_file=None)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE = """<!doctype html><html><body><script>
(async () => {
  const r = await fetch("SERVICE/v1/chat/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer KEY", "Content-Type": "application/json"},
    body: JSON.stringify({model: "echo", stream: true,
                          messages: [{role: "user", content: "hello from a page"}]}),
  });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let text = "", reads = 0;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    reads += 1;
    text += decoder.decode(value, {stream: true});
  }
  const result = {status: r.status, requestId: r.headers.get("x-request-id"),
                  remaining: r.headers.get("ratelimit-remaining"), reads, text};
  document.body.setAttribute("data-result", JSON.stringify(result));
})().catch((e) => document.body.setAttribute("data-result", JSON.stringify({error: String(e)})));
</script></body></html>"""


@pytest.fixture
def page_and_service(tmp_path: Path) -> Iterator[tuple[Process, Process]]:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    service = start_service(
        tmp_path, {"LLM_PROVIDER": "echo", "API_KEYS": CLIENT_KEY, "CORS_ORIGINS": origin}
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "page.html").write_text(PAGE.replace("SERVICE", service.url).replace("KEY", CLIENT_KEY))
    page = Process(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(site)],
        {}, tmp_path / "page.log", port,
    )  # fmt: skip
    page.wait_ready("/page.html")
    yield page, service
    page.stop()
    service.stop()


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_a_page_on_another_origin_streams_a_chat_completion_in_chromium(
    page_and_service: tuple[Process, Process], tmp_path: Path
) -> None:
    page, service = page_and_service
    assert CHROMIUM is not None
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--dump-dom", page.url + "/page.html"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    dom = done.stdout
    assert 'data-result="' in dom, done.stderr[-2000:]
    raw = dom.split('data-result="', 1)[1].split('"', 1)[0]
    result = json.loads(raw.replace("&quot;", '"').replace("&amp;", "&"))
    assert result.get("status") == 200, result
    assert result["requestId"] and result["remaining"] is not None
    chunks = [
        json.loads(line[6:]) for line in result["text"].splitlines() if line.startswith("data: {")
    ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "hello from a page"
    assert result["text"].rstrip().endswith("data: [DONE]")

    def preflights(log: list[dict[str, object]]) -> list[dict[str, object]]:
        return [x for x in log if x.get("event") == "access" and x.get("method") == "OPTIONS"]

    (preflight,) = preflights(service.json_lines(lambda log: bool(preflights(log))))
    assert preflight["status"] == 200 and preflight.get("key") is None
