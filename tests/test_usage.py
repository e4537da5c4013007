"""Cost from token counts: cached and cache-write tokens priced on their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from usage import Price, PriceTable, Usage


def test_openai_cached_input_is_priced_at_the_cached_rate() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cached_input_tokens=500_000)
    assert PriceTable().cost("gpt-4o-mini", usage) == pytest.approx(0.075 + 0.0375 + 0.60)


def test_anthropic_cache_reads_and_writes_are_priced_apart() -> None:
    usage = Usage(
        input_tokens=1_300_000,
        output_tokens=0,
        cached_input_tokens=200_000,
        cache_write_tokens=100_000,
    )
    # 1M plain at $1, 200k reads at $0.10, 100k writes at $1.25 per million
    assert PriceTable().cost("claude-haiku-4-5", usage) == pytest.approx(1.0 + 0.02 + 0.125)


@pytest.mark.parametrize(
    "model", ["gpt-4o-mini-2024-07-18", "claude-haiku-4-5-20251001", "claude-3-5-haiku-20241022"]
)
def test_dated_snapshots_take_their_models_price(model: str) -> None:
    assert PriceTable().price(model) is not None


def test_a_prefix_is_not_a_match() -> None:
    table = PriceTable()
    assert table.price("gpt-4o-mini") != table.price("gpt-4o")
    assert table.cost("gpt-4o-mini-turbo-xl", Usage(1, 1)) is None


def test_unknown_model_costs_none_not_zero() -> None:
    assert PriceTable().cost("llama3.1:8b", Usage(input_tokens=10, output_tokens=10)) is None


def test_prices_file_adds_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[models."llama3.1:8b"]\ninput = 0.1\noutput = 0.2\n'
        '[models."gpt-4o-mini"]\ninput = 1.0\noutput = 2.0\ncached_input = 0.5\n'
    )
    table = PriceTable.from_file(path)
    assert table.price("llama3.1:8b") == Price(0.1, 0.2)
    assert table.cost("gpt-4o-mini", Usage(2_000_000, 1_000_000, 1_000_000)) == pytest.approx(
        1.0 + 0.5 + 2.0
    )
