"""The dashboard in headless Chromium, as a person uses it: real calls through the real
service, then the page opened, a key typed in, and what is drawn checked against the
ledger's own figures. Screenshots at 1280 and 390 pixels wide are kept in
test-artifacts/ (TEST_ARTIFACTS to put them elsewhere)."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Process, openai_env, start_service

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
TEAM_A, ADMIN, TEAM_B = "team-a-" + "k" * 20, "ops-" + "k" * 20, "team-b-" + "k" * 20
KEYS = f"""
[[keys]]
name = "team-a"
key = "{TEAM_A}"
budget_usd = 5.0

[[keys]]
name = "ops"
key = "{ADMIN}"
admin = true

[[keys]]
name = "team-b"
key = "{TEAM_B}"
budget_usd = 0.5
budget_period = "month"
"""


@pytest.fixture
def service(tmp_path: Path, mock_provider: Process) -> Iterator[Process]:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    env = openai_env(
        mock_provider, LLM_MODEL="gpt-4o-mini", LLM_MODELS="gpt-4o-mini,gpt-4o",
        API_KEYS_FILE=str(keys), LLM_MAX_RETRIES="0",
    )  # fmt: skip
    del env["API_KEYS"]
    proc = start_service(tmp_path, env)
    yield proc
    proc.stop()


def call(service: Process, key: str, prompt: str, model: str = "gpt-4o-mini") -> int:
    answer = httpx.post(
        service.url + "/complete",
        json={"prompt": prompt, "model": model, "max_tokens": 2000},
        headers={"X-API-Key": key},
        timeout=20,
    )
    return answer.status_code


def number(element: Any, name: str) -> float:
    return float(element.get_attribute(name) or "nan")


def drawn(page: Any, chart: str) -> dict[str, float]:
    """The figures of a chart's bars, summed by series (a key or a model)."""
    sums: dict[str, float] = defaultdict(float)
    for rect in page.locator(f'svg[data-chart="{chart}"] rect').all():
        sums[rect.get_attribute("data-series")] += number(rect, "data-value")
    return dict(sums)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_dashboard_draws_the_ledgers_figures_for_whoever_signs_in(
    service: Process,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert call(service, TEAM_A, 'mock:{"tokens": 1500}\nlong one') == 200
    assert call(service, TEAM_A, 'mock:{"tokens": 300}\nshort one', model="gpt-4o") == 200
    assert call(service, TEAM_B, 'mock:{"tokens": 700}\nanother') == 200
    assert call(service, TEAM_B, 'mock:{"status": 500}\nfails') == 502
    expected = httpx.get(
        service.url + "/usage?group_by=key,model",
        headers={"X-API-Key": ADMIN},
        timeout=10,
    ).json()["rows"]
    by_key: dict[str, float] = defaultdict(float)
    by_model: dict[str, float] = defaultdict(float)
    for row in expected:
        by_key[row["key"]] += row["cost_usd"]
        by_model[row["model"]] += row["cost_usd"]
    assert by_key["team-a"] > 0 and by_key["team-b"] > 0

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            urls: list[str] = []
            page.on("request", lambda r: urls.append(r.url))
            shown = page.goto(service.url + "/dashboard")
            assert shown is not None and shown.status == 200
            assert "script-src 'self'" in shown.headers["content-security-policy"]
            # a wrong key: the same 401 as anywhere, said on the page
            page.fill("#key", "not-a-key")
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("#sign-in-error:has-text('401')", timeout=10_000)
            # the admin: every key's calls
            page.fill("#key", ADMIN)
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector('svg[data-chart="spend"] rect', timeout=10_000)
            assert page.inner_text("#who").startswith("ops (admin")
            assert page.locator("#sign-in").is_hidden()
            spend = drawn(page, "spend")
            assert spend.keys() == {"team-a", "team-b"}
            for key, cost in by_key.items():
                assert spend[key] == pytest.approx(cost, rel=1e-6)
            tokens = drawn(page, "tokens")
            used = sum(r["input_tokens"] + r["output_tokens"] for r in expected)
            assert sum(tokens.values()) == used
            hourly = page.locator('svg[data-chart="hourly"] rect[data-kind="requests"]').all()
            assert sum(number(r, "data-value") for r in hourly) == 4
            errors = page.locator('svg[data-chart="hourly"] rect[data-kind="errors"]').all()
            assert sum(number(r, "data-value") for r in errors) == 1
            assert page.locator("#calls tbody tr").count() == 4
            assert page.locator("#calls tbody tr.status-error").count() == 1
            budgets = {
                b.get_attribute("data-key"): number(b, "data-spent")
                for b in page.locator("#budgets .budget").all()
            }
            assert budgets["team-a"] == pytest.approx(by_key["team-a"], abs=1e-6)
            assert budgets["team-b"] == pytest.approx(by_key["team-b"], abs=1e-6)
            assert page.locator("#deployments tbody tr").count() == 1
            assert page.locator("#latency tbody tr").count() == 2  # gpt-4o-mini, gpt-4o
            # stacked by model instead: the same spend, split the other way
            page.select_option("#stack", "model")
            by_model_drawn = drawn(page, "spend")
            for model, cost in by_model.items():
                assert by_model_drawn[model] == pytest.approx(cost, rel=1e-6)
            # the last calls, filtered to errors
            page.select_option("#filter-status", "errors")
            expect(page.locator("#calls tbody tr")).to_have_count(1, timeout=10_000)
            page.select_option("#filter-status", "")
            page.screenshot(path=str(ARTIFACTS / "dashboard-1280.png"), full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})
            # nothing wider than the screen but the scrolling table of calls
            wide = page.evaluate(
                "[...document.querySelectorAll('body *')].filter(e => "
                "e.getBoundingClientRect().right > 391 && !e.closest('.scroll'))"
                ".map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 8)"
            )
            assert page.evaluate("document.documentElement.scrollWidth") <= 390, wide
            page.screenshot(path=str(ARTIFACTS / "dashboard-390.png"), full_page=True)
            # no CSP violation, no script error: only the wrong key's refusal
            assert [p for p in problems if "401" not in p] == [] and len(problems) == 1, problems
            assert not [u for u in urls if ADMIN in u or TEAM_A in u]  # never in a URL

            # another key sees only its own
            other = browser.new_page(viewport={"width": 1280, "height": 900})
            other.goto(service.url + "/dashboard")
            other.fill("#key", TEAM_B)
            other.click("#sign-in button[type=submit]")
            other.wait_for_selector('svg[data-chart="spend"] rect', timeout=10_000)
            assert other.inner_text("#who") == "team-b"
            assert drawn(other, "spend").keys() == {"team-b"}
            assert "team-a" not in other.inner_text("body")
            assert other.locator("#calls tbody tr").count() == 2
            assert other.locator("#deployments tbody tr").count() == 0
            # signing out forgets the key
            other.click("#sign-out")
            assert other.evaluate("sessionStorage.length") == 0
        finally:
            browser.close()
    log = service.output()
    for key in (ADMIN, TEAM_A, TEAM_B):
        assert key not in log
