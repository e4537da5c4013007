"""The OpenAPI document, and the Swagger UI page rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import openapi
from config import Settings
from server import create_app
from tests.conftest import Process, start_service

pytestmark = pytest.mark.anyio


def app() -> Starlette:
    return create_app(Settings(api_keys=("k",)))


def client(asgi: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t")


async def test_the_document_is_valid_openapi_31_and_covers_every_route() -> None:
    service = app()
    async with client(service) as c:
        r = await c.get("/openapi.json")  # public: no key
    assert r.status_code == 200
    doc = r.json()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {
        (re.sub(r":\w+}", "}", route.path), method)  # {model_id:path} is {model_id}
        for route in service.routes
        if isinstance(route, Route) and route.methods
        for method in route.methods - {"HEAD"}
        if route.path not in openapi.UNDOCUMENTED
    }
    assert served <= documented
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"])
    body = doc["components"]["schemas"]["CompleteBody"]
    assert body["additionalProperties"] is False
    assert body["properties"]["max_tokens"]["maximum"] == 4096


async def test_under_a_mount_the_document_names_the_prefix() -> None:
    parent = Starlette(routes=[Mount("/llm", app=app())])
    async with client(parent) as c:
        doc = (await c.get("/llm/openapi.json")).json()
        page = await c.get("/llm/docs")
        asset = await c.get("/llm/docs/swagger-ui.css")
    assert doc["servers"] == [{"url": "/llm"}]
    assert '<base href="/llm/">' in page.text
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/css")


async def test_without_the_docs_extra_the_page_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openapi, "swagger_static", lambda: None)
    async with client(app()) as c:
        page = await c.get("/docs")
        asset = await c.get("/docs/swagger-ui-bundle.js")
    assert page.status_code == 200 and "uv sync --extra docs" in page.text
    assert asset.status_code == 404 and asset.json()["error"]["type"] == "not_found"


async def test_the_page_loads_nothing_from_another_host() -> None:
    async with client(app()) as c:
        page = (await c.get("/docs")).text
    assert "http://" not in page and "https://" not in page and "//" not in page


@pytest.fixture
def docs_service(tmp_path: Path) -> Iterator[Process]:
    proc = start_service(tmp_path, {"API_KEYS": "k", "LLM_PROVIDER": "echo"})
    yield proc
    proc.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_swagger_ui_renders_the_operations_in_headless_chromium(
    docs_service: Process, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            # every host name but 127.0.0.1 fails to resolve: the page must need none
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            "--dump-dom",
            docs_service.url + "/docs",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    dom = done.stdout
    assert "swagger-ui" in dom, done.stderr[-2000:]
    for path in ("/complete", "/stream", "/v1/chat/completions", "/v1/models", "/usage"):
        assert f'data-path="{path}"' in dom

    def fetched_of(log: list[dict[str, Any]]) -> dict[str, int]:
        return {x["path"]: x["status"] for x in log if x.get("event") == "access"}

    pages = {"/docs", "/openapi.json", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"}
    fetched = fetched_of(docs_service.json_lines(lambda log: pages <= fetched_of(log).keys()))
    assert fetched["/docs"] == fetched["/openapi.json"] == 200
    assert fetched["/docs/swagger-ui-bundle.js"] == fetched["/docs/swagger-ui.css"] == 200
