"""Token usage and what it costs.

Prices are USD per million tokens, from the providers' published price lists
(OpenAI and Anthropic, checked 2026-11). A model that is not in the table has an
unknown price, and its cost is `None`: a made-up 0 would hide spend.
A TOML file (`PRICES_FILE`) adds models or overrides these:

    [models."my-finetune"]
    input = 0.30
    output = 1.20
    cached_input = 0.15      # optional, defaults to input
    cache_write = 0.375      # optional, defaults to input
    reasoning = false        # optional: whether it takes a reasoning effort or thinking

Beside the prices, what a model can take where a provider refuses it otherwise: whether
it reasons (OpenAI refuses `reasoning_effort` for gpt-4.1 and gpt-4o; Anthropic
`thinking` for the Claude 3.5 models). A model the table does not know is asked as the
client asked.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one call. `input_tokens` counts every input token, cached ones included."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0  # within cache_write_tokens: written for an hour
    reasoning_tokens: int = 0  # within output_tokens
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None  # an hour's cache write, where it costs more


def _anthropic(input_: float, output: float) -> Price:
    # Anthropic bills cache writes at 1.25x input for 5 minutes, 2x for an hour, and
    # cache reads at 0.1x.
    return Price(
        input_, output, cached_input=input_ * 0.1, cache_write=input_ * 1.25,
        cache_write_1h=input_ * 2,
    )  # fmt: skip


DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5.4": Price(2.50, 15.00, cached_input=0.25),
    "gpt-5.1": Price(1.25, 10.00, cached_input=0.125),
    "gpt-5": Price(1.25, 10.00, cached_input=0.125),
    "gpt-5-mini": Price(0.25, 2.00, cached_input=0.025),
    "gpt-5-nano": Price(0.05, 0.40, cached_input=0.005),
    "gpt-4.1": Price(2.00, 8.00, cached_input=0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, cached_input=0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, cached_input=0.025),
    "gpt-4o": Price(2.50, 10.00, cached_input=1.25),
    "gpt-4o-mini": Price(0.15, 0.60, cached_input=0.075),
    "o3": Price(2.00, 8.00, cached_input=0.50),
    "o4-mini": Price(1.10, 4.40, cached_input=0.275),
    "o3-mini": Price(1.10, 4.40, cached_input=0.55),
    # OpenAI's embeddings: input only
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
    # Anthropic
    "claude-opus-4-6": _anthropic(5.00, 25.00),
    "claude-sonnet-4-6": _anthropic(3.00, 15.00),
    "claude-opus-4-5": _anthropic(5.00, 25.00),
    "claude-sonnet-4-5": _anthropic(3.00, 15.00),
    "claude-haiku-4-5": _anthropic(1.00, 5.00),
    "claude-opus-4-1": _anthropic(15.00, 75.00),
    "claude-opus-4": _anthropic(15.00, 75.00),
    "claude-sonnet-4": _anthropic(3.00, 15.00),
    "claude-3-7-sonnet": _anthropic(3.00, 15.00),
    "claude-3-5-sonnet": _anthropic(3.00, 15.00),
    "claude-3-5-haiku": _anthropic(0.80, 4.00),
    "claude-3-haiku": _anthropic(0.25, 1.25),
    # the echo provider costs nothing, and that is a known price
    "echo": Price(0.0, 0.0),
}

# Whether a model reasons (takes `reasoning_effort`, or Anthropic's `thinking`).
REASONING: dict[str, bool] = {
    **dict.fromkeys(
        ("gpt-5.4", "gpt-5.1", "gpt-5", "gpt-5-mini", "gpt-5-nano", "o3", "o4-mini", "o3-mini"),
        True,
    ),  # fmt: skip
    **dict.fromkeys(("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-mini"), False),
    **dict.fromkeys(
        (
            "claude-opus-4-6",
            "claude-sonnet-4-6",
            "claude-opus-4-5",
            "claude-sonnet-4-5",
            "claude-haiku-4-5",
            "claude-opus-4-1",
            "claude-opus-4",
            "claude-sonnet-4",
            "claude-3-7-sonnet",
        ),
        True,
    ),  # fmt: skip
    **dict.fromkeys(("claude-3-5-sonnet", "claude-3-5-haiku", "claude-3-haiku"), False),
    "echo": True,  # echo takes any setting, and ignores it
}

# Providers answer with dated snapshots: gpt-4o-mini-2024-07-18, claude-haiku-4-5-20251001.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def undated(model: str) -> str:
    """The model a dated snapshot is of (gpt-4o-mini-2024-07-18: gpt-4o-mini)."""
    return _SNAPSHOT.sub("", model)


class PriceTable:
    def __init__(self, prices: dict[str, Price] | None = None) -> None:
        self._prices = dict(DEFAULT_PRICES if prices is None else prices)
        self._reasoning = dict(REASONING)

    @classmethod
    def from_file(cls, path: Path | None) -> PriceTable:
        """The default table, with the file's entries added on top."""
        table = cls()
        if path is None:
            return table
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        for model, entry in data.get("models", {}).items():
            if "reasoning" in entry:
                if not isinstance(entry["reasoning"], bool):
                    raise ValueError(f"models.{model}.reasoning: true or false")
                table._reasoning[model] = entry["reasoning"]
                if "input" not in entry and "output" not in entry:
                    continue  # only what it can take
            table._prices[model] = Price(
                input=float(entry["input"]),
                output=float(entry["output"]),
                cached_input=_opt_float(entry.get("cached_input")),
                cache_write=_opt_float(entry.get("cache_write")),
                cache_write_1h=_opt_float(entry.get("cache_write_1h")),
            )
        return table

    def price(self, model: str) -> Price | None:
        found = self._prices.get(model)
        if found is None:
            found = self._prices.get(undated(model))
        return found

    def reasons(self, model: str) -> bool | None:
        """Whether `model` takes a reasoning setting; None: not known."""
        found = self._reasoning.get(model)
        return self._reasoning.get(undated(model)) if found is None else found

    def cost(self, model: str, usage: Usage) -> float | None:
        price = self.price(model)
        if price is None:
            return None
        cached = usage.cached_input_tokens
        written = usage.cache_write_tokens
        hour = min(usage.cache_write_1h_tokens, written)
        plain = max(usage.input_tokens - cached - written, 0)
        write = price.input if price.cache_write is None else price.cache_write
        total = (
            plain * price.input
            + cached * (price.input if price.cached_input is None else price.cached_input)
            + (written - hour) * write
            + hour * (write if price.cache_write_1h is None else price.cache_write_1h)
            + usage.output_tokens * price.output
        )
        return round(total / 1_000_000, 10)


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


@dataclass(slots=True)
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0

    def add(self, usage: Usage, cost: float | None) -> None:
        self.requests += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        # A model's price is known for all of its calls or for none of them.
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost

    def as_dict(self) -> dict[str, Any]:
        cost = None if self.cost_usd is None else round(self.cost_usd, 10)
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": cost,
        }


class UsageBook:
    """Each key's usage since start, in total and by model. A model of unknown price
    shows `cost_usd: null`; a key's total counts what is known."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[Totals, dict[str, Totals]]] = {}

    def record(self, key: str, model: str, usage: Usage, cost: float | None) -> None:
        total, by_model = self._keys.setdefault(key, (Totals(), {}))
        total.add(usage, 0.0 if cost is None else cost)
        by_model.setdefault(model, Totals()).add(usage, cost)

    async def report(self, key: str) -> dict[str, Any]:
        """The key's totals; `redis_store.RedisUsage` answers the same, summed across
        replicas."""
        return self.snapshot(key)

    def snapshot(self, key: str) -> dict[str, Any]:
        total, by_model = self._keys.get(key, (Totals(), {}))
        return {
            "key": key,
            **total.as_dict(),
            "by_model": {model: t.as_dict() for model, t in by_model.items()},
        }

    def all(self) -> dict[str, dict[str, Any]]:
        return {key: self.snapshot(key) for key in self._keys}
