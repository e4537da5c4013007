"""Fixtures that start real processes on 127.0.0.1: the mock provider and the service.

Every wait is bounded; every process is stopped at the end of its fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# A key shaped like a real one, so that a leak of it would be noticed by a search.
PROVIDER_KEY = "sk-test-" + "S3CR3T" * 6
CLIENT_KEY = "client-" + "k3y" * 8
AUTH_HEADERS = {"X-API-Key": CLIENT_KEY}

# An app made in the tests' own process from the environment keeps no ledger (its default
# is a file in the working directory, here the checkout); the services the tests start
# run in a directory of their own and keep theirs there, as by default (start_service).
os.environ.setdefault("LEDGER_URL", "off")
# The services the tests start shut down at once on SIGTERM (the drain has its own test).
os.environ.setdefault("SHUTDOWN_DRAIN_S", "0")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A child process serving HTTP on 127.0.0.1, its stderr kept in a file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, port: int, cwd: Path = ROOT
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def wait_ready(self, path: str, timeout_s: float = 15.0) -> None:
        try:
            self._wait_ready(path, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url}{path} did not answer in {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def json_lines(
        self, until: Callable[[list[dict[str, Any]]], bool] = lambda _: True, timeout_s: float = 5
    ) -> list[dict[str, Any]]:
        """The JSON log lines so far, once `until` holds of them (or `timeout_s` passed):
        a request's access line is written just after its last byte went out, so a
        client holding the answer can be a moment ahead of the log."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [json.loads(x) for x in self.output().splitlines() if x.startswith("{")]
            if until(lines) or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def access_lines(self, *request_ids: str) -> dict[str, dict[str, Any]]:
        """The access lines by request id, once those of `request_ids` are all written."""

        def access(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
            return {x["request_id"]: x for x in lines if x.get("event") == "access"}

        return access(self.json_lines(lambda lines: set(request_ids) <= access(lines).keys()))

    def stop(self) -> None:
        """SIGTERM, as an orchestrator would; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log_file.close()


def start_mock(tmp_path: Path, *extra: str, port: int | None = None) -> Process:
    port = port or free_port()
    proc = Process(
        [sys.executable, str(ROOT / "bench" / "mock_provider.py"), "--port", str(port), *extra],
        dict(os.environ),
        tmp_path / f"mock-{port}-{time.monotonic_ns()}.log",
        port,
    )
    proc.wait_ready("/_stats")
    return proc


def start_service(tmp_path: Path, env: dict[str, str]) -> Process:
    port = free_port()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "LLM_", "LEDGER_"))
    }
    proc = Process(
        # The one way to start it, as the README and the image do (server.main).
        [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", str(port)],
        # run outside the repo so that a developer's .env cannot change the test; streams
        # get 3 s at SIGTERM (uvicorn 8 s), well within Process.stop's 10 s
        {**clean, "PYTHONPATH": str(ROOT), "SHUTDOWN_GRACE_S": "3", **env},
        tmp_path / f"service-{port}.log",
        port,
        cwd=tmp_path,
    )
    proc.wait_ready("/health")
    return proc


def openai_env(mock: Process, **extra: str) -> dict[str, str]:
    """The service's settings for the OpenAI protocol, pointed at the mock."""
    return {
        "API_KEYS": CLIENT_KEY,
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": PROVIDER_KEY,
        "OPENAI_BASE_URL": mock.url + "/v1",
        **extra,
    }


@pytest.fixture
def mock_provider(tmp_path: Path) -> Iterator[Process]:
    proc = start_mock(tmp_path)
    yield proc
    proc.stop()


@pytest.fixture
def openai_service(tmp_path: Path, mock_provider: Process) -> Iterator[Process]:
    """The service in front of the mock, speaking the OpenAI protocol."""
    proc = start_service(
        tmp_path,
        openai_env(mock_provider, LLM_MODEL="gpt-4o-mini", SSE_PING_INTERVAL_S="0.3"),
    )
    yield proc
    proc.stop()


@pytest.fixture
def anthropic_service(tmp_path: Path, mock_provider: Process) -> Iterator[Process]:
    proc = start_service(
        tmp_path,
        {
            "API_KEYS": CLIENT_KEY,
            "LLM_PROVIDER": "anthropic",
            "ANTHROPIC_API_KEY": PROVIDER_KEY,
            "ANTHROPIC_BASE_URL": mock_provider.url,
            "LLM_MODEL": "claude-haiku-4-5",
        },
    )
    yield proc
    proc.stop()
