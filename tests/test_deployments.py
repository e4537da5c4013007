"""Several deployments of a model (LLM_DEPLOYMENTS): the choice by load and weight,
cooling down what failed, moving on, 503 when every one cools; the file's checks; and
on real processes, two mock providers, one of them killed."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import chat
import llm
from config import DeploymentSpec, Settings, SettingsError
from deployments import Deployment, Deployments
from errors import ApiError, ProviderError
from server import create_app
from tests.conftest import (
    AUTH_HEADERS,
    CLIENT_KEY,
    PROVIDER_KEY,
    Process,
    start_mock,
    start_service,
)
from tests.helpers import client

pytestmark = pytest.mark.anyio


class Fake(llm.Provider):
    """A provider whose failures the test scripts: each call takes the next of `fails`
    (an exception, or None for an answer)."""

    def __init__(self, name: str, *fails: ProviderError | None) -> None:
        self.name = name
        self.fails = list(fails)
        self.calls: list[str] = []

    async def answer(self, model: str) -> str:
        self.calls.append(model)
        failure = self.fails.pop(0) if self.fails else None
        if failure is not None:
            raise failure
        return f"{self.name}:{model}"

    async def stream(self, request: chat.Request) -> AsyncGenerator[chat.Event, None]:
        raise NotImplementedError
        yield


def pool(*deployments: Deployment) -> Deployments:
    return Deployments(deployments, deadline_s=30)


async def call(deployments: Deployments, model: str = "m") -> str:
    return await deployments.run(model, lambda p, m: p.answer(m))  # type: ignore[attr-defined]


async def test_equally_loaded_deployments_take_calls_in_proportion_to_their_weights() -> None:
    a, b = Fake("a"), Fake("b")
    deployments = pool(
        Deployment("a", a, {"m": "up-a"}, weight=1),
        Deployment("b", b, {"m": "up-b"}, weight=3),
    )
    answers = [await call(deployments) for _ in range(400)]
    assert Counter(answers) == {"a:up-a": 100, "b:up-b": 300}
    # Smoothly interleaved, not in runs: never more than three of b in a row.
    assert "b:up-b," * 4 not in ",".join(answers) + ","


async def test_the_deployment_with_fewest_calls_in_flight_for_its_weight_is_chosen() -> None:
    a, b = Fake("a"), Fake("b")
    deployments = pool(
        Deployment("a", a, {"m": ""}, weight=1), Deployment("b", b, {"m": ""}, weight=4)
    )
    a.inflight, b.inflight = 1, 3  # 1.0 against 0.75
    assert await call(deployments) == "b:m"
    a.inflight, b.inflight = 1, 5  # 1.0 against 1.25
    assert await call(deployments) == "a:m"


async def test_a_failure_before_the_answer_cools_the_deployment_and_the_call_moves_on() -> None:
    a = Fake("a", llm.ProviderUnavailable("HTTP 503"))
    b = Fake("b")
    first, second = Deployment("a", a, {"m": ""}), Deployment("b", b, {"m": ""})
    deployments = pool(first, second)
    noted: dict[str, object] = {}
    answer = await deployments.run("m", lambda p, m: p.answer(m), noted=noted)  # type: ignore[attr-defined]
    assert answer == "b:m" and noted == {"deployment": "b", "provider": "b"}
    assert len(a.calls) == 1
    now = time.monotonic()
    assert first.state(now)["state"] == "cooling" and 0 < first.cooling_s(now) <= 1
    # While a cools, every call goes to b, whatever the weights say.
    assert [await call(deployments) for _ in range(5)] == ["b:m"] * 5
    assert len(a.calls) == 1
    assert [d["name"] for d in deployments.states() if d["state"] == "cooling"] == ["a"]


async def test_cooling_honours_retry_after_and_otherwise_grows() -> None:
    limited = llm.ProviderRateLimited("HTTP 429", retry_after_s=7)
    deployment = Deployment("a", Fake("a"), {"*": ""})
    deployment.failed(limited, now=100)
    assert deployment.cooling_s(100) == 7
    waits = []
    for _ in range(4):
        deployment.failed(llm.ProviderUnavailable("down"), now=100)
        waits.append(deployment.cooling_s(100))
    assert waits == [2, 4, 8, 16]  # the fifth failure in a row: 2**4
    deployment.served(began=99)  # a call begun before the failure says nothing
    assert deployment.cooling_s(100) == 16
    deployment.served(began=101)
    assert deployment.cooling_s(100) == 0 and deployment.failures == 0
    # A timeout may be a slow answer: it moves the call on but cools nothing.
    deployment.failed(llm.ProviderTimeout("slow"), now=100)
    assert deployment.cooling_s(100) == 0


async def test_when_every_deployment_cools_the_answer_is_503_with_retry_after() -> None:
    a = Fake("a", llm.ProviderRateLimited("HTTP 429", retry_after_s=3))
    b = Fake("b", llm.ProviderUnavailable("refused"))
    deployments = pool(Deployment("a", a, {"m": ""}), Deployment("b", b, {"m": ""}))
    with pytest.raises(llm.ProviderUnavailable):  # the last deployment's own failure
        await call(deployments)
    with pytest.raises(ApiError) as refused:
        await call(deployments)
    assert refused.value.status == 503 and refused.value.type == "upstream_unavailable"
    assert refused.value.headers == {"Retry-After": "1"}  # b's 1 s, a's 3 s
    assert (len(a.calls), len(b.calls)) == (1, 1)


async def test_an_invalid_request_is_not_tried_on_another_deployment() -> None:
    a, b = Fake("a", llm.ProviderBadRequest("context too long")), Fake("b")
    deployments = pool(Deployment("a", a, {"m": ""}), Deployment("b", b, {"m": ""}))
    with pytest.raises(llm.ProviderBadRequest):
        await call(deployments)
    assert b.calls == [] and deployments.all[0].cooling_s(0) == 0


async def test_a_higher_priority_serves_only_when_the_lowest_are_gone() -> None:
    a, spare = Fake("a", llm.ProviderRateLimited("HTTP 429", retry_after_s=30)), Fake("spare")
    deployments = pool(
        Deployment("spare", spare, {"m": "spare-model"}, weight=100, priority=1),
        Deployment("a", a, {"m": ""}),
    )
    assert await call(deployments) == "spare:spare-model"
    with pytest.raises(ApiError) as cooling:  # without fallback, only the first priority
        await deployments.run("m", lambda p, m: p.answer(m), fallback=False)  # type: ignore[attr-defined]
    assert cooling.value.headers == {"Retry-After": "30"}  # a's wait, not the spare's


async def test_a_model_goes_only_to_the_deployments_that_serve_it() -> None:
    a, b = Fake("a"), Fake("b")
    deployments = pool(Deployment("a", a, {"x": ""}), Deployment("b", b, {"y": "why"}))
    assert await call(deployments, "x") == "a:x"
    assert await call(deployments, "y") == "b:why"
    assert deployments.first("y") == (b, "why")


# --- the file --------------------------------------------------------------------------


def settings_with(tmp_path: Path, text: str, **environ: str) -> Settings:
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    return Settings.from_env(environ={"LLM_DEPLOYMENTS": str(path), **environ}, env_file=None)


TWO = """
[[deployments]]
name = "vllm-a"
provider = "openai"
base_url = "http://10.0.0.5:8000/v1/"
models = { "llama" = "meta-llama/Llama-3.1-8B-Instruct" }
weight = 2

[[deployments]]
name = "claude"
provider = "anthropic"
api_key_env = "TEAM_ANTHROPIC_KEY"
models = ["claude-haiku-4-5", "llama"]
priority = 1
"""


def test_the_deployments_file_sets_the_models_and_reads_keys_from_named_variables(
    tmp_path: Path,
) -> None:
    settings = settings_with(tmp_path, TWO, TEAM_ANTHROPIC_KEY="sk-ant-team")
    first, second = settings.deployments
    assert (first.base_url, first.weight, first.api_key) == ("http://10.0.0.5:8000/v1", 2.0, "")
    assert first.models == (("llama", "meta-llama/Llama-3.1-8B-Instruct"),)
    assert (second.api_key, second.priority, second.base_url) == (
        "sk-ant-team", 1, "https://api.anthropic.com"
    )  # fmt: skip
    assert settings.models == ("llama", "claude-haiku-4-5") and settings.model == "llama"
    assert "sk-ant-team" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (TWO, {}, "TEAM_ANTHROPIC_KEY is not set"),
        ("[[deployments]]\nname = 'a'\nprovider = 'gemini'\nmodels = ['m']\n", {}, "provider"),
        ("[[deployments]]\nname = 'a'\nprovider = 'openai'\nmodels = ['m']\n", {}, "api_key"),
        ("[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = []\n", {}, "models"),
        ("[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = ['m']\nweight = 0\n", {},
         "weight"),
        ("[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = ['m']\nweight = inf\n", {},
         "weight"),
        ("[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = ['m']\nkey = 'x'\n", {},
         "unknown fields key"),
        ("[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = ['m']\n" * 2, {}, "unique"),
        ("[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = ['m']\n",
         {"LLM_MODELS": "m,other"}, "no deployment of LLM_DEPLOYMENTS serves other"),
        ("[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = ['m']\n",
         {"LLM_FALLBACK_PROVIDER": "echo"}, "higher priority"),
        ("deployments = [", {}, "cannot read"),
    ],
)  # fmt: skip
def test_a_bad_deployments_file_is_a_named_setting_error(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        settings_with(tmp_path, text, **environ)


# --- on real processes --------------------------------------------------------------------


@pytest.mark.e2e
async def test_two_mock_providers_share_calls_by_weight_and_a_dead_one_is_skipped(
    tmp_path: Path,
) -> None:
    a, b = start_mock(tmp_path), start_mock(tmp_path)
    path = tmp_path / "deployments.toml"
    path.write_text(
        f"""
[[deployments]]
name = "box-a"
provider = "openai"
base_url = "{a.url}/v1"
api_key_env = "BOX_KEY"
models = {{ "team-model" = "upstream-a" }}

[[deployments]]
name = "box-b"
provider = "openai"
base_url = "{b.url}/v1"
api_key_env = "BOX_KEY"
models = {{ "team-model" = "upstream-b" }}
weight = 3
"""
    )
    service = start_service(
        tmp_path, {"API_KEYS": CLIENT_KEY, "LLM_DEPLOYMENTS": str(path), "BOX_KEY": PROVIDER_KEY,
                   "RATE_LIMIT": "100000/minute"}
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=30, headers=AUTH_HEADERS) as c:

            async def complete() -> httpx.Response:
                return await c.post("/complete", json={"prompt": "hi", "model": "team-model"})

            served = [await complete() for _ in range(40)]
            assert {r.status_code for r in served} == {200}
            assert Counter(r.json()["model"] for r in served) == {
                "upstream-a": 10,
                "upstream-b": 30,
            }
            rids = [r.headers["x-request-id"] for r in served]
            lines = service.access_lines(*rids)
            assert Counter(lines[rid]["deployment"] for rid in rids) == {"box-a": 10, "box-b": 30}

            # A body passed through goes with the model's upstream name.
            chat_ = await c.post(
                "/v1/chat/completions",
                json={"model": "team-model", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert chat_.json()["model"] in ("upstream-a", "upstream-b")

            b.stop()  # b's connections are refused from here on
            after = [await complete() for _ in range(6)]
            assert [r.status_code for r in after] == [200] * 6
            assert {r.json()["model"] for r in after} == {"upstream-a"}
            ready = (await c.get("/ready")).json()["deployments"]
            states = {d["name"]: d for d in ready}
            assert states["box-b"]["state"] == "cooling" and states["box-a"]["state"] == "up"
            assert states["box-b"]["failed_calls"] == 1  # tried once, then skipped while cooling
            assert "last_error" not in states["box-b"]  # /ready is public: that is in the log
            assert "could not connect" in service.output()
            scrape = (await c.get("/metrics")).text
            assert 'text_tool_deployment_up{deployment="box-b"} 0.0' in scrape
            assert (
                'text_tool_deployment_calls_total{deployment="box-b",outcome="failed"} 1.0'
                in scrape
            )

            a.stop()
            gone = await complete()  # a fails too: its own error
            assert gone.status_code == 502
            cooling = await complete()  # both cooling: 503 until the first is back
            assert cooling.status_code == 503
            assert cooling.json()["error"]["type"] == "upstream_unavailable"
            assert int(cooling.headers["retry-after"]) >= 1
            # A stream meets the same rule, before any 200.
            async with c.stream("POST", "/stream", json={"prompt": "hi"}) as streamed:
                assert streamed.status_code == 503
    finally:
        service.stop()
        a.stop()
        b.stop()
    assert "sk-test-" not in service.output()


@pytest.mark.e2e
async def test_a_dead_deployment_comes_back_once_its_cooling_is_over(tmp_path: Path) -> None:
    mock = start_mock(tmp_path)
    port = mock.port
    mock.stop()
    path = tmp_path / "deployments.toml"
    path.write_text(
        f'[[deployments]]\nname = "only"\nprovider = "openai"\nbase_url = "{mock.url}/v1"\n'
        'models = ["m"]\n'
    )
    service = start_service(tmp_path, {"API_KEYS": CLIENT_KEY, "LLM_DEPLOYMENTS": str(path)})
    revived: Process | None = None
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=30, headers=AUTH_HEADERS) as c:
            assert (await c.post("/complete", json={"prompt": "hi"})).status_code == 502
            refused = await c.post("/complete", json={"prompt": "hi"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            revived = start_mock(tmp_path, port=port)
            deadline = asyncio.get_running_loop().time() + 10
            while (answer := await c.post("/complete", json={"prompt": "hi"})).status_code != 200:
                assert answer.status_code == 503
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.2)
            assert (await c.get("/ready")).json()["deployments"][0]["state"] == "up"
    finally:
        service.stop()
        if revived is not None:
            revived.stop()


# --- in process, through the routes -------------------------------------------------------


def two_anthropic(
    handler: Callable[[httpx.Request], httpx.Response],
    upstream: str = "claude-haiku-4-5",
    prices: Path | None = None,
) -> httpx.AsyncClient:
    specs = tuple(
        DeploymentSpec(name=name, provider="anthropic", base_url=f"http://{name}.test",
                       api_key=PROVIDER_KEY, models=(("fast", upstream),))
        for name in ("one", "two")
    )  # fmt: skip
    settings = Settings(
        deployments=specs, api_keys=(CLIENT_KEY,), max_retries=0, prices_file=prices
    )
    app = create_app(settings, transport=httpx.MockTransport(handler))
    return client(app)


OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 1},
}  # fmt: skip
BODY = {"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


async def test_a_messages_body_passed_through_moves_on_when_a_deployment_is_overloaded() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "one.test":
            return httpx.Response(529, json=OVERLOADED)
        assert json.loads(request.content)["model"] == "claude-haiku-4-5"
        return httpx.Response(200, json=MESSAGE)

    async with two_anthropic(handler) as c:
        answers = [await c.post("/v1/messages", json=BODY) for _ in range(4)]
        ready = (await c.get("/ready")).json()["deployments"]
        scrape = (await c.get("/metrics")).text
    assert [r.status_code for r in answers] == [200] * 4
    assert hosts.count("one.test") == 1  # tried once, then left to cool
    assert {d["name"]: d["state"] for d in ready} == {"one": "cooling", "two": "up"}
    assert 'model="claude-haiku-4-5"' in scrape  # the upstream name is a label


async def test_a_renamed_model_is_priced_by_the_callers_name_when_only_that_is_known(
    tmp_path: Path,
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."fast"]\ninput = 1.0\noutput = 2.0\n')
    answer = {**MESSAGE, "model": "house-model-7"}  # a name no price table knows

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer)

    async with two_anthropic(handler, upstream="house-model-7", prices=prices) as c:
        r = await c.post("/v1/messages", json=BODY)
        usage = (await c.get("/usage")).json()
    assert r.status_code == 200
    assert usage["cost_usd"] == pytest.approx((3 * 1.0 + 1 * 2.0) / 1e6)


async def test_the_last_deployments_own_refusal_goes_back_as_it_came() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(529, json=OVERLOADED)

    async with two_anthropic(handler) as c:
        r = await c.post("/v1/messages", json=BODY)
    assert r.status_code == 529 and r.json() == OVERLOADED
    assert sorted(hosts) == ["one.test", "two.test"]  # both tried before it went back


def test_llm_models_narrows_the_models_of_the_deployments(tmp_path: Path) -> None:
    text = "[[deployments]]\nname = 'a'\nprovider = 'echo'\nmodels = ['m1', 'm2']\n"
    settings = settings_with(tmp_path, text, LLM_MODELS="m2")
    assert (settings.model, settings.models) == ("m2", ("m2",))


def openai_deployments(*names: str, handler: Callable[[httpx.Request], httpx.Response]) -> Any:
    specs = tuple(
        DeploymentSpec(name=name, provider="openai", base_url=f"http://{name}.test/v1",
                       models=(("m", "m"),))
        for name in names
    )  # fmt: skip
    settings = Settings(deployments=specs, api_keys=(CLIENT_KEY,), max_retries=2)
    app = create_app(settings, transport=httpx.MockTransport(handler))
    return client(app)


CHAT_OK = {
    "id": "c", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}  # fmt: skip


@pytest.mark.parametrize(("names", "tries"), [(("only",), [503, 200]), (("a", "b"), [503, 200])])
async def test_a_deployment_alone_with_its_models_is_retried_and_one_with_others_is_not(
    names: tuple[str, ...], tries: list[int]
) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        status = tries[len(seen) - 1]
        return httpx.Response(status, json=CHAT_OK if status == 200 else {"error": {}})

    async with openai_deployments(*names, handler=handler) as c:
        r = await c.post("/complete", json={"prompt": "hi"})
    assert r.status_code == 200
    if len(names) == 1:
        assert seen == ["only.test", "only.test"]  # its own retry
    else:
        assert len(set(seen)) == 2  # the other deployment is the retry


UNTRANSLATABLE = {
    # a built-in tool: no other format carries it
    "lost": {"model": "m", "input": "hi", "tools": [{"type": "web_search"}]},
    # an output for a call this request does not hold: our decoder refuses it
    "refused": {"model": "m", "input": [{"type": "function_call_output", "call_id": "c9",
                                         "output": "x"}]},
}  # fmt: skip


@pytest.mark.parametrize("which", ["lost", "refused"])
@pytest.mark.parametrize("openai_first", [True, False])
async def test_a_body_that_only_passes_through_goes_only_to_deployments_that_take_it(
    which: str, openai_first: bool
) -> None:
    # Two deployments of one model: OpenAI itself (it serves /responses) and Anthropic
    # (a Responses body is translated to it), in either order in the file.
    specs = (
        DeploymentSpec(name="openai", provider="openai", base_url="https://api.openai.com/v1",
                       api_key=PROVIDER_KEY, models=(("m", "gpt-4o-mini"),)),
        DeploymentSpec(name="claude", provider="anthropic", base_url="http://claude.test",
                       api_key=PROVIDER_KEY, models=(("m", "claude-haiku-4-5"),)),
    )[:: 1 if openai_first else -1]  # fmt: skip
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(
            200,
            json={"id": "resp_1", "object": "response", "status": "completed",
                  "model": "gpt-4o-mini", "output": [],
                  "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}},
        )  # fmt: skip

    settings = Settings(deployments=specs, api_keys=(CLIENT_KEY,), max_retries=0)
    app = create_app(settings, transport=httpx.MockTransport(handler))
    body = UNTRANSLATABLE[which]
    async with client(app) as c:
        answers = [await c.post("/v1/responses", json=body) for _ in range(4)]
        plain = [
            await c.post("/v1/responses", json={"model": "m", "input": "hi"}) for _ in range(2)
        ]
    assert [r.status_code for r in answers] == [200] * 4
    assert hosts[:4] == ["api.openai.com"] * 4
    assert {r.status_code for r in plain} == {200} and "claude.test" in hosts[4:]


async def test_a_body_only_the_fallback_could_take_as_is_still_goes_to_the_first_provider() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, json=CHAT_OK)

    settings = Settings(
        provider="anthropic", anthropic_api_key=PROVIDER_KEY, fallback_provider="openai",
        openai_api_key=PROVIDER_KEY, openai_base_url="http://fallback.test/v1",
        api_keys=(CLIENT_KEY,), max_retries=0,
    )  # fmt: skip
    app = create_app(settings, transport=httpx.MockTransport(handler))
    async with client(app) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        )
    # Anthropic cannot take logprobs: the first provider's 400, not the fallback's answer.
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert seen == []


class Blip(llm.Provider):
    """A provider that fails every call in flight at one moment (a 503 blip): each call
    waits for the blip, then fails."""

    def __init__(self) -> None:
        self.name = "blip"
        self.blip = asyncio.Event()

    async def answer(self, model: str) -> str:
        await self.blip.wait()
        raise llm.ProviderUnavailable("HTTP 503")

    async def stream(self, request: chat.Request) -> AsyncGenerator[chat.Event, None]:
        raise NotImplementedError
        yield


async def test_one_blip_under_many_calls_cools_once_not_once_a_call() -> None:
    """Twenty calls in flight through one 503 blip are one failure: the deployment cools
    for 1 s, as the README says, not 2**19 s (capped at 60) of 503s after it is back."""
    now = [100.0]
    blip, spare = Blip(), Fake("spare")
    deployments = Deployments(
        [Deployment("a", blip, {"m": ""}, weight=1000), Deployment("b", spare, {"m": ""})],
        clock=lambda: now[0],
    )
    calls = [asyncio.ensure_future(call(deployments)) for _ in range(20)]
    await asyncio.sleep(0)  # every call is in flight at the blip
    now[0] = 101.0
    blip.blip.set()
    served = await asyncio.gather(*calls)
    assert set(served) == {"spare:m"}  # each moved on to the other deployment
    a = deployments.all[0]
    assert a.cooling_s(101.0) == 1 and a.failed_calls == 20
    assert a.cooling_s(102.0) == 0  # back after a second


async def test_a_deployment_lets_through_only_the_upstream_choices_it_allows() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=CHAT_OK)

    openrouter = DeploymentSpec(name="openrouter", provider="openai",
                                base_url="http://openrouter.test/v1", models=(("m", "m"),),
                                allow_fields=frozenset({"provider"}))  # fmt: skip
    settings = Settings(deployments=(openrouter,), api_keys=(CLIENT_KEY,), max_retries=0)
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with client(create_app(settings, transport=httpx.MockTransport(handler))) as c:
        routed = await c.post("/v1/chat/completions", json={**ask, "provider": {"sort": "price"}})
        chosen = await c.post("/v1/chat/completions", json={**ask, "models": ["pricey"]})
    assert routed.status_code == 200 and seen[0]["provider"] == {"sort": "price"}
    assert chosen.status_code == 400 and chosen.json()["error"]["param"] == "models"
    assert len(seen) == 1


def test_allow_fields_names_only_the_fields_that_choose_upstream(tmp_path: Path) -> None:
    text = ("[[deployments]]\nname = 'or'\nprovider = 'openai'\nbase_url = 'http://or.test/v1'\n"
            "models = ['m']\nallow_fields = ['provider', 'temperature']\n")  # fmt: skip
    with pytest.raises(SettingsError, match="'allow_fields' lists fields of models, route"):
        settings_with(tmp_path, text)
