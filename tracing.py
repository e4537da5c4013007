"""Traces: each provider call a span, following OpenTelemetry's semantic conventions for
generative AI, when the `otel` extra is installed and OTEL_EXPORTER_OTLP_ENDPOINT is set.
Without them server.py never imports this module, and nothing of OpenTelemetry is loaded.

The span is the gateway's call of a model (kind CLIENT, named `{operation} {model}`):
a child of the caller's `traceparent` when it sends one, and the parent of the
provider's own, whose request carries the span's `traceparent` (llm.TRACE_HEADERS).
What it says is read, once the answer has been sent, from what the stages noted of
the call for the access line (requestlog.CALL): the models, the token counts, the
finish reason, the time to the first token, the deployment, the error. Prompt and
completion text only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import chat
import llm
from auth import AUTH
from config import Settings
from errors import relative_path
from requestlog import CALL


def tracer_provider(settings: Settings) -> TracerProvider:
    """Spans exported over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, in batches. Not
    made the process's global provider: an app that mounts this one keeps its own."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service}))
    endpoint = settings.otel_endpoint.rstrip("/") + "/v1/traces"  # as the spec builds it
    exporter = OTLPSpanExporter(endpoint=endpoint, headers=dict(settings.otel_headers) or None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class TracingMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        provider: trace.TracerProvider,
        operations: Mapping[str, str],
        capture_content: bool = False,
    ) -> None:
        """`operations`: the paths that call a model, each with its GenAI operation."""
        self.app = app
        self.tracer = provider.get_tracer("text-tool")
        self.capture_content = capture_content
        self.operations = operations
        self.propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = self.operations.get(relative_path(scope)) if scope["type"] == "http" else None
        if operation is None:
            await self.app(scope, receive, send)
            return
        carrier = {bytes(k).decode("latin-1"): bytes(v).decode("latin-1")
                   for k, v in scope["headers"]}  # fmt: skip
        parent = self.propagator.extract(carrier)
        span = self.tracer.start_span(
            operation, context=parent, kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": operation},
        )  # fmt: skip
        current = trace.set_span_in_context(span, parent)
        outgoing: dict[str, str] = {}
        self.propagator.inject(outgoing, context=current)
        attached = otel_context.attach(current)
        headers_token = llm.TRACE_HEADERS.set(outgoing)
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            llm.TRACE_HEADERS.reset(headers_token)
            otel_context.detach(attached)
            self._finish(span, operation, scope, status)
            span.end()

    def _finish(self, span: trace.Span, operation: str, scope: Scope, status: int) -> None:
        call: Mapping[str, Any] = scope.get(CALL) or {}
        request: chat.Request | None = call.get("call")
        attributes: dict[str, Any] = {"http.response.status_code": status or 499}
        if request is not None:
            span.update_name(f"{operation} {request.model}")
            attributes["gen_ai.request.model"] = request.model
            for name, value in (
                ("gen_ai.request.max_tokens", request.max_tokens),
                ("gen_ai.request.temperature", request.temperature),
                ("gen_ai.request.top_p", request.top_p),
            ):
                if value is not None:
                    attributes[name] = value
            if request.stop:
                attributes["gen_ai.request.stop_sequences"] = list(request.stop)
        for name, field in (
            ("gen_ai.provider.name", "provider"),
            ("gen_ai.response.model", "model"),
            ("gen_ai.usage.input_tokens", "input_tokens"),
            ("gen_ai.usage.output_tokens", "output_tokens"),
            ("text_tool.deployment", "deployment"),
        ):
            if call.get(field) is not None:
                attributes[name] = call[field]
        if call.get("finish_reason"):
            attributes["gen_ai.response.finish_reasons"] = [call["finish_reason"]]
        if "ttft_ms" in call:
            attributes["gen_ai.response.time_to_first_chunk"] = call["ttft_ms"] / 1000
        key = scope.get(AUTH)
        if key is not None:
            attributes["text_tool.key"] = key.name
        if self.capture_content and request is not None:
            attributes.update(content(request, call.get("output_text")))
        span.set_attributes(attributes)
        failed = call.get("error") or (str(status) if status >= 400 or not status else None)
        if failed:
            span.set_attribute("error.type", failed)
            span.set_status(Status(StatusCode.ERROR, failed))


def content(request: chat.Request, output: str | None) -> dict[str, str]:
    """The prompt and the answer as the conventions' `gen_ai.*.messages` (their text
    parts; images, documents and opaque reasoning are left out)."""

    def parts(message: chat.Message) -> list[dict[str, str]]:
        return [{"type": "text", "content": text} for text in [message.text()] if text]

    system = [m for m in request.messages if m.role in ("system", "developer")]
    turns = [m for m in request.messages if m.role not in ("system", "developer")]
    shown = {
        "gen_ai.input.messages": json.dumps(
            [{"role": m.role, "parts": parts(m)} for m in turns], ensure_ascii=False
        ),
    }
    if system:
        shown["gen_ai.system_instructions"] = json.dumps(
            [part for m in system for part in parts(m)], ensure_ascii=False
        )
    if output is not None:
        shown["gen_ai.output.messages"] = json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": output}]}],
            ensure_ascii=False,
        )
    return shown
