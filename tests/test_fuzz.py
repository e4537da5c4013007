"""Schemathesis against /openapi.json of the running service, bounded in examples and
time: no 500, every response (SSE events included) matches the document."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROVIDER_KEY, ROOT, start_mock, start_service

# Schemathesis is allowed 240 s (in fuzz), longer than the 120 s of pyproject's timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

KEY = "fuzz-key-" + "f" * 20
SEED = os.environ.get("TEXT_TOOL_FUZZ_SEED", "20261128")


def fuzz(url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
            "run", url + "/openapi.json",
            "--checks", "all",
            "--header", f"X-API-Key: {KEY}",
            "--max-examples", "40",
            "--seed", SEED,
            "--request-timeout", "10",
            "--report-dir", str(tmp_path / "report"),
        ],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize("provider", ["echo", "openai"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    provider: str, tmp_path: Path
) -> None:
    env = {"API_KEYS": KEY, "RATE_LIMIT": "1000000/hour", "LLM_PROVIDER": provider}
    mock = None
    if provider == "openai":
        mock = start_mock(tmp_path)
        env |= {"OPENAI_API_KEY": PROVIDER_KEY, "OPENAI_BASE_URL": mock.url + "/v1"}
    service = start_service(tmp_path, env)
    try:
        done = fuzz(service.url, tmp_path)
    finally:
        service.stop()
        if mock is not None:
            mock.stop()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Traceback" not in service.output()
    assert PROVIDER_KEY not in service.output()
