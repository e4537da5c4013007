"""The README's set-up, run command and curl examples work verbatim (only the port and the
virtualenv's place differ)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Process, free_port

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def sh_lines(prefix: str) -> list[str]:
    return [
        line
        for lang, body in BLOCKS
        if lang == "sh"
        for line in body.splitlines()
        if prefix in line
    ]


def quick_start() -> list[str]:
    """The shell lines of the quick start, in order: set-up, run, tests."""
    section = README.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return [
        line
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
        if lang == "sh"
        for line in body.splitlines()
    ]


def test_readme_quick_start_is_set_up_run_test() -> None:
    get_uv, sync, run, test = quick_start()
    # uv in a virtualenv of its own: nothing pip-installed into the current Python
    assert get_uv.startswith("python3 -m venv ") and "pip install uv" in get_uv
    assert not re.search(r"(^|&& )(python3? -m )?pip install", get_uv)
    assert sync == "uv sync --locked --no-dev"  # the service's packages only, as locked
    assert run == "API_KEYS=dev-key uv run --no-dev python server.py --port 8000"
    assert test == "uv run pytest"  # uv run adds the dev group


def test_readme_starts_the_service_one_way() -> None:
    """Every command in the README that starts the service goes through server.main: no
    bare uvicorn (no bounded heads, a second access log, uvicorn's short shutdown)."""
    lines = [line for lang, body in BLOCKS if lang == "sh" for line in body.splitlines()]
    assert not [x for x in lines if re.search(r"(^|[\s;&|])(python3? -m )?uvicorn\s", x)]
    starts = [
        x
        for x in lines
        if not x.startswith("docker ")  # `-t text-tool`: the image's name
        and ("server.py" in x or re.search(r"(^|\s)(\S*/)?text-tool\s", x))
    ]
    assert len(starts) == 3  # the quick start, Redis with workers, Ollama
    for line in starts:
        assert "API_KEYS=" in line and "uv run --no-dev" in line, line
        assert "python server.py" in line and "--host" not in line, line  # 127.0.0.1
    assert "uvicorn server:app" not in README
    (cmd,) = re.findall(r"^CMD (.*)$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert json.loads(cmd)[:2] == ["python", "server.py"]


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment after the quick start's set-up: its `uv sync` line run as written,
    into a virtualenv of its own (not the tests' .venv), so the service is run with only
    the packages the README installs."""
    _, sync, _, _ = quick_start()
    venv = tmp_path_factory.mktemp("readme") / "venv"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "LLM_", "LEDGER_")) and k != "VIRTUAL_ENV"
    }
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    done = subprocess.run(
        ["bash", "-c", sync], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (venv / "bin" / "text-tool").exists()  # the console script, with the project
    assert not (venv / "bin" / "pytest").exists()  # and none of the tests' packages
    return env


@pytest.fixture
def readme_service(tmp_path: Path, readme_env: dict[str, str]) -> Iterator[Process]:
    (run,) = sh_lines("python server.py --port 8000")
    port = free_port()
    proc = Process(
        [
            "bash",
            "-c",
            # exec: so that stopping the shell stops uv, which passes the signal to uvicorn
            run.replace("--port 8000", f"--port {port}").replace("uv run", "exec uv run"),
        ],
        # run from the checkout (uv finds the project there); its ledger in the test's
        # directory rather than the default text-tool.db of the working directory
        {**readme_env, "LEDGER_URL": str(tmp_path / "text-tool.db")},
        tmp_path / "readme-service.log",
        port,
    )
    proc.wait_ready("/health", timeout_s=60)
    yield proc
    proc.stop()


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_work_verbatim(readme_service: Process) -> None:
    curls = sh_lines("curl ")
    assert len(curls) == 4  # /complete, /stream, /v1/chat/completions, then /usage of them
    outputs = []
    for line in curls:
        command = line.replace("127.0.0.1:8000", f"127.0.0.1:{readme_service.port}")
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)

    shown = [body for lang, body in BLOCKS if lang == "json"][0]
    expected = json.loads(shown.replace("cmpl-…", "x"))
    got = json.loads(outputs[0])
    assert {k: v for k, v in got.items() if k != "id"} == {
        k: v for k, v in expected.items() if k != "id"
    }

    shown_stream = [body for lang, body in BLOCKS if lang == "" and "data: [DONE]" in body][0]
    assert _without_ids(outputs[1]) == _without_ids(shown_stream)

    chat = json.loads(outputs[2])
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == "Hello there"

    (shown_usage,) = [body for lang, body in BLOCKS if lang == "json" and '"group_by"' in body]
    expected_usage, got_usage = json.loads(shown_usage), json.loads(outputs[3])
    assert {**got_usage, "to": "now"} == {**expected_usage, "to": "now"}


@pytest.mark.e2e
def test_readme_sdk_example_runs(readme_service: Process) -> None:
    (example,) = [body for lang, body in BLOCKS if lang == "python" and "chat.completions" in body]
    code = example.replace("127.0.0.1:8000", f"127.0.0.1:{readme_service.port}")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello there CompletionUsage(")
    assert done.stdout.rstrip().endswith("Hello there")


def _without_ids(text: str) -> str:
    return re.sub(r'"id":"[^"]*"', '"id":"x"', text).strip()


def test_readme_keys_file_example_loads(tmp_path: Path) -> None:
    from auth import KeyRing
    from config import Rate, Settings

    example, team = [body for lang, body in BLOCKS if lang == "toml" and "[[keys]]" in body]
    path = tmp_path / "keys.toml"
    path.write_text(example)
    ring = KeyRing.from_settings(Settings(api_keys_file=path))
    mobile = ring.lookup("test")  # the example's digest is of "test"
    assert mobile is not None and mobile.rate_limit == Rate(600, 60)
    assert mobile.max_concurrent == 8
    assert ring.lookup("a-plain-key-works-too") is not None
    path.write_text(team)  # the team's: digests of "support-bot-key" and "batch-eval-key"
    ring = KeyRing.from_settings(Settings(api_keys_file=path))
    batch = ring.lookup("batch-eval-key")
    assert batch is not None and (batch.name, batch.max_concurrent) == ("batch-eval", 2)
    assert ring.lookup("support-bot-key") is not None


def test_readme_deployments_file_example_loads(tmp_path: Path) -> None:
    from config import Settings

    (example,) = [body for lang, body in BLOCKS if lang == "toml" and "[[deployments]]" in body]
    path = tmp_path / "deployments.toml"
    path.write_text(example)
    settings = Settings.from_env(
        environ={"LLM_DEPLOYMENTS": str(path), "OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "a",
                 "OPENROUTER_API_KEY": "sk-or"},
        env_file=None,
    )  # fmt: skip
    names = [d.name for d in settings.deployments]
    assert names == ["vllm-a", "vllm-b", "openai", "spare", "openrouter"]
    assert settings.models == (
        "llama-3.1-8b", "gpt-4o-mini", "text-embedding-3-small", "openai/gpt-4o-mini"
    )  # fmt: skip
    assert settings.deployments[2].api_key == "sk-o"
    assert settings.deployments[4].allow_fields == {"provider"}


@pytest.mark.e2e
def test_readme_anthropic_example_runs(readme_service: Process) -> None:
    (example,) = [body for lang, body in BLOCKS if lang == "python" and "Anthropic(" in body]
    code = example.replace("127.0.0.1:8000", f"127.0.0.1:{readme_service.port}")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["Hello there 2", "Hello there"]
    assert lines[2].startswith("MessageTokensCount(") and "input_tokens=1" in lines[2]


@pytest.mark.e2e
def test_readme_responses_and_embeddings_example_runs(readme_service: Process) -> None:
    (example,) = [body for lang, body in BLOCKS if lang == "python" and "responses." in body]
    code = example.replace("127.0.0.1:8000", f"127.0.0.1:{readme_service.port}")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Hello there 4", "Hello there", "2 256"]


@pytest.mark.e2e
def test_readme_text_tool_command(readme_env: dict[str, str]) -> None:
    """The console script `uv sync` installs is server.main, with the options the README
    names; a bad setting is one line naming it and exit status 2, before uvicorn starts."""
    text_tool = str(Path(readme_env["UV_PROJECT_ENVIRONMENT"]) / "bin" / "text-tool")
    (shown,) = [x for x in README.split("\n\n") if "go on to uvicorn" in x]
    options = re.findall(r"`(--[a-z-]+)`", shown.split("go on to uvicorn")[0])
    assert len(options) == 9
    done = subprocess.run(
        [text_tool, "--help"], env=readme_env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: text-tool ")
    assert [x for x in options if x not in done.stdout] == []
    done = subprocess.run(
        [text_tool, "--port", "1"],
        env={**readme_env, "LLM_PROVIDER": "nope"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("text-tool: bad setting: LLM_PROVIDER")
    assert len(done.stderr.splitlines()) == 1
