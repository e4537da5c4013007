"""Settings: read once from the environment (and `.env`), then passed around as one object.

`create_app(settings=...)` takes a `Settings` so that tests and embedding apps never
patch the environment. A bad value raises `SettingsError` naming the variable, and the
entry point turns that into one line on stderr instead of a traceback at first request.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from starlette.config import Config

PROVIDERS = ("openai", "anthropic", "echo")

DEFAULT_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
    "echo": "echo",
}

OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"

_PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")
_ORIGIN = re.compile(r"^https?://[^/\s]+$")  # a scheme and a host[:port], no path


class SettingsError(ValueError):
    """A setting could not be parsed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` events in any window of `window_s` seconds."""

    count: int
    window_s: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(text.lower())
        if not match or match.group(2) not in _PERIODS or int(match.group(1)) < 1:
            raise ValueError(f"{text!r} is not a rate like 60/minute (per second, minute or hour)")
        return cls(int(match.group(1)), _PERIODS[match.group(2)])

    def __str__(self) -> str:
        unit = {1: "second", 60: "minute", 3600: "hour"}.get(self.window_s)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.window_s}s"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service reads from its environment, typed and validated."""

    provider: str = "echo"
    model: str = ""
    models: tuple[str, ...] = ()
    fallback_provider: str = ""
    fallback_model: str = ""
    openai_api_key: str = field(default="", repr=False)
    openai_base_url: str = OPENAI_BASE_URL
    openai_responses: str = "auto"  # does the OpenAI provider serve /responses itself?
    anthropic_api_key: str = field(default="", repr=False)
    anthropic_base_url: str = ANTHROPIC_BASE_URL
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: Path | None = None
    rate_limit: Rate = Rate(60, 60)
    token_limit: Rate | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 600.0
    max_response_bytes: int = 16 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    max_inflight: int = 2048
    key_max_concurrent: int | None = None  # calls in flight per key, unless its own says
    concurrency_lease_s: float = 10.0  # a shared slot outlives a dead replica this long
    max_retries: int = 2
    retry_deadline_s: float = 30.0
    shutdown_grace_s: float = 15.0
    ping_interval_s: float = 15.0
    prices_file: Path | None = None
    log_format: str = "json"
    transport: str = "aiohttp"
    rate_limit_store: str = "memory"
    rate_limit_store_fail: str = "open"
    cors_origins: tuple[str, ...] = ()  # the origins of pages that may call it
    provider_was_defaulted: bool = False

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise SettingsError(
                f"LLM_PROVIDER: {self.provider!r} is not one of {', '.join(PROVIDERS)}"
            )
        if self.fallback_provider and self.fallback_provider not in PROVIDERS:
            raise SettingsError(
                f"LLM_FALLBACK_PROVIDER: {self.fallback_provider!r} is not one of "
                f"{', '.join(PROVIDERS)}"
            )
        if self.fallback_model and not self.fallback_provider:
            object.__setattr__(self, "fallback_provider", self.provider)
        if self.fallback_provider and not self.fallback_model:
            object.__setattr__(self, "fallback_model", DEFAULT_MODELS[self.fallback_provider])
        if not self.model:
            object.__setattr__(self, "model", DEFAULT_MODELS[self.provider])
        if not self.models:
            object.__setattr__(self, "models", (self.model,))
        elif self.model not in self.models:
            object.__setattr__(self, "models", (self.model, *self.models))
        for setting, kind in (
            ("LLM_PROVIDER", self.provider),
            ("LLM_FALLBACK_PROVIDER", self.fallback_provider),
        ):
            if kind == "anthropic" and not self.anthropic_api_key:
                raise SettingsError(f"ANTHROPIC_API_KEY: required when {setting}=anthropic")
            if (
                kind == "openai"
                and not self.openai_api_key
                and self.openai_base_url.rstrip("/") == OPENAI_BASE_URL
            ):
                raise SettingsError(
                    f"OPENAI_API_KEY: required when {setting}=openai talks to api.openai.com "
                    "(set OPENAI_BASE_URL for a server that needs no key)"
                )
        for name, value in (
            ("LLM_TIMEOUT_S", self.timeout_s),
            ("LLM_CONNECT_TIMEOUT_S", self.connect_timeout_s),
            ("LLM_TOTAL_TIMEOUT_S", self.total_timeout_s),
            ("BODY_TIMEOUT_S", self.body_timeout_s),
            ("HEADER_TIMEOUT_S", self.header_timeout_s),
            ("LLM_RETRY_DEADLINE_S", self.retry_deadline_s),
            ("SHUTDOWN_GRACE_S", self.shutdown_grace_s),
            ("CONCURRENCY_LEASE_S", self.concurrency_lease_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise SettingsError(f"{name}: must be a positive number of seconds, got {value}")
        store = self.rate_limit_store
        if store != "memory" and not store.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                f"RATE_LIMIT_STORE: {store!r} is not memory or a redis://host:port/db URL"
            )
        if store != "memory" and importlib.util.find_spec("redis") is None:
            raise SettingsError(
                "RATE_LIMIT_STORE: a Redis store needs the redis extra (uv sync --extra redis)"
            )
        if self.rate_limit_store_fail not in ("open", "closed"):
            raise SettingsError(
                f"RATE_LIMIT_STORE_FAIL: {self.rate_limit_store_fail!r} is not open or closed"
            )
        if self.transport not in ("aiohttp", "httpx"):
            raise SettingsError(f"LLM_TRANSPORT: {self.transport!r} is not aiohttp or httpx")
        if self.openai_responses not in ("auto", "on", "off"):
            raise SettingsError(
                f"OPENAI_RESPONSES: {self.openai_responses!r} is not auto, on or off"
            )
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise SettingsError(
                    f"CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com"
                )
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"LOG_FORMAT: {self.log_format!r} is not json or text")
        if self.max_response_bytes < 1024:
            raise SettingsError(
                f"LLM_MAX_RESPONSE_BYTES: must be at least 1024, got {self.max_response_bytes}"
            )
        if self.max_header_bytes < 1024:
            raise SettingsError(
                f"MAX_HEADER_BYTES: must be at least 1024, got {self.max_header_bytes}"
            )
        if self.max_body_bytes < 1:
            raise SettingsError(f"MAX_BODY_BYTES: must be positive, got {self.max_body_bytes}")
        if not (self.ping_interval_s > 0 and math.isfinite(self.ping_interval_s)):
            raise SettingsError(
                f"SSE_PING_INTERVAL_S: must be a positive number, got {self.ping_interval_s}"
            )
        if self.max_inflight < 1:
            raise SettingsError(f"MAX_INFLIGHT: must be positive, got {self.max_inflight}")
        if self.key_max_concurrent is not None and self.key_max_concurrent < 1:
            raise SettingsError(
                f"KEY_MAX_CONCURRENT: must be positive, got {self.key_max_concurrent}"
            )
        if self.max_retries < 0:
            raise SettingsError(f"LLM_MAX_RETRIES: must be 0 or more, got {self.max_retries}")

    @property
    def openai_serves_responses(self) -> bool:
        """Whether a Responses body passes through to the OpenAI provider: by default
        only api.openai.com serves it; most OpenAI-compatible servers speak only Chat
        Completions, so to them it is translated."""
        if self.openai_responses == "auto":
            return self.openai_base_url.rstrip("/") == OPENAI_BASE_URL
        return self.openai_responses == "on"

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests use it to vary one setting)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Parse the environment; `.env` in the working directory fills in what it lacks."""
        path = Path(env_file) if env_file is not None else None
        config = Config(
            path if path is not None and path.is_file() else None,
            environ=os.environ if environ is None else environ,
        )

        def get(name: str, default: str = "") -> str:
            return str(config(name, default=default)).strip()

        def number(name: str, default: str, kind: type[float] | type[int]) -> float:
            raw = get(name, default)
            try:
                return kind(raw)
            except ValueError:
                raise SettingsError(f"{name}: {raw!r} is not a number") from None

        openai_key = get("OPENAI_API_KEY")
        openai_base = get("OPENAI_BASE_URL")
        anthropic_key = get("ANTHROPIC_API_KEY")
        provider = get("LLM_PROVIDER").lower()
        defaulted = not provider
        if defaulted:
            provider = (
                "openai"
                if openai_key or openai_base
                else ("anthropic" if anthropic_key else "echo")
            )
        try:
            rate = Rate.parse(get("RATE_LIMIT", "60/minute"))
        except ValueError as exc:
            raise SettingsError(f"RATE_LIMIT: {exc}") from None
        token_limit = None
        if get("TOKEN_LIMIT"):
            try:
                token_limit = Rate.parse(get("TOKEN_LIMIT"))
            except ValueError as exc:
                raise SettingsError(f"TOKEN_LIMIT: {exc}") from None
        keys_file = get("API_KEYS_FILE")
        if keys_file and not Path(keys_file).is_file():
            raise SettingsError(f"API_KEYS_FILE: {keys_file} is not a readable file")
        key_max_concurrent = None
        if get("KEY_MAX_CONCURRENT"):
            key_max_concurrent = int(number("KEY_MAX_CONCURRENT", "", int))
        prices_file = get("PRICES_FILE")
        if prices_file and not Path(prices_file).is_file():
            raise SettingsError(f"PRICES_FILE: {prices_file} is not a readable file")
        return cls(
            provider=provider,
            provider_was_defaulted=defaulted,
            model=get("LLM_MODEL"),
            models=_split(get("LLM_MODELS")),
            fallback_provider=get("LLM_FALLBACK_PROVIDER").lower(),
            fallback_model=get("LLM_FALLBACK_MODEL"),
            openai_api_key=openai_key,
            openai_base_url=(openai_base or OPENAI_BASE_URL).rstrip("/"),
            openai_responses=get("OPENAI_RESPONSES", "auto").lower(),
            anthropic_api_key=anthropic_key,
            anthropic_base_url=(get("ANTHROPIC_BASE_URL") or ANTHROPIC_BASE_URL).rstrip("/"),
            api_keys=_split(get("API_KEYS")),
            api_keys_file=Path(keys_file) if keys_file else None,
            rate_limit=rate,
            token_limit=token_limit,
            timeout_s=number("LLM_TIMEOUT_S", "60", float),
            connect_timeout_s=number("LLM_CONNECT_TIMEOUT_S", "5", float),
            total_timeout_s=number("LLM_TOTAL_TIMEOUT_S", "600", float),
            max_response_bytes=int(number("LLM_MAX_RESPONSE_BYTES", str(16 * 1024 * 1024), int)),
            max_body_bytes=int(number("MAX_BODY_BYTES", str(1024 * 1024), int)),
            body_timeout_s=number("BODY_TIMEOUT_S", "30", float),
            max_header_bytes=int(number("MAX_HEADER_BYTES", str(64 * 1024), int)),
            header_timeout_s=number("HEADER_TIMEOUT_S", "10", float),
            max_inflight=int(number("MAX_INFLIGHT", "2048", int)),
            key_max_concurrent=key_max_concurrent,
            concurrency_lease_s=number("CONCURRENCY_LEASE_S", "10", float),
            max_retries=int(number("LLM_MAX_RETRIES", "2", int)),
            retry_deadline_s=number("LLM_RETRY_DEADLINE_S", "30", float),
            shutdown_grace_s=number("SHUTDOWN_GRACE_S", "15", float),
            ping_interval_s=number("SSE_PING_INTERVAL_S", "15", float),
            prices_file=Path(prices_file) if prices_file else None,
            log_format=get("LOG_FORMAT", "json").lower(),
            transport=get("LLM_TRANSPORT", "aiohttp").lower(),
            rate_limit_store=get("RATE_LIMIT_STORE", "memory"),
            rate_limit_store_fail=get("RATE_LIMIT_STORE_FAIL", "open").lower(),
            cors_origins=_split(get("CORS_ORIGINS")),
        )


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())
