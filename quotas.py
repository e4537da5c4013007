"""Token limits and spend budgets per key: reserved at admission, settled after.

Admission reserves a request's worst case (an estimate of its input plus its
`max_tokens`, and for a budget that many tokens at the model's prices) before any
provider call, so concurrent requests cannot all slip under a limit together; when
the call ends the reservation is settled with the provider's reported usage (or
released, when nothing was served), so the final counts are exact.

`Quotas` keeps them in this process's memory; `redis_store.RedisQuotas` shares them
between replicas.
"""

from __future__ import annotations

import calendar
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from auth import ApiKey
from config import Rate
from errors import ApiError, whole_seconds

RESERVATION = "text_tool.reservation"


class Hold(Protocol):
    """What admission reserved for one call, until the call is accounted."""

    def settle(self, tokens: int, cost: float | None) -> None: ...

    def release(self) -> None: ...


@dataclass(eq=False)
class Reservation:
    quotas: Quotas
    key: str
    entry: list[float] | None  # [time, tokens] in the key's token window
    period: tuple[str, str] | None  # (key, "2026-11-28") the budget's bucket
    cost: float
    settled: bool = field(default=False)

    def settle(self, tokens: int, cost: float | None) -> None:
        """Replace the worst case with what the call really used."""
        if self.settled:
            return
        self.settled = True
        if self.entry is not None:
            self.entry[1] = tokens
        if self.period is not None:
            spent = self.quotas.spent
            spent[self.period] = spent.get(self.period, 0.0) - self.cost + (cost or 0.0)

    def release(self) -> None:
        """Nothing was served (an error before the provider answered)."""
        self.settle(0, 0.0)


def _refused(type_: str, message: str, wait_s: float) -> ApiError:
    return ApiError(429, type_, message, headers={"Retry-After": str(whole_seconds(wait_s))})


def period_bucket(period: str, now: float) -> tuple[str, float]:
    """The UTC day or month `now` falls in, and the seconds until it ends."""
    t = time.gmtime(now)
    if period == "month":
        days = calendar.monthrange(t.tm_year, t.tm_mon)[1]
        end = calendar.timegm((t.tm_year, t.tm_mon, days, 0, 0, 0)) + 86400
        return f"{t.tm_year:04d}-{t.tm_mon:02d}", end - now
    end = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", end - now


class Quotas:
    def __init__(
        self,
        *,
        default_token_limit: Rate | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.default_token_limit = default_token_limit
        self._clock = clock
        self._wall = wall_clock
        self.windows: dict[str, deque[list[float]]] = {}
        self.spent: dict[tuple[str, str], float] = {}

    def applies(self, key: ApiKey) -> bool:
        return bool(key.token_limit or self.default_token_limit or key.budget_usd is not None)

    def restore(
        self, spent: Mapping[tuple[str, str], float], calls: Iterable[tuple[str, float, int]]
    ) -> None:
        """What the ledger says was spent this period (by key and bucket, as `reserve`
        keeps it) and each recent call's (key, wall-clock time, tokens): read at start, so
        that a restart gives no key a fresh budget or an empty token window."""
        for bucket, cost in spent.items():
            self.spent[bucket] = self.spent.get(bucket, 0.0) + cost
        now, wall = self._clock(), self._wall()
        for name, at, tokens in calls:
            self.windows.setdefault(name, deque()).append([now - (wall - at), float(tokens)])

    async def reserve(self, key: ApiKey, tokens: int, cost: float) -> Hold:
        """Admit `tokens` and `cost` for `key`, or raise a 429 before any provider call.
        Nothing is awaited: concurrent requests are decided one after the other."""
        entry = self._reserve_tokens(key, tokens, cost)
        period = None
        if key.budget_usd is not None:
            bucket, left_s = period_bucket(key.budget_period, self._wall())
            period = (key.name, bucket)
            spent = self.spent.get(period, 0.0)
            if spent + cost > key.budget_usd:
                if entry is not None:
                    entry[1] = 0  # give the tokens back
                raise self.refusal(key, "budget", tokens, cost, spent, left_s)
            self.spent[period] = spent + cost
        return Reservation(self, key.name, entry, period, cost if period else 0.0)

    def refusal(
        self, key: ApiKey, what: str, tokens: int, cost: float, used: float, wait_s: float
    ) -> ApiError:
        """The 429 for a reservation that did not fit (`what`: "tokens" or "budget")."""
        if what == "budget":
            return _refused(
                "budget_exceeded",
                f"the {key.budget_period}'s budget of ${key.budget_usd:g} is spent "
                f"(${used:.4f} so far, this request may cost up to ${cost:.4f})",
                wait_s,
            )
        rate = key.token_limit or self.default_token_limit
        limit = rate.count if rate else 0
        return _refused(
            "rate_limit_exceeded",
            f"{limit} tokens per {rate.window_s if rate else 0} s; this request may use up "
            f"to {tokens}, {max(limit - int(used), 0)} are left",
            wait_s,
        )

    def _reserve_tokens(self, key: ApiKey, tokens: int, cost: float) -> list[float] | None:
        rate = key.token_limit or self.default_token_limit
        if rate is None:
            return None
        now = self._clock()
        window = self.windows.setdefault(key.name, deque())
        while window and window[0][0] <= now - rate.window_s:
            window.popleft()
        used = sum(entry[1] for entry in window)
        if used + tokens > rate.count:
            # Wait until enough of the oldest reservations leave the window.
            need, wait = used + tokens - rate.count, float(rate.window_s)
            for at, amount in window:
                need -= amount
                if need <= 0:
                    wait = at + rate.window_s - now
                    break
            raise self.refusal(key, "tokens", tokens, cost, used, wait)
        entry = [now, float(tokens)]
        window.append(entry)
        return entry
