"""Settings: read once from the environment (and `.env`), then passed around as one object.

`create_app(settings=...)` takes a `Settings` so that tests and embedding apps never
patch the environment. A bad value raises `SettingsError` naming the variable, and the
entry point turns that into one line on stderr instead of a traceback at first request.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
class DeploymentSpec:
    """One deployment of the LLM_DEPLOYMENTS file: a provider at a base URL with its
    key, the models it serves (each under its upstream name), its weight among the
    deployments of a model, and its priority (a higher one is tried only when every
    deployment of a lower one failed or is cooling down)."""

    name: str
    provider: str
    base_url: str
    api_key: str = field(default="", repr=False)
    models: tuple[tuple[str, str], ...]  # (the name callers use, the name upstream)
    weight: float = 1.0
    priority: int = 0


_DEPLOYMENT_FIELDS = {"name", "provider", "base_url", "api_key", "api_key_env", "models",
                      "weight", "priority"}  # fmt: skip


def toml_tables(
    setting: str, path: Path, table: str, fields: set[str]
) -> list[tuple[str, Mapping[str, Any]]]:
    """The `[[table]]` entries of the TOML file a setting names, each with where it is
    (for the messages), every entry a table of known fields: or a SettingsError."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, ValueError) as exc:  # ValueError: not TOML, or not UTF-8
        raise SettingsError(f"{setting}: cannot read {path}: {exc}") from None
    entries = data.get(table, [])
    if not isinstance(entries, list):
        raise SettingsError(f"{setting}: expected [[{table}]] tables")
    found = []
    for index, entry in enumerate(entries):
        where = f"{setting}: {table}[{index}]"
        if not isinstance(entry, Mapping):
            raise SettingsError(f"{where}: expected a table")
        unknown = set(entry) - fields
        if unknown:
            raise SettingsError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
        found.append((where, entry))
    return found


def unique_names(setting: str, names: list[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SettingsError(f"{setting}: names must be unique: {', '.join(duplicates)}")


def read_deployments(path: Path, environ: Callable[[str], str]) -> tuple[DeploymentSpec, ...]:
    """The LLM_DEPLOYMENTS file, every mistake in it a SettingsError naming the entry."""
    tables = toml_tables("LLM_DEPLOYMENTS", path, "deployments", _DEPLOYMENT_FIELDS)
    if not tables:
        raise SettingsError("LLM_DEPLOYMENTS: expected one or more [[deployments]] tables")
    specs = [_deployment(where, entry, environ) for where, entry in tables]
    unique_names("LLM_DEPLOYMENTS", [spec.name for spec in specs])
    return tuple(specs)


def _deployment(
    where: str, entry: Mapping[str, Any], environ: Callable[[str], str]
) -> DeploymentSpec:
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", name):
        raise SettingsError(f"{where}: 'name' is required: 1-64 of A-Z a-z 0-9 . _ : -")
    where = f"LLM_DEPLOYMENTS: {name}"
    provider = entry.get("provider")
    if provider not in PROVIDERS:
        raise SettingsError(f"{where}: 'provider' must be one of {', '.join(PROVIDERS)}")
    default_base = {"openai": OPENAI_BASE_URL, "anthropic": ANTHROPIC_BASE_URL}.get(provider, "")
    base = entry.get("base_url", default_base)
    if not isinstance(base, str) or (provider != "echo" and not re.match(r"^https?://", base)):
        raise SettingsError(f"{where}: 'base_url' must be an http:// or https:// URL")
    key = entry.get("api_key", "")
    if "api_key_env" in entry:
        variable = entry["api_key_env"]
        if "api_key" in entry or not isinstance(variable, str):
            raise SettingsError(f"{where}: give 'api_key' or 'api_key_env' (a variable's name)")
        key = environ(variable)
        if not key:
            raise SettingsError(f"{where}: the environment variable {variable} is not set")
    if not isinstance(key, str):
        raise SettingsError(f"{where}: 'api_key' must be a string")
    if not key and (provider == "anthropic" or base.rstrip("/") == OPENAI_BASE_URL):
        raise SettingsError(f"{where}: 'api_key' or 'api_key_env' is required for {base}")
    raw_models = entry.get("models")
    if isinstance(raw_models, list):
        raw_models = {model: model for model in raw_models}
    if not (
        isinstance(raw_models, Mapping)
        and raw_models
        and all(isinstance(k, str) and k and isinstance(v, str) and v
                for k, v in raw_models.items())
    ):  # fmt: skip
        raise SettingsError(
            f"{where}: 'models' must list model names, or map each to its upstream name"
        )
    weight = entry.get("weight", 1)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not (weight > 0 and math.isfinite(weight))
    ):
        raise SettingsError(f"{where}: 'weight' must be a positive number")
    priority = entry.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise SettingsError(f"{where}: 'priority' must be a whole number, 0 or more")
    return DeploymentSpec(
        name=name,
        provider=provider,
        base_url=base.rstrip("/"),
        api_key=key,
        models=tuple(raw_models.items()),
        weight=float(weight),
        priority=priority,
    )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service reads from its environment, typed and validated."""

    provider: str = "echo"
    model: str = ""
    models: tuple[str, ...] = ()
    fallback_provider: str = ""
    fallback_model: str = ""
    deployments: tuple[DeploymentSpec, ...] = ()  # LLM_DEPLOYMENTS; none: the provider above
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
    otel_endpoint: str = ""  # OTLP/HTTP base URL; none: no traces, no OpenTelemetry loaded
    otel_service: str = "text-tool"
    otel_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # a collector's auth
    otel_capture_content: bool = False  # prompt and completion text in the spans
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
        if self.deployments:
            self._check_deployments()
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
            ("LLM_PROVIDER", "" if self.deployments else self.provider),
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
        if self.otel_endpoint:
            if not re.match(r"^https?://[^/\s]+", self.otel_endpoint):
                raise SettingsError(
                    f"OTEL_EXPORTER_OTLP_ENDPOINT: {self.otel_endpoint!r} is not an http(s) URL"
                )
            if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
                raise SettingsError(
                    "OTEL_EXPORTER_OTLP_ENDPOINT: traces need the otel extra (uv sync --extra otel)"
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
        if not (self.concurrency_lease_s >= 1 and math.isfinite(self.concurrency_lease_s)):
            raise SettingsError(
                f"CONCURRENCY_LEASE_S: must be 1 second or more, got {self.concurrency_lease_s}"
            )
        if self.key_max_concurrent is not None and self.key_max_concurrent < 1:
            raise SettingsError(
                f"KEY_MAX_CONCURRENT: must be positive, got {self.key_max_concurrent}"
            )
        if self.max_retries < 0:
            raise SettingsError(f"LLM_MAX_RETRIES: must be 0 or more, got {self.max_retries}")

    def _check_deployments(self) -> None:
        if self.fallback_provider or self.fallback_model:
            raise SettingsError(
                "LLM_FALLBACK_PROVIDER: with LLM_DEPLOYMENTS, a fallback is a deployment "
                "with a higher priority"
            )
        served = list(dict.fromkeys(m for d in self.deployments for m, _ in d.models))
        object.__setattr__(self, "provider", self.deployments[0].provider)
        if not self.model:
            object.__setattr__(self, "model", self.models[0] if self.models else served[0])
        if not self.models:
            object.__setattr__(self, "models", tuple(served))
        unserved = [m for m in (self.model, *self.models) if m not in served]
        if unserved:
            raise SettingsError(
                f"LLM_MODELS: no deployment of LLM_DEPLOYMENTS serves {', '.join(unserved)}"
            )

    @functools.cached_property
    def upstream_names(self) -> dict[str, str]:
        """Each model callers name, and its name at the first deployment serving it:
        what prices a call before it is known which deployment serves it."""
        first: dict[str, str] = {}
        for spec in sorted(self.deployments, key=lambda d: d.priority):
            for model, upstream in spec.models:
                first.setdefault(model, upstream)
        return first

    def serves_responses(self, base_url: str) -> bool:
        """Whether a Responses body passes through to an OpenAI provider at `base_url`:
        by default only api.openai.com serves it; most OpenAI-compatible servers speak
        only Chat Completions, so to them it is translated."""
        if self.openai_responses == "auto":
            return base_url.rstrip("/") == OPENAI_BASE_URL
        return self.openai_responses == "on"

    @property
    def openai_serves_responses(self) -> bool:
        return self.serves_responses(self.openai_base_url)

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
        deployments: tuple[DeploymentSpec, ...] = ()
        if get("LLM_DEPLOYMENTS"):
            deployments = read_deployments(Path(get("LLM_DEPLOYMENTS")), get)
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
            deployments=deployments,
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
            otel_endpoint=get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            otel_service=get("OTEL_SERVICE_NAME") or "text-tool",
            otel_headers=_headers(
                "OTEL_EXPORTER_OTLP_HEADERS",
                get("OTEL_EXPORTER_OTLP_HEADERS") if get("OTEL_EXPORTER_OTLP_ENDPOINT") else "",
            ),
            otel_capture_content=_flag(
                "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
                get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "false"),
            ),
        )


def _headers(name: str, value: str) -> tuple[tuple[str, str], ...]:
    """`key=value,key2=value2`, as OpenTelemetry's exporters take them (values
    percent-encoded)."""
    from urllib.parse import unquote

    pairs = []
    for item in _split(value):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{name}: expected key=value pairs separated by commas")
        pairs.append((key.strip().lower(), unquote(val.strip())))
    return tuple(pairs)


def _flag(name: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off", ""):
        return False
    raise SettingsError(f"{name}: {value!r} is not true or false")


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())
