"""Prometheus metrics, one registry per app, served at GET /metrics.

Label values come from configuration only (route templates, configured key names,
models in LLM_MODELS), so no request can add a series: anything else is "other".
Counts are per process; with several workers each has its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase as Metric
from starlette.requests import Request
from starlette.responses import Response

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OTHER = "other"


class Metrics:
    def __init__(self, *, models: Iterable[str], keys: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.models = frozenset(models)
        self.keys = frozenset(keys)
        r = self.registry
        self.requests = Counter(
            "text_tool_requests", "Requests answered", ["route", "status", "key"], registry=r
        )
        self.duration = Histogram(
            "text_tool_request_seconds", "Whole request, to the last byte", ["route"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "text_tool_provider_first_token_seconds", "Provider time to first token",
            ["model"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.provider = Histogram(
            "text_tool_provider_seconds", "Provider call, start to end", ["model"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "text_tool_tokens", "Tokens by direction", ["direction", "model", "key"], registry=r
        )
        self.cost = Counter("text_tool_cost_usd", "Cost in USD", ["model", "key"], registry=r)
        self.limited = Counter("text_tool_rate_limited", "429 answers", ["key"], registry=r)
        self.in_flight = Gauge("text_tool_in_flight_requests", "Requests being served", registry=r)
        self.open_streams = Gauge("text_tool_open_streams", "SSE streams open", registry=r)
        self.store_up = Gauge(
            "text_tool_rate_limit_store_up", "1 while the shared store answers", registry=r
        )
        self.store_up.set(1)
        # Bounded like the series: labels come from configuration only.
        self._children: dict[tuple[Metric, tuple[str, ...]], Any] = {}

    def _model(self, model: Any) -> str:
        return model if model in self.models else OTHER

    def _key(self, key: str | None) -> str:
        if key is None:
            return "none"
        return key if key in self.keys else OTHER

    def _child(self, metric: Metric, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus-client's own lookup
        (label checks, a lock) cost more than the increment it leads to."""
        known = self._children.get((metric, labels))
        if known is None:
            known = self._children[(metric, labels)] = metric.labels(*labels)
        return known

    def observe(
        self, route: str, status: int, key: str | None, seconds: float, call: Mapping[str, Any]
    ) -> None:
        """One finished request: `call` is what the route noted (model, tokens, cost...)."""
        key_label = self._key(key)
        self._child(self.requests, route, str(status), key_label).inc()
        self._child(self.duration, route).observe(seconds)
        if status == 429:
            self._child(self.limited, key_label).inc()
        if "model" not in call:
            return
        model = self._model(call["model"])
        self._child(self.tokens, "input", model, key_label).inc(call.get("input_tokens") or 0)
        self._child(self.tokens, "output", model, key_label).inc(call.get("output_tokens") or 0)
        if call.get("cost_usd"):
            self._child(self.cost, model, key_label).inc(call["cost_usd"])
        if "ttft_ms" in call:
            self._child(self.ttft, model).observe(call["ttft_ms"] / 1000)
        if "provider_ms" in call:
            self._child(self.provider, model).observe(call["provider_ms"] / 1000)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


async def metrics_route(request: Request) -> Response:
    metrics: Metrics = request.app.state.service.metrics
    return metrics.response()
