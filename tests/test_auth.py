"""API keys: where they come from, how they are presented, what a stranger gets."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import auth
from auth import AUTH, AuthMiddleware, KeyRing, default_name, digest
from config import Rate, Settings, SettingsError
from errors import REQUEST_ID

KEYS_FILE = """
[[keys]]
name = "mobile-app"
key = "sha256:{hashed}"
rate_limit = "600/minute"
models = ["gpt-4o-mini"]

[[keys]]
name = "batch"
key = "plain-batch-key"
"""


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_keys_come_from_api_keys_and_the_file_and_the_file_wins(tmp_path: Path) -> None:
    hashed = hashlib.sha256(b"mobile-secret").hexdigest()
    path = keys_file(tmp_path, KEYS_FILE.format(hashed=hashed))
    ring = KeyRing.from_settings(
        Settings(api_keys=("env-key", "plain-batch-key"), api_keys_file=path)
    )
    assert len(ring) == 3
    mobile = ring.lookup("mobile-secret")
    assert mobile is not None and mobile.name == "mobile-app"
    assert mobile.rate_limit == Rate(600, 60) and mobile.models == ("gpt-4o-mini",)
    batch = ring.lookup("plain-batch-key")
    assert batch is not None and batch.name == "batch"  # the file's settings, not API_KEYS'
    env = ring.lookup("env-key")
    assert env is not None
    assert env.name == "key-" + hashlib.sha256(b"env-key").hexdigest()[:8]
    assert env.rate_limit is None and env.models is None
    assert ring.lookup("sha256:" + hashed) is None  # the digest is not itself a key
    assert ring.lookup("") is None and ring.lookup("nope") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[keys]]\nname = 'x'\n", "'key' is required"),
        ("[[keys]]\nkey = 'sha256:abc'\n", "64 hex digits"),
        ("[[keys]]\nkey = 'k'\nrate_limit = 'often'\n", "rate_limit"),
        ("[[keys]]\nkey = 'k'\nmodels = 'gpt-4o'\n", "models"),
        ("[[keys]]\nkey = 'k'\nlimit = 5\n", "keys[0]: an unknown field at line 3"),
        ("[[keys]]\nkey = 'k'\nmax_concurrent = 0\n", "max_concurrent"),
        ("[[keys]]\nkey = 'k'\nmax_concurrent = '8'\n", "max_concurrent"),
        ("[[keys]]\nkey = 'a'\nname = 'x'\n[[keys]]\nkey = 'b'\nname = 'x'\n", "unique"),
        ("keys = [", "cannot read"),
    ],
)
def test_a_bad_keys_file_is_a_named_setting_error(tmp_path: Path, text: str, message: str) -> None:
    settings = Settings(api_keys_file=keys_file(tmp_path, text))
    with pytest.raises(SettingsError, match="API_KEYS_FILE") as info:
        KeyRing.from_settings(settings)
    assert message in str(info.value)


async def whoami(request: Request) -> JSONResponse:
    key = request.scope.get(AUTH)
    return JSONResponse({"name": key.name if key else None})


def app_with_keys(*keys: str) -> Starlette:
    ring = KeyRing.from_settings(Settings(api_keys=keys))
    inner = Starlette(
        routes=[Route("/health", whoami), Route("/complete", whoami, methods=["POST"])]
    )
    guarded = AuthMiddleware(inner, keys=ring)

    async def with_request_id(scope, receive, send):  # type: ignore[no-untyped-def]
        scope[REQUEST_ID] = "rid-1"
        await guarded(scope, receive, send)

    return with_request_id  # type: ignore[return-value]


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "good"},
        {"Authorization": "Bearer good"},
        {"authorization": "bearer good"},
    ],
)
async def test_either_header_carries_the_key_and_the_identity_reaches_the_route(
    headers: dict[str, str],
) -> None:
    async with client(app_with_keys("good")) as c:
        r = await c.post("/complete", headers=headers)
    assert r.status_code == 200
    assert r.json() == {"name": default_name(digest("good"))}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "bad"},
        {"Authorization": "Bearer bad"},
        {"Authorization": "Basic good"},
        {"X-API-Key": ""},
    ],
)
async def test_missing_and_wrong_keys_get_the_same_401(headers: dict[str, str]) -> None:
    async with client(app_with_keys("good")) as c:
        r = await c.post("/complete", headers=headers)
        unknown_path = await c.get("/does-not-exist", headers=headers)
    assert r.status_code == 401 and unknown_path.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert body == {
        "error": {
            "type": "invalid_api_key",
            "message": "a valid API key is required (X-API-Key or Authorization: Bearer)",
            "request_id": "rid-1",
        }
    }
    assert unknown_path.json() == body
    assert "bad" not in r.text


@pytest.mark.anyio
async def test_no_configured_key_means_every_protected_route_is_401() -> None:
    async with client(app_with_keys()) as c:
        assert (await c.post("/complete", headers={"X-API-Key": ""})).status_code == 401
        assert (await c.get("/health")).status_code == 200


@pytest.mark.anyio
async def test_public_paths_pass_without_a_key_also_under_a_mount_prefix() -> None:
    parent = Starlette(routes=[Mount("/llm", app=app_with_keys("good"))])
    async with client(parent) as c:
        assert (await c.get("/llm/health")).json() == {"name": None}
        assert (await c.post("/llm/complete")).status_code == 401
        assert (await c.post("/llm/complete", headers={"X-API-Key": "good"})).status_code == 200


@pytest.mark.anyio
async def test_a_keys_file_is_read_off_the_request_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "old"\nkey = "old-key-0123456789"\n')
    now = [0.0]
    ring = KeyRing.from_settings(Settings(api_keys_file=path), clock=lambda: now[0])
    reading, release = threading.Event(), threading.Event()
    real = auth._load

    def slow(settings: Settings) -> Any:  # a file of many keys: slow to read
        reading.set()
        assert release.wait(10)
        return real(settings)

    monkeypatch.setattr(auth, "_load", slow)
    path.write_text('[[keys]]\nname = "new"\nkey = "new-key-0123456789"\n')
    for _ in range(2):  # two looks that find the file the same: then it is read
        now[0] += auth.KEYS_CHECK_S + 1
        assert ring.lookup("old-key-0123456789") is not None
    assert await asyncio.to_thread(reading.wait, 10)  # being read, in a thread...
    assert ring.lookup("old-key-0123456789") is not None  # ...while lookups go on
    release.set()
    for _ in range(200):
        if ring.lookup("new-key-0123456789") is not None:
            break
        await asyncio.sleep(0.01)
    assert ring.lookup("new-key-0123456789") is not None
    assert ring.lookup("old-key-0123456789") is None
