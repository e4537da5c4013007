"""Traces (the otel extra): a GenAI span per call, checked with the SDK's in-memory
exporter in process, and over OTLP/HTTP from a real service process to a collector
started here; without the extra's setting, nothing of OpenTelemetry is imported."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import AUTH_HEADERS, CLIENT_KEY, ROOT, free_port, start_service
from tests.helpers import client, openai_answer, openai_app

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Recorded:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.upstream: list[httpx.Request] = []

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.upstream.append(request)
        if request.url.path.endswith("/embeddings"):
            return httpx.Response(
                200,
                json={"object": "list", "model": "text-embedding-3-small",
                      "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                      "usage": {"prompt_tokens": 2, "total_tokens": 2}},
            )  # fmt: skip
        if b"fail-please" in request.content:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        return openai_answer(request)


def traced_client(recorded: Recorded, **changes: object) -> httpx.AsyncClient:
    models = ("gpt-4o-mini", "text-embedding-3-small")
    app = openai_app(recorded.handler, tracer_provider=recorded.provider, models=models, **changes)
    return client(app)


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    yield Recorded()


async def test_a_call_is_a_genai_span_in_the_callers_trace_and_the_providers_parent(
    recorded: Recorded,
) -> None:
    async with traced_client(recorded) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "max_tokens": 50, "temperature": 0.5,
                  "messages": [{"role": "user", "content": "a secret prompt"}]},
            headers={"traceparent": TRACEPARENT},
        )  # fmt: skip
        assert r.status_code == 200
        assert (await c.get("/health")).status_code == 200  # not a call: no span
    (span,) = recorded.spans()
    assert span.name == "chat gpt-4o-mini" and span.kind is SpanKind.CLIENT
    assert span.context is not None and span.parent is not None
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.request.max_tokens"] == 50
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["text_tool.deployment"] == "openai"
    assert attributes["http.response.status_code"] == 200
    assert span.status.status_code is StatusCode.UNSET
    # No prompt or completion text unless asked for.
    assert "a secret prompt" not in json.dumps(attributes)
    # The provider's request carries our span as its parent, in the caller's trace.
    sent = recorded.upstream[0].headers["traceparent"]
    assert sent == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"


async def test_a_stream_span_has_the_time_to_its_first_token(recorded: Recorded) -> None:
    async with traced_client(recorded) as c:
        r = await c.post("/stream", json={"prompt": "hi"})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    (span,) = recorded.spans()
    attributes = dict(span.attributes or {})
    assert isinstance(attributes["gen_ai.response.time_to_first_chunk"], float)
    usage = json.loads(r.text.split("event: usage\ndata: ")[1].split("\n")[0])
    assert attributes["gen_ai.usage.output_tokens"] == usage["output_tokens"]
    # Without a caller's trace, the span starts one of its own.
    assert span.parent is None
    assert recorded.upstream[0].headers["traceparent"].split("-")[1] == format(
        span.context.trace_id if span.context else 0, "032x"
    )


async def test_content_is_recorded_only_when_the_setting_asks(recorded: Recorded) -> None:
    async with traced_client(recorded, otel_capture_content=True) as c:
        whole_answer = await c.post("/complete", json={"prompt": "tell me", "system": "be brief"})
        await c.post("/stream", json={"prompt": "and stream it"})
    whole, streamed = recorded.spans()
    attributes = dict(whole.attributes or {})
    assert json.loads(str(attributes["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": "tell me"}]}
    ]
    assert json.loads(str(attributes["gen_ai.system_instructions"])) == [
        {"type": "text", "content": "be brief"}
    ]
    output = json.loads(str(attributes["gen_ai.output.messages"]))
    assert output[0]["parts"][0]["content"] == whole_answer.json()["text"]
    streamed_output = json.loads(str(dict(streamed.attributes or {})["gen_ai.output.messages"]))
    assert streamed_output[0]["parts"][0]["content"] == 'Line one\nline "two"\n\nend'


async def test_a_failed_call_is_an_error_span(recorded: Recorded) -> None:
    async with traced_client(recorded) as c:
        r = await c.post("/complete", json={"prompt": "fail-please"})
    assert r.status_code == 502
    (span,) = recorded.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "upstream_error"


async def test_embeddings_are_an_embeddings_span(recorded: Recorded) -> None:
    async with traced_client(recorded) as c:
        r = await c.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert r.status_code == 200
    (span,) = recorded.spans()
    attributes = dict(span.attributes or {})
    assert span.name == "embeddings text-embedding-3-small"
    assert attributes["gen_ai.operation.name"] == "embeddings"
    assert attributes["gen_ai.usage.input_tokens"] == 2


@pytest.mark.e2e
def test_without_the_setting_nothing_of_opentelemetry_is_imported() -> None:
    code = """
import sys, anyio, httpx
from config import Settings
from server import create_app
app = create_app(Settings(api_keys=("k",)))
async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/complete", json={"prompt": "hi"}, headers={"X-API-Key": "k"})
        assert r.status_code == 200
anyio.run(main)
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


class Collector:
    """An OTLP/HTTP endpoint on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.authorization: list[str | None] = []
        bodies, authorization = self.bodies, self.authorization

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server calls
                size = int(self.headers.get("content-length", "0"))
                if self.path == "/v1/traces":
                    bodies.append(self.rfile.read(size))
                    authorization.append(self.headers.get("authorization"))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found: list[Any] = []
        for body in self.bodies:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    found.extend((resource.resource, span) for span in scope.spans)
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.e2e
async def test_a_real_process_exports_its_spans_over_otlp(tmp_path: Path) -> None:
    collector = Collector()
    # The collector's key in the service's .env, which OpenTelemetry itself never reads.
    (tmp_path / ".env").write_text(
        "OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20collector-token\n"
    )
    service = start_service(
        tmp_path,
        {"API_KEYS": CLIENT_KEY, "LLM_PROVIDER": "echo",
         "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
         "OTEL_SERVICE_NAME": "text-tool-test", "OTEL_BSP_SCHEDULE_DELAY": "50"},
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10, headers=AUTH_HEADERS) as c:
            r = await c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "one two three"}]},
                headers={"traceparent": TRACEPARENT},
            )
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while not collector.spans():
            assert time.monotonic() < deadline, "no span reached the collector"
            await asyncio.sleep(0.05)
    finally:
        service.stop()
        collector.stop()
    ((resource, span),) = collector.spans()
    attributes = {a.key: a.value for a in span.attributes}
    assert span.name == "chat echo"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
    assert attributes["gen_ai.usage.input_tokens"].int_value == 3
    assert attributes["gen_ai.provider.name"].string_value == "echo"
    assert collector.authorization == ["Bearer collector-token"]
    names = {a.key: a.value.string_value for a in resource.attributes}
    assert names["service.name"] == "text-tool-test"


async def test_the_app_shuts_down_a_tracer_provider_it_made_and_never_the_hosts(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracing

    class Made(TracerProvider):
        closed = False

        def shutdown(self) -> None:
            Made.closed = True
            super().shutdown()

    monkeypatch.setattr(tracing, "tracer_provider", lambda settings: Made())
    own = openai_app(recorded.handler, otel_endpoint="http://127.0.0.1:9")  # made its own
    hosted = openai_app(recorded.handler, tracer_provider=recorded.provider)
    for app in (own, hosted):
        async with app.router.lifespan_context(app):
            pass
    assert Made.closed
    # The host's provider still records after the mounted app's shutdown.
    with recorded.provider.get_tracer("host").start_as_current_span("after"):
        pass
    assert [span.name for span in recorded.spans()] == ["after"]
