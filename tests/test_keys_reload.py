"""Keys without restarts, on a real process: the keys file is read again on SIGHUP and
when it changes. A new key works, a removed one is refused from its next request while
its open stream finishes, a changed limit applies at once, an unchanged key keeps its
counts, and a file that no longer reads keeps the previous keys with one line logged.
/ready and /metrics say when the keys were loaded."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Process, openai_env, start_service
from tests.helpers import directive, events, stats

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

KEYS = {
    "alice": ("alice-key-0123456789", "100/minute"),
    "bob": ("bob-key-0123456789ab", "3/minute"),
    "carol": ("carol-key-0123456789", "100/minute"),
    "dave": ("dave-key-0123456789a", "100/minute"),
}


def keys_file(path: Path, **limits: str) -> None:
    """The keys file with these keys (by name), each at its limit."""
    path.write_text(
        "".join(
            f'[[keys]]\nname = "{name}"\nkey = "{KEYS[name][0]}"\nrate_limit = "{limit}"\n\n'
            for name, limit in limits.items()
        )
    )


@pytest.fixture
def keyed(tmp_path: Path, mock_provider: Process) -> Iterator[tuple[Process, Path]]:
    path = tmp_path / "keys.toml"
    keys_file(path, alice="100/minute", bob="3/minute", carol="100/minute")
    env = openai_env(mock_provider, API_KEYS_FILE=str(path))
    del env["API_KEYS"]
    service = start_service(tmp_path, env)
    yield service, path
    service.stop()


async def call(service: Process, name: str, prompt: str = "hi") -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as c:
        return await c.post(
            service.url + "/complete", json={"prompt": prompt},
            headers={"X-API-Key": KEYS[name][0]},
        )  # fmt: skip


async def loaded_at(service: Process) -> str:
    async with httpx.AsyncClient(timeout=5) as c:
        return str((await c.get(service.url + "/ready")).json()["keys_loaded_at"])


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.1)


async def test_sighup_reloads_the_keys_and_open_streams_finish(
    keyed: tuple[Process, Path], mock_provider: Process
) -> None:
    service, path = keyed
    assert (await call(service, "bob")).status_code == 200  # bob: 1 of 3
    async with httpx.AsyncClient(timeout=30) as c:
        stream = asyncio.ensure_future(c.post(
            service.url + "/stream", json={"prompt": directive(tokens=20, token_delay_ms=50)},
            headers={"X-API-Key": KEYS["alice"][0]},
        ))  # fmt: skip
        deadline = time.monotonic() + 5
        while (await stats(mock_provider))["open"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        before = await loaded_at(service)
        await asyncio.sleep(1.1)  # loaded_at is in whole seconds
        # alice removed, bob unchanged, carol down to 1/minute, dave new
        keys_file(path, bob="3/minute", carol="1/minute", dave="100/minute")
        service.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return await loaded_at(service) != before

        await until(reloaded)
        assert (await call(service, "alice")).status_code == 401
        assert (await call(service, "dave")).status_code == 200
        assert (await call(service, "carol")).status_code == 200
        assert (await call(service, "carol")).status_code == 429  # the new limit, at once
        assert [(await call(service, "bob")).status_code for _ in range(3)] == [200, 200, 429]
        r = await stream
    assert r.status_code == 200 and events(r.text)[-1] == ("message", "[DONE]")
    assert sum(1 for kind, _ in events(r.text) if kind == "message") == 21  # all 20, [DONE]
    async with httpx.AsyncClient(timeout=5) as c:
        metrics = (await c.get(service.url + "/metrics")).text
    assert "text_tool_keys_loaded_timestamp_seconds" in metrics
    line = next(x for x in service.json_lines() if x.get("event") == "keys_reloaded")
    assert line["removed"] == ["alice"] and line["added"] == ["dave"]


async def test_a_changed_file_is_read_without_a_signal_and_a_broken_one_is_not(
    keyed: tuple[Process, Path],
) -> None:
    service, path = keyed
    keys_file(path, alice="100/minute", dave="100/minute")

    async def dave_works() -> bool:
        return (await call(service, "dave")).status_code == 200

    await until(dave_works)  # the file is looked at every 2 s
    path.write_text("[[keys]\nthis is not TOML")

    async def failure_logged() -> bool:
        await call(service, "dave")  # the file is looked at on a request's way in
        return any(x.get("event") == "keys_reload_failed" for x in service.json_lines())

    await until(failure_logged)
    assert (await call(service, "dave")).status_code == 200  # the previous keys stay
    assert (await call(service, "alice")).status_code == 200
    for _ in range(3):  # more checks of the same broken file: no more lines
        await asyncio.sleep(1)
        await call(service, "alice")
    failures = [x for x in service.json_lines() if x.get("event") == "keys_reload_failed"]
    assert len(failures) == 1 and "API_KEYS_FILE" in str(failures[0]["error"])
    async with httpx.AsyncClient(timeout=5) as c:
        assert "keys_reload_failed" in (await c.get(service.url + "/ready")).json()
    path.write_bytes(b'[[keys]]\nname = "\xff\xfe"\n')  # not UTF-8: no 500 either

    async def two_failures() -> bool:
        assert (await call(service, "dave")).status_code == 200
        failed = [x for x in service.json_lines() if x.get("event") == "keys_reload_failed"]
        return len(failed) == 2

    await until(two_failures)
    keys_file(path, alice="100/minute")

    async def recovered() -> bool:
        return (await call(service, "dave")).status_code == 401

    await until(recovered)
    async with httpx.AsyncClient(timeout=5) as c:
        assert "keys_reload_failed" not in (await c.get(service.url + "/ready")).json()
