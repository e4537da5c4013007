"""In front of a real compatible server, not only the reference APIs: llama.cpp's own
llama-server, with a tiny model the tests write (tests/tiny_model.py), through its
OpenAI-compatible endpoints (translated and passed through) and its Anthropic-compatible
/v1/messages (passed through). Its answers are fixed gibberish; what is checked is the
wire: status, shapes, event sequences, usage counted from what the server reports.

The server is built once by `scripts/build-llama-server` (about ten minutes on 2 cores,
so not in every CI run); without it these tests are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH_HEADERS, ROOT, Process, free_port, start_service
from tests.tiny_model import write

BINARY = Path(os.environ.get("LLAMA_SERVER", ROOT / ".cache/llama-server/bin/llama-server"))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not BINARY.exists(), reason="no llama-server: scripts/build-llama-server"),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    tmp = tmp_path_factory.mktemp("llama")
    model = write(tmp / "tiny.gguf")
    port = free_port()
    args = [str(BINARY), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--jinja", "-c", "2048", "--alias", "tiny", "-t", "1"]  # fmt: skip
    server = Process(args, dict(os.environ), tmp / "llama.log", port)
    server.wait_ready("/health", timeout_s=30)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def services(llama: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("services")
    common = {"API_KEYS": AUTH_HEADERS["X-API-Key"], "LLM_MODEL": "tiny", "LLM_MODELS": "tiny"}
    to_openai = {"LLM_PROVIDER": "openai", "OPENAI_BASE_URL": llama.url + "/v1"}
    to_anthropic = {"LLM_PROVIDER": "anthropic", "ANTHROPIC_API_KEY": "unused",
                    "ANTHROPIC_BASE_URL": llama.url}  # fmt: skip
    openai = start_service(tmp, {**common, **to_openai})
    anthropic = start_service(tmp, {**common, **to_anthropic})
    yield {"openai": openai.url, "anthropic": anthropic.url}
    openai.stop()
    anthropic.stop()


def events(text: str) -> list[tuple[str, dict[str, object]]]:
    out, name = [], ""
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: {"):
            out.append((name, json.loads(line[6:])))
    return out


CHAT = {"model": "tiny", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip


def test_chat_completions_whole_and_streamed_with_the_servers_usage(
    services: dict[str, str],
) -> None:
    url = services["openai"] + "/v1/chat/completions"
    whole = httpx.post(url, json=CHAT, headers=AUTH_HEADERS, timeout=30)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 8 and answer["usage"]["prompt_tokens"] > 0
    streamed = httpx.post(url, json={**CHAT, "stream": True, "stream_options": {
        "include_usage": True}}, headers=AUTH_HEADERS, timeout=30)  # fmt: skip
    chunks = [data for _, data in events(streamed.text)]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert chunks[-1]["usage"]["completion_tokens"] == 8  # type: ignore[index]


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_messages_whole_and_streamed_passed_through_or_translated(
    services: dict[str, str], kind: str
) -> None:
    url = services[kind] + "/v1/messages"
    whole = httpx.post(url, json=CHAT, headers=AUTH_HEADERS, timeout=30)
    assert whole.status_code == 200, whole.text
    assert whole.json()["type"] == "message" and whole.json()["stop_reason"] == "max_tokens"
    assert whole.json()["usage"]["output_tokens"] == 8
    streamed = httpx.post(url, json={**CHAT, "stream": True}, headers=AUTH_HEADERS, timeout=30)
    names = [name for name, _ in events(streamed.text) if name != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in names


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
        "n": {"type": "integer"}}, "required": ["city", "n"]}  # fmt: skip


@pytest.mark.parametrize("client", ["messages", "chat"])
def test_structured_output_is_json_of_the_schema_through_either_protocol(
    services: dict[str, str], client: str
) -> None:
    """Chat Completions' response_format (passed through to the OpenAI-compatible
    endpoint, or Messages' output_config.format translated to it) is held by the
    server's grammar: the gibberish is valid JSON of the schema."""
    url = services["openai"]
    asks = {
        "chat": ("/v1/chat/completions", {**CHAT, "max_tokens": 400, "response_format": {
            "type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}}),
        "messages": ("/v1/messages", {**CHAT, "max_tokens": 400, "output_config": {
            "format": {"type": "json_schema", "schema": CITY}}}),
    }  # fmt: skip
    path, body = asks[client]
    r = httpx.post(url + path, json=body, headers=AUTH_HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    text = (answer["choices"][0]["message"]["content"] if client == "chat"
            else answer["content"][0]["text"])  # fmt: skip
    value = json.loads(text)
    # (its string's length is the grammar's in bytes: random bytes decode as they may)
    assert set(value) == {"city", "n"} and isinstance(value["city"], str)
    assert isinstance(value["n"], int)


def test_a_sampled_stream_starts_with_message_start_even_when_the_server_leaves_it_out(
    services: dict[str, str],
) -> None:
    """llama-server leaves message_start out of about one sampled /v1/messages stream in
    five (seen with this model): passed through, each stream still starts with one."""
    url = services["anthropic"] + "/v1/messages"
    for _ in range(20):
        streamed = httpx.post(url, json={**CHAT, "temperature": 1.0, "stream": True},
                              headers=AUTH_HEADERS, timeout=30)  # fmt: skip
        names = [name for name, _ in events(streamed.text) if name != "ping"]
        assert names[0] == "message_start" and names[-1] == "message_stop"
