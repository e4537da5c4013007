"""Prometheus metrics, one registry per app, served at GET /metrics.

Label values come from configuration only (route templates, configured key names,
models in LLM_MODELS), so no request can add a series: anything else is "other".
Counts are per process; with several workers each has its own.

A departure: the counting is plain dicts of floats, read by a collector when /metrics
is scraped, since prometheus-client's own metric objects take a lock and several calls
per increment, a measurable share of a request (bench/README.md).
Everything runs on the event loop's thread, so nothing here needs a lock.
prometheus-client still writes the exposition format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString
from starlette.responses import Response

from usage import undated

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OTHER = "other"

Labels = tuple[str, ...]
_go_float: Callable[[float], str] = floatToGoString  # how the exposition writes `le`


class Counter:
    def __init__(self, name: str, doc: str, labels: Labels) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class Histogram:
    def __init__(self, name: str, doc: str, labels: Labels, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, buckets
        # per series: a count for each bucket's own range (the last for +Inf), then the sum
        self.series: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound is in it
        counts[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        edges = [_go_float(b) for b in self.bounds] + ["+Inf"]
        for labels, counts in self.series.items():
            cumulative, buckets = 0.0, []
            for edge, count in zip(edges, counts[:-1], strict=True):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric(list(labels), buckets, counts[-1])
        return family


class Gauge:
    def __init__(self, name: str, doc: str, value: float = 0.0) -> None:
        self.name, self.doc, self.value = name, doc, value
        self._function: Callable[[], float] | None = None

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1

    def set_function(self, function: Callable[[], float]) -> None:
        """Read `function()` at each scrape instead of the value."""
        self._function = function

    def family(self) -> Metric:
        value = self._function() if self._function is not None else self.value
        return GaugeMetricFamily(self.name, self.doc, value=value)


class Metrics:
    def __init__(self, *, models: Iterable[str], keys: Iterable[str]) -> None:
        self.models = frozenset(models)
        self.keys = frozenset(keys)
        self.requests = Counter(
            "text_tool_requests", "Requests answered", ("route", "status", "key")
        )
        self.duration = Histogram(
            "text_tool_request_seconds", "Whole request, to the last byte", ("route",), _LATENCY
        )
        self.ttft = Histogram(
            "text_tool_provider_first_token_seconds", "Provider time to first token",
            ("model",), _LATENCY,
        )  # fmt: skip
        self.provider = Histogram(
            "text_tool_provider_seconds", "Provider call, start to end", ("model",), _LATENCY
        )
        self.tokens = Counter(
            "text_tool_tokens", "Tokens by direction", ("direction", "model", "key")
        )
        self.cost = Counter("text_tool_cost_usd", "Cost in USD", ("model", "key"))
        self.limited = Counter("text_tool_rate_limited", "429 answers", ("key",))
        self.in_flight = Gauge("text_tool_in_flight_requests", "Requests being served")
        self.open_streams = Gauge("text_tool_open_streams", "SSE streams open")
        self.store_up = Gauge(
            "text_tool_rate_limit_store_up", "1 while the shared store answers", value=1.0
        )
        self.keys_loaded = Gauge(
            "text_tool_keys_loaded_timestamp_seconds", "When the API keys were last loaded"
        )
        self.ledger_waiting = Gauge(
            "text_tool_ledger_rows_waiting", "Ledger rows taken and not yet written"
        )
        self.ledger_dropped = Gauge(
            "text_tool_ledger_rows_dropped", "Ledger rows dropped: too many were waiting"
        )
        # The state of each deployment (llm.Deployment.state), read at each scrape.
        self.deployments: Callable[[], Iterable[Mapping[str, Any]]] = lambda: ()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """What prometheus-client's registry asks a collector for at each scrape."""
        for metric in (
            self.requests, self.duration, self.ttft, self.provider, self.tokens, self.cost,
            self.limited, self.in_flight, self.open_streams, self.store_up, self.keys_loaded,
            self.ledger_waiting, self.ledger_dropped,
        ):  # fmt: skip
            yield metric.family()
        yield from self._deployment_families()

    def _deployment_families(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "text_tool_deployment_up", "0 while the deployment cools down after failing",
            labels=["deployment"],
        )  # fmt: skip
        in_flight = GaugeMetricFamily(
            "text_tool_deployment_in_flight", "Calls open with the deployment",
            labels=["deployment"],
        )  # fmt: skip
        calls = CounterMetricFamily(
            "text_tool_deployment_calls", "Calls begun on the deployment; failed: before the "
            "answer began", labels=["deployment", "outcome"],
        )  # fmt: skip
        for state in self.deployments():
            name = str(state["name"])
            up.add_metric([name], 0.0 if state["state"] == "cooling" else 1.0)
            in_flight.add_metric([name], state["in_flight"])
            calls.add_metric([name, "failed"], state["failed_calls"])
            calls.add_metric([name, "other"], state["calls"] - state["failed_calls"])
        yield from (up, in_flight, calls)

    def name_keys(self, names: Iterable[str]) -> None:
        """The keys labelled by name (after a reload of the keys file); any other is "other"."""
        self.keys = frozenset(names)

    def _model(self, model: Any) -> str:
        if model in self.models:
            return str(model)
        plain = undated(str(model))  # gpt-4o-mini-2024-07-18: gpt-4o-mini
        return plain if plain in self.models else OTHER

    def _key(self, key: str | None) -> str:
        if key is None:
            return "none"
        return key if key in self.keys else OTHER

    def observe(
        self, route: str, status: int, key: str | None, seconds: float, call: Mapping[str, Any]
    ) -> None:
        """One finished request: `call` is what the route noted (model, tokens, cost...)."""
        key_label = self._key(key)
        self.requests.inc((route, str(status), key_label))
        self.duration.observe((route,), seconds)
        if status == 429:
            self.limited.inc((key_label,))
        if "model" not in call:
            return
        model = self._model(call["model"])
        self.tokens.inc(("input", model, key_label), call.get("input_tokens") or 0)
        self.tokens.inc(("output", model, key_label), call.get("output_tokens") or 0)
        if call.get("cost_usd"):
            self.cost.inc((model, key_label), call["cost_usd"])
        if "ttft_ms" in call:
            self.ttft.observe((model,), call["ttft_ms"] / 1000)
        if "provider_ms" in call:
            self.provider.observe((model,), call["provider_ms"] / 1000)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
