"""Which deployment serves a call: each provider at its address, with its models
(under their upstream names), its weight and priority, and its health. A call goes to
the healthy deployment of its model with the fewest calls in flight for its weight;
one that fails before its answer began is cooled down, and the call moves on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from config import DeploymentSpec, Settings
from errors import ApiError, ProviderBadRequest, ProviderError, ProviderRateLimited, ProviderTimeout
from llm import (
    CODECS,
    Bounds,
    Codec,
    EchoProvider,
    HttpProvider,
    Provider,
    RetryPolicy,
    passthrough,
)
from upstream import SharedClient

logger = logging.getLogger("text_tool")
T = TypeVar("T")

# The longest a deployment is cooled down for: a provider's Retry-After, or a growing
# interval (1 s, 2 s, 4 s... after failures in a row), never more than this.
MOST_COOLING_S = 60.0


class Deployment:
    """One provider at one address, with the models it serves (each under its upstream
    name, or `""` for its own; `*`: any model), its weight and priority,
    and its health: cooled down after a failure before the first byte of an answer,
    so calls go elsewhere until it has had time to come back."""

    def __init__(
        self,
        name: str,
        provider: Provider,
        models: Mapping[str, str],
        *,
        weight: float = 1.0,
        priority: int = 0,
        cools: bool = True,
    ) -> None:
        self.name = name
        self.provider = provider
        self.models = dict(models)
        self.weight = weight
        self.priority = priority
        self.cools = cools  # the single provider of the settings (and its fallback) do not
        self.cooling_until = 0.0
        self.cooled_at = -math.inf  # when the last period of cooling began
        self.calls = 0  # begun here
        self.failed_calls = 0  # of them, failed before the answer began
        self.failures = 0  # in a row
        self.failed_at = -math.inf
        self.current = 0.0  # smooth weighted round robin, among equally loaded ones

    def upstream(self, model: str) -> str | None:
        """The model's name upstream, or None: not served here."""
        name = self.models.get(model, self.models.get("*"))
        return None if name is None else name or model

    def cooling_s(self, now: float) -> float:
        return max(0.0, self.cooling_until - now)

    def failed(self, exc: ProviderError, now: float, began: float | None = None) -> None:
        """A call (begun at `began`) failed before its answer began. A call begun before
        the deployment's cooling did is the same failure seen again (twenty calls in
        flight through one 503 blip): it does not make the cooling grow."""
        self.failed_calls += 1
        self.failed_at = now
        if began is not None and began < self.cooled_at:
            return
        self.failures += 1
        if not self.cools or isinstance(exc, ProviderTimeout):
            return  # a timeout may be a slow answer, not a sick deployment
        wait = exc.retry_after_s if isinstance(exc, ProviderRateLimited) else None
        if wait is None:
            wait = 2.0 ** min(self.failures - 1, 8)
        self.cooling_until = now + min(wait, MOST_COOLING_S)
        self.cooled_at = now

    def served(self, began: float) -> None:
        """A call begun at `began` was answered: the deployment is well again, unless
        it has failed since (a long call outliving the deployment's death says nothing)."""
        if began >= self.failed_at:
            self.failures, self.cooling_until = 0, 0.0

    def state(self, now: float) -> dict[str, Any]:
        """What /ready shows of it."""
        cooling = self.cooling_s(now)
        shown: dict[str, Any] = {
            "name": self.name,
            "provider": self.provider.name,
            "state": "cooling" if cooling else "up",
            "in_flight": self.provider.inflight,
            "weight": self.weight,
            "priority": self.priority,
            "calls": self.calls,
            "failed_calls": self.failed_calls,
        }
        if cooling:
            shown["cooling_s"] = round(cooling, 1)
        if self.failures:  # what failed is in the log (provider_fallback), not here: public
            shown["failures_in_a_row"] = self.failures
        return shown


class Deployments:
    """The app's providers: for each call, the healthy deployment of its model with the
    fewest calls in flight relative to its weight (equally loaded ones taken in turn,
    by weight); on a failure before the answer began, the next, until every one has
    been tried or the retry deadline passed. A request the provider refused as invalid
    is not tried again elsewhere: it is the request that is wrong. A deployment of a
    higher priority is tried only when none of the lowest is left; every one cooling
    down is a 503 with Retry-After until the first is back. The answer names the model
    that served."""

    def __init__(
        self,
        deployments: Iterable[Deployment],
        *,
        deadline_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # cooling, deadlines and states are read from it
        self.all = sorted(deployments, key=lambda d: d.priority)
        self.deadline_s = deadline_s
        self.name = self.all[0].provider.name  # what /v1/models says owns the models

    def first(self, model: str) -> tuple[Provider, str]:
        """The provider a call of `model` goes to first (not cooling down, if one is
        not), and the model's name there: what decides whether a client's body could
        pass through, and where a token count is asked."""
        now = self.clock()
        serving = [d for d in self.all if d.upstream(model) is not None] or self.all[:1]
        d = next((d for d in serving if not d.cooling_s(now)), serving[0])
        return d.provider, d.upstream(model) or model

    def takes(self, model: str, wire: str) -> bool:
        """Whether a deployment of `model` takes a body in `wire` format as it is."""
        return any(passthrough(d.provider, wire) for d in self.all if d.upstream(model) is not None)

    async def run(
        self,
        model: str,
        attempt: Callable[[Provider, str], Awaitable[T]],
        *,
        fallback: bool = True,
        noted: dict[str, Any] | None = None,
        as_is: str | None = None,
    ) -> T:
        """`attempt(provider, upstream model)` on one deployment after another, as above;
        `fallback=False`: only those of the first priority. `noted`: the call's fields
        for the access line, where the deployment that served is written. `as_is`: a
        body that only passes through (in that wire format) goes only to deployments
        that take it, if any of the first priority does."""
        candidates = [d for d in self.all if d.upstream(model) is not None]
        if as_is is not None and candidates:  # among the first priority, which a fallback follows
            first = candidates[0].priority
            taking = [
                d for d in candidates if d.priority != first or passthrough(d.provider, as_is)
            ]
            if any(d.priority == first for d in taking):
                candidates = taking
        if not fallback and candidates:
            candidates = [d for d in candidates if d.priority == candidates[0].priority]
        serving = list(candidates)  # what a 503 waits for, when all of them are cooling
        started = self.clock()
        last: ProviderError | None = None
        while True:
            now = self.clock()
            pick = self._pick(candidates, now)
            if pick is None:
                break
            candidates.remove(pick)
            if last is not None:
                logger.warning(
                    "deployment failed; trying the next",
                    extra={"event": "provider_fallback", "error": str(last),
                           "deployment": pick.name, "model": pick.upstream(model)},
                )  # fmt: skip
            if noted is not None:
                noted["deployment"], noted["provider"] = pick.name, pick.provider.name
            pick.calls += 1
            try:
                result = await attempt(pick.provider, pick.upstream(model) or model)
            except ProviderError as exc:
                if isinstance(exc, ProviderBadRequest):
                    raise
                pick.failed(exc, self.clock(), began=now)
                last = exc
                if self.clock() - started > self.deadline_s:
                    raise
                continue
            pick.served(now)
            return result
        if last is not None:
            raise last
        raise self._all_cooling(model, serving)

    def _pick(self, candidates: list[Deployment], now: float) -> Deployment | None:
        ready = [d for d in candidates if not d.cooling_s(now)]
        if not ready:
            return None
        ready = [d for d in ready if d.priority == ready[0].priority]
        least = min(d.provider.inflight / d.weight for d in ready)
        even = [d for d in ready if d.provider.inflight / d.weight == least]
        if len(even) == 1:
            return even[0]
        total = 0.0
        for d in even:  # nginx's smooth weighted round robin
            d.current += d.weight
            total += d.weight
        chosen = max(even, key=lambda d: d.current)
        chosen.current -= total
        return chosen

    def _all_cooling(self, model: str, serving: list[Deployment]) -> ApiError:
        now = self.clock()
        waits = [d.cooling_s(now) for d in serving]
        wait = max(1, math.ceil(min(waits, default=1.0)))
        return ApiError(
            503,
            "upstream_unavailable",
            f"every deployment of {model} is cooling down after failing; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    def states(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [d.state(now) for d in self.all]


def make_deployments(
    settings: Settings, client: SharedClient, codecs: Mapping[str, Codec] = CODECS
) -> Deployments:
    """The app's providers, from its settings: the LLM_DEPLOYMENTS file's, or the one
    provider (and its fallback, as a deployment of a higher priority that serves every
    model under LLM_FALLBACK_MODEL); `codecs` by provider kind ("openai", "anthropic")."""
    if settings.deployments:
        specs = settings.deployments
        made = []
        for spec in specs:
            # The next deployment is the retry; one with no other for its models is
            # retried itself, as the single provider is.
            retries = None if _alone(spec, specs) else 0
            provider = _make(spec.provider, settings, client, codecs, spec.base_url,
                             spec.api_key, retries=retries, allows=spec.allow_fields)  # fmt: skip
            made.append(
                Deployment(
                    spec.name,
                    provider,
                    dict(spec.models),
                    weight=spec.weight,
                    priority=spec.priority,
                )  # fmt: skip
            )
        return Deployments(made, deadline_s=settings.retry_deadline_s)
    kind = settings.provider
    base, key = _address(kind, settings)
    first = Deployment(
        kind, _make(kind, settings, client, codecs, base, key), {"*": ""}, cools=False
    )
    if not settings.fallback_provider:
        return Deployments([first], deadline_s=math.inf)
    kind = settings.fallback_provider
    base, key = _address(kind, settings)
    second = Deployment(
        "fallback-" + kind,
        _make(kind, settings, client, codecs, base, key),
        {"*": settings.fallback_model},
        priority=1,
        cools=False,
    )
    return Deployments([first, second], deadline_s=math.inf)


def _alone(spec: DeploymentSpec, specs: Iterable[DeploymentSpec]) -> bool:
    """No other deployment serves any of its models."""
    others = {model for other in specs if other is not spec for model, _ in other.models}
    return not others & {model for model, _ in spec.models}


def _address(kind: str, settings: Settings) -> tuple[str, str]:
    if kind == "openai":
        return settings.openai_base_url, settings.openai_api_key
    if kind == "anthropic":
        return settings.anthropic_base_url, settings.anthropic_api_key
    return "", ""


def _make(
    kind: str,
    settings: Settings,
    client: SharedClient,
    codecs: Mapping[str, Codec],
    base: str,
    key: str,
    *,
    retries: int | None = None,
    allows: frozenset[str] = frozenset(),
) -> Provider:
    if kind == "echo":
        return EchoProvider()
    codec = codecs[kind]
    also: dict[str, str] = {}
    if kind == "openai":
        also["openai_embeddings"] = "/embeddings"  # what every OpenAI-protocol server serves
        if settings.serves_responses(base):
            also["openai_responses"] = "/responses"
    return HttpProvider(
        client,
        name=kind,
        codec=codec,
        url=base + codec.PATH,
        headers=codec.auth_headers(key),
        secret=key,
        retry=RetryPolicy(
            retries=settings.max_retries if retries is None else retries,
            deadline_s=settings.retry_deadline_s,
        ),
        bounds=Bounds(
            max_response_bytes=settings.max_response_bytes,
            total_s=settings.total_timeout_s,
            idle_s=settings.timeout_s,
            first_byte_s=settings.first_byte_timeout_s,
        ),
        also=also,
        allows=allows,
    )
