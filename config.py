"""Settings: read once from the environment (and `.env`), then passed around as one object.

One table says what each environment variable is: the fields of `Settings`, each made by
`row()` with the variable's name, its parser, its default, its check and a line about it.
`Settings.from_env` reads the environment by it and `Settings(...)` checks values by it; a bad
value raises `SettingsError` naming the variable, which the entry point prints as one line
instead of a traceback at the first request; tests/test_settings_table.py holds the README's
table and `.env.example` to it. What depends on other settings (the provider from the key that
is set, the default model, the fallback's model, the models of the deployments) is worked out
before the object is made, so a `Settings` never changes once it exists.

`create_app(settings=...)` takes a `Settings` so that tests and embedding apps never patch the
environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar, Unpack, cast
from urllib.parse import unquote

from starlette.config import Config

T = TypeVar("T")

PROVIDERS = ("openai", "anthropic", "echo")

DEFAULT_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
    "echo": "echo",
}

OPENAI_BASE_URL = "https://api.openai.com/v1"
# The ledger read from the environment with LEDGER_URL unset; a Settings made in code
# keeps no ledger unless it is given one.
DEFAULT_LEDGER = "text-tool.db"
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
    # Fields of a passed-through body that choose models or routes at this provider
    # (OpenRouter's), let through: refused otherwise, since a key's allowlist and budget
    # do not cover what they reach.
    allow_fields: frozenset[str] = frozenset()


# Fields of a body that choose models or routes at the provider (OpenRouter reads them).
UPSTREAM_CHOICES = ("models", "route", "provider", "fallbacks")

_DEPLOYMENT_FIELDS = {"name", "provider", "base_url", "api_key", "api_key_env", "models",
                      "weight", "priority", "allow_fields"}  # fmt: skip


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
    seen: set[str] = set()
    repeated: set[str] = set()
    for name in names:  # one pass: a file of 20,000 keys is read in milliseconds
        (repeated if name in seen else seen).add(name)
    duplicates = sorted(repeated)
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
    allowed = entry.get("allow_fields", [])
    if not isinstance(allowed, list) or not set(allowed) <= set(UPSTREAM_CHOICES):
        raise SettingsError(
            f"{where}: 'allow_fields' lists fields of {', '.join(UPSTREAM_CHOICES)}"
        )
    return DeploymentSpec(
        name=name,
        provider=provider,
        base_url=base.rstrip("/"),
        api_key=key,
        models=tuple(raw_models.items()),
        weight=float(weight),
        priority=priority,
        allow_fields=frozenset(allowed),
    )


# --- the table ---------------------------------------------------------------------------
# Each variable is one row: a field of Settings made by `row()`, with the variable's name,
# its parser (text to value), its default, its check (of the value) and a line about it.

Lookup = Callable[[str], str]  # another variable's text, "" when unset
Parse = Callable[[str, Lookup], T]  # a variable's text to its value, or a ValueError
Check = Callable[[T], None]  # a ValueError when a value is not allowed


@dataclass(frozen=True)
class Row(Generic[T]):
    """What the table knows of one variable besides its field's name, type and default."""

    env: str
    parse: Parse[T]
    check: Check[T] | None
    doc: str
    only_with: str = ""  # read only when this other variable is set


def row(
    env: str,
    parse: Parse[T],
    default: T,
    check: Check[T] | None,
    doc: str,
    *,
    secret: bool = False,
    only_with: str = "",
) -> T:
    """A field of Settings read from the variable `env`. Typed as its value (as
    `dataclasses.field` is), so that mypy holds the default and the parser to the field's
    type; a secret stays out of the repr."""
    made: T = field(
        default=default, repr=not secret, metadata={"row": Row(env, parse, check, doc, only_with)}
    )
    return made


def _text(text: str, env: Lookup) -> str:
    return text


def _lower(text: str, env: Lookup) -> str:
    return text.lower()


def _url(text: str, env: Lookup) -> str:
    return text.rstrip("/")


def _names(text: str, env: Lookup) -> tuple[str, ...]:
    return _split(text)


def _number(text: str, env: Lookup) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _whole(text: str, env: Lookup) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _rate(text: str, env: Lookup) -> Rate:
    return Rate.parse(text)


def _file(text: str, env: Lookup) -> Path:
    """A path checked as it is read, so that a typo stops the start rather than the first
    request; a Path given to Settings(...) may be written later (tests do)."""
    if not Path(text).is_file():
        raise ValueError(f"{text} is not a readable file")
    return Path(text)


def _flag(text: str, env: Lookup) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _headers(text: str, env: Lookup) -> tuple[tuple[str, str], ...]:
    """`key=value,key2=value2`, as OpenTelemetry's exporters take them (values
    percent-encoded)."""
    pairs = []
    for item in _split(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected key=value pairs separated by commas")
        pairs.append((key.strip().lower(), unquote(value.strip())))
    return tuple(pairs)


def _deployments(text: str, env: Lookup) -> tuple[DeploymentSpec, ...]:
    """The one parser that looks up other variables: a deployment's `api_key_env`."""
    return read_deployments(Path(text), env)


def _one_of(*choices: str) -> Check[str]:
    def check(value: str) -> None:
        if value not in choices:
            listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
            raise ValueError(f"{value!r} is not {listed}")

    return check


def _optional(check: Check[T]) -> Check[T | None]:
    """`check`, for a setting that may also be left unset (None or "")."""

    def maybe(value: T | None) -> None:
        if value is not None and value != "":
            check(value)

    return maybe


def _at_least(floor: int) -> Check[float]:
    def check(value: float) -> None:
        if not (value >= floor and math.isfinite(value)):
            raise ValueError(f"must be {floor} or more, got {value}")

    return check


def _seconds(value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a positive number of seconds, got {value}")


def _store(url: str) -> None:
    if url == "memory":
        return
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{url!r} is not memory or a redis://host:port/db URL")
    if importlib.util.find_spec("redis") is None:
        raise ValueError("a Redis store needs the redis extra (uv sync --extra redis)")


def _ledger(url: str) -> None:
    if url.startswith(("postgresql://", "postgres://")):
        if importlib.util.find_spec("psycopg") is None:
            raise ValueError(
                "a PostgreSQL ledger needs the postgres extra (uv sync --extra postgres)"
            )
    elif url.startswith(("redis://", "http://", "https://", "mysql://")):
        raise ValueError("the ledger is an SQLite file, a postgresql:// URL, or off")


def _origins(origins: tuple[str, ...]) -> None:
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com")


def _collector(url: str) -> None:
    if not url:
        return
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{url!r} is not an http(s) URL")
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        raise ValueError("traces need the otel extra (uv sync --extra otel)")


class SettingsArgs(TypedDict, total=False):
    """The keywords of `Settings(...)`: its fields, typed as they are (a TypedDict cannot be
    made from a class for mypy; tests/test_settings_table.py holds the two together)."""

    provider: str
    model: str
    models: tuple[str, ...]
    fallback_provider: str
    fallback_model: str
    deployments: tuple[DeploymentSpec, ...]
    openai_api_key: str
    openai_base_url: str
    openai_responses: str
    anthropic_api_key: str
    anthropic_base_url: str
    api_keys: tuple[str, ...]
    api_keys_file: Path | None
    rate_limit: Rate
    token_limit: Rate | None
    timeout_s: float
    connect_timeout_s: float
    total_timeout_s: float
    first_byte_timeout_s: float
    max_response_bytes: int
    max_body_bytes: int
    body_timeout_s: float
    max_header_bytes: int
    header_timeout_s: float
    max_inflight: int
    key_max_concurrent: int | None
    concurrency_lease_s: float
    max_retries: int
    retry_deadline_s: float
    shutdown_grace_s: float
    shutdown_drain_s: float
    ping_interval_s: float
    prices_file: Path | None
    log_format: str
    transport: str
    rate_limit_store: str
    rate_limit_store_fail: str
    rate_limit_store_timeout_s: float
    ledger_url: str
    store_state: bool
    store_retention_days: float
    ledger_retention_days: float
    cors_origins: tuple[str, ...]
    otel_endpoint: str
    otel_service: str
    otel_headers: tuple[tuple[str, str], ...]
    otel_capture_content: bool
    provider_was_defaulted: bool


@dataclass(frozen=True, kw_only=True, init=False)
class Settings:
    """Everything the service reads from its environment, typed and checked: one field a
    variable, each field a row of the table."""

    # The provider, its models, a fallback or several deployments
    provider: str = row(
        "LLM_PROVIDER", _lower, "echo", _one_of(*PROVIDERS), "openai, anthropic or echo"
    )
    model: str = row("LLM_MODEL", _text, "", None, "the default model; unset: the provider's")
    models: tuple[str, ...] = row(
        "LLM_MODELS", _names, (), None, "the models a caller may ask for (and LLM_MODEL)"
    )
    fallback_provider: str = row(
        "LLM_FALLBACK_PROVIDER",
        _lower,
        "",
        _optional(_one_of(*PROVIDERS)),
        "a second provider, tried when the first fails before its answer began",
    )
    fallback_model: str = row(
        "LLM_FALLBACK_MODEL", _text, "", None, "the fallback's model; unset: its provider's"
    )
    deployments: tuple[DeploymentSpec, ...] = row(
        "LLM_DEPLOYMENTS", _deployments, (), None, "a TOML file of deployments, for LLM_PROVIDER"
    )
    openai_api_key: str = row(
        "OPENAI_API_KEY", _text, "", None, "OpenAI's key (none for a local server)", secret=True
    )
    openai_base_url: str = row(
        "OPENAI_BASE_URL", _url, OPENAI_BASE_URL, None, "OpenAI or an OpenAI-compatible server"
    )
    openai_responses: str = row(
        "OPENAI_RESPONSES",
        _lower,
        "auto",
        _one_of("auto", "on", "off"),
        "whether the OpenAI provider serves /responses itself (auto: api.openai.com does)",
    )
    anthropic_api_key: str = row(
        "ANTHROPIC_API_KEY", _text, "", None, "Anthropic's key", secret=True
    )
    anthropic_base_url: str = row(
        "ANTHROPIC_BASE_URL", _url, ANTHROPIC_BASE_URL, None, "the Anthropic Messages API"
    )
    # Client keys and their limits
    api_keys: tuple[str, ...] = row(
        "API_KEYS", _names, (), None, "client keys, comma-separated", secret=True
    )
    api_keys_file: Path | None = row(
        "API_KEYS_FILE", _file, None, None, "a TOML file of named keys with their own limits"
    )
    rate_limit: Rate = row("RATE_LIMIT", _rate, Rate(60, 60), None, "requests a key, N/minute")
    token_limit: Rate | None = row("TOKEN_LIMIT", _rate, None, None, "tokens a key, N/minute")
    # The provider calls: time, size, retries
    timeout_s: float = row(
        "LLM_TIMEOUT_S", _number, 60.0, _seconds, "provider read timeout, per chunk or event"
    )
    connect_timeout_s: float = row(
        "LLM_CONNECT_TIMEOUT_S", _number, 5.0, _seconds, "provider connect timeout"
    )
    total_timeout_s: float = row(
        "LLM_TOTAL_TIMEOUT_S", _number, 600.0, _seconds, "the most a whole answer may take"
    )
    first_byte_timeout_s: float = row(
        "LLM_FIRST_BYTE_TIMEOUT_S",
        _number,
        30.0,
        _seconds,
        "a stream's answer must begin within this, else its deployment cools as for a 503",
    )
    max_response_bytes: int = row(
        "LLM_MAX_RESPONSE_BYTES",
        _whole,
        16 * 1024 * 1024,
        _at_least(1024),
        "the largest answer, or event, taken from a provider",
    )
    # What clients send
    max_body_bytes: int = row(
        "MAX_BODY_BYTES", _whole, 1024 * 1024, _at_least(1), "the largest request body"
    )
    body_timeout_s: float = row(
        "BODY_TIMEOUT_S", _number, 30.0, _seconds, "the time a client has to send its body"
    )
    max_header_bytes: int = row(
        "MAX_HEADER_BYTES", _whole, 64 * 1024, _at_least(1024), "the largest request head"
    )
    header_timeout_s: float = row(
        "HEADER_TIMEOUT_S", _number, 10.0, _seconds, "the time a client has to send its head"
    )
    # Calls in flight
    max_inflight: int = row(
        "MAX_INFLIGHT", _whole, 2048, _at_least(1), "provider calls in flight at once"
    )
    key_max_concurrent: int | None = row(
        "KEY_MAX_CONCURRENT",
        _whole,
        None,
        _optional(_at_least(1)),
        "calls in flight a key, unless its own says",
    )
    concurrency_lease_s: float = row(
        "CONCURRENCY_LEASE_S",
        _number,
        10.0,
        _at_least(1),
        "how long a shared slot outlives a dead replica",
    )
    max_retries: int = row(
        "LLM_MAX_RETRIES", _whole, 2, _at_least(0), "retries of a call that failed early"
    )
    retry_deadline_s: float = row(
        "LLM_RETRY_DEADLINE_S", _number, 30.0, _seconds, "no retry starts after this long"
    )
    shutdown_grace_s: float = row(
        "SHUTDOWN_GRACE_S", _number, 15.0, _seconds, "on SIGTERM, the time streams get to end"
    )
    shutdown_drain_s: float = row(
        "SHUTDOWN_DRAIN_S",
        _number,
        5.0,
        _at_least(0),
        "on SIGTERM, the time /ready is 503 and new requests get 503 before the shutdown",
    )
    ping_interval_s: float = row(
        "SSE_PING_INTERVAL_S", _number, 15.0, _seconds, "between keep-alives on a stream"
    )
    # Prices, logs, the HTTP pool, the shared store, browsers, traces
    prices_file: Path | None = row(
        "PRICES_FILE",
        _file,
        None,
        None,
        "a TOML file adding or overriding model prices (and whether a model reasons)",
    )
    log_format: str = row("LOG_FORMAT", _lower, "json", _one_of("json", "text"), "json or text")
    transport: str = row(
        "LLM_TRANSPORT", _lower, "aiohttp", _one_of("aiohttp", "httpx"), "the upstream pool"
    )
    rate_limit_store: str = row(
        "RATE_LIMIT_STORE", _text, "memory", _store, "memory, or redis:// shared by replicas"
    )
    rate_limit_store_fail: str = row(
        "RATE_LIMIT_STORE_FAIL",
        _lower,
        "open",
        _one_of("open", "closed"),
        "with the store down: open (this replica's memory) or closed (503)",
    )
    rate_limit_store_timeout_s: float = row(
        "RATE_LIMIT_STORE_TIMEOUT_S",
        _number,
        5.0,
        _seconds,
        "a store that leaves a command unanswered this long is down (a slow one is waited for)",
    )
    ledger_url: str = row(
        "LEDGER_URL",
        _text,
        "off",
        _ledger,
        f"the ledger of calls: an SQLite file, postgresql://..., or off; unset: {DEFAULT_LEDGER}",
        secret=True,  # a PostgreSQL URL may hold a password
    )
    store_state: bool = row(
        "STORE_STATE",
        _flag,
        True,
        None,
        "keep what the stateful APIs store (responses, conversations, message threads) in "
        "the ledger's database",
    )
    store_retention_days: float = row(
        "STORE_RETENTION_DAYS",
        _number,
        30.0,
        _at_least(1),
        "how long a stored response, or an unused conversation or message thread, is kept",
    )
    ledger_retention_days: float = row(
        "LEDGER_RETENTION_DAYS", _number, 400.0, _at_least(1), "how long the ledger keeps a row"
    )
    cors_origins: tuple[str, ...] = row(
        "CORS_ORIGINS", _names, (), _origins, "the origins of pages that may call it"
    )
    otel_endpoint: str = row(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        _text,
        "",
        _collector,
        "an OTLP/HTTP collector's base URL; unset: no traces, no OpenTelemetry loaded",
    )
    otel_service: str = row(
        "OTEL_SERVICE_NAME", _text, "text-tool", None, "the traces' service name"
    )
    otel_headers: tuple[tuple[str, str], ...] = row(
        "OTEL_EXPORTER_OTLP_HEADERS",
        _headers,
        (),
        None,
        "a collector's headers, key=value,... (its auth)",
        secret=True,
        only_with="OTEL_EXPORTER_OTLP_ENDPOINT",  # another tool's headers stop nothing here
    )
    otel_capture_content: bool = row(
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        _flag,
        False,
        None,
        "prompt and completion text in the spans",
    )
    # Derived, with no variable of their own
    provider_was_defaulted: bool = False  # LLM_PROVIDER unset: chosen by the key that is set
    # Each model callers name, and its name at the first deployment serving it: what
    # prices a call before it is known which deployment serves it.
    upstream_names: dict[str, str] = field(init=False, repr=False, compare=False)

    def __init__(self, **given: Unpack[SettingsArgs]) -> None:
        """Values given here are taken as `from_env` takes the environment's: each checked
        by its row, the rest defaulted or derived, and then each field set once."""
        for name, value in _resolve(given).items():
            object.__setattr__(self, name, value)  # frozen: as a dataclass's own __init__ does

    def serves_responses(self, base_url: str) -> bool:
        """Whether a Responses body passes through to an OpenAI provider at `base_url`:
        by default only api.openai.com serves it; most OpenAI-compatible servers speak
        only Chat Completions, so to them it is translated."""
        if self.openai_responses == "auto":
            return base_url.rstrip("/") == OPENAI_BASE_URL
        return self.openai_responses == "on"

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests use it to vary one setting); read again,
        so a bad change is a SettingsError too."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Parse the environment; `.env` in the working directory fills in what it lacks.
        A variable left empty is unset."""
        path = Path(env_file) if env_file is not None else None
        config = Config(
            path if path is not None and path.is_file() else None,
            environ=os.environ if environ is None else environ,
        )

        def env(name: str) -> str:
            return str(config(name, default="")).strip()

        given: dict[str, object] = {}
        for name, known in ROWS.items():
            text = env(known.env)
            if text and (not known.only_with or env(known.only_with)):
                given[name] = _parsed(known, text, env)
        if "ledger_url" not in given:
            given["ledger_url"] = DEFAULT_LEDGER  # in the working directory (the image: /data)
        if "provider" not in given:
            given["provider"] = _provider_by_key(given)
            given["provider_was_defaulted"] = True
        return cls(**cast(SettingsArgs, given))


ROWS: dict[str, Row[Any]] = {
    f.name: f.metadata["row"] for f in dataclasses.fields(Settings) if "row" in f.metadata
}
"""The table: each field read from a variable, and its row."""


def _parsed(known: Row[T], text: str, env: Lookup) -> T:
    try:
        return known.parse(text, env)
    except SettingsError:
        raise  # it names its variable already (LLM_DEPLOYMENTS: an entry)
    except ValueError as exc:
        raise SettingsError(f"{known.env}: {exc}") from None


def _checked(known: Row[T], value: T) -> None:
    if known.check is None:
        return
    try:
        known.check(value)
    except ValueError as exc:
        raise SettingsError(f"{known.env}: {exc}") from None


def _provider_by_key(given: Mapping[str, object]) -> str:
    """LLM_PROVIDER unset: the provider whose key (or, for OpenAI, server) is set."""
    if "openai_api_key" in given or "openai_base_url" in given:
        return "openai"
    return "anthropic" if "anthropic_api_key" in given else "echo"


def _resolve(given: Mapping[str, object]) -> dict[str, Any]:
    """Every field's value: given or defaulted, checked by its row, then what depends on
    other settings worked out, before any of it is set on a Settings."""
    fields = {f.name: f for f in dataclasses.fields(Settings) if f.init}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise TypeError(f"Settings() got unexpected keyword arguments: {', '.join(unknown)}")
    values: dict[str, Any] = {name: given.get(name, f.default) for name, f in fields.items()}
    for name, known in ROWS.items():
        _checked(known, values[name])
    deployments: tuple[DeploymentSpec, ...] = values["deployments"]
    if deployments:
        _check_no_fallback(values["fallback_provider"], values["fallback_model"])
        values["provider"] = deployments[0].provider
    values["model"], values["models"] = _models(
        values["provider"], values["model"], values["models"], deployments
    )
    values["fallback_provider"], values["fallback_model"] = _fallback(
        values["provider"], values["fallback_provider"], values["fallback_model"]
    )
    _check_provider_keys(
        "" if deployments else values["provider"],
        values["fallback_provider"],
        values["openai_api_key"],
        values["openai_base_url"],
        values["anthropic_api_key"],
    )
    values["upstream_names"] = _upstream_names(deployments)
    return values


def _check_no_fallback(fallback_provider: str, fallback_model: str) -> None:
    if fallback_provider or fallback_model:
        raise SettingsError(
            "LLM_FALLBACK_PROVIDER: with LLM_DEPLOYMENTS, a fallback is a deployment "
            "with a higher priority"
        )


def _models(
    provider: str, model: str, models: tuple[str, ...], deployments: tuple[DeploymentSpec, ...]
) -> tuple[str, tuple[str, ...]]:
    """The default model and the models callers may ask for, the default always among
    them: as given, else what the deployments serve, else the provider's default model."""
    if not deployments:
        model = model or DEFAULT_MODELS[provider]
        return model, models if model in models else (model, *models)
    served = tuple(dict.fromkeys(m for d in deployments for m, _ in d.models))
    model = model or (models or served)[0]
    models = models or served
    if model not in models:
        models = (model, *models)
    unserved = [m for m in models if m not in served]
    if unserved:
        raise SettingsError(
            f"LLM_MODELS: no deployment of LLM_DEPLOYMENTS serves {', '.join(unserved)}"
        )
    return model, models


def _fallback(provider: str, fallback_provider: str, fallback_model: str) -> tuple[str, str]:
    """A fallback model alone falls back on the same provider; a fallback provider alone,
    to its default model."""
    fallback_provider = fallback_provider or (provider if fallback_model else "")
    if fallback_provider and not fallback_model:
        fallback_model = DEFAULT_MODELS[fallback_provider]
    return fallback_provider, fallback_model


def _check_provider_keys(
    provider: str, fallback: str, openai_key: str, openai_base: str, anthropic_key: str
) -> None:
    """A provider that cannot answer without a key stops the start, not the first call.
    (A deployment's key is checked with its entry.)"""
    for setting, kind in (("LLM_PROVIDER", provider), ("LLM_FALLBACK_PROVIDER", fallback)):
        if kind == "anthropic" and not anthropic_key:
            raise SettingsError(f"ANTHROPIC_API_KEY: required when {setting}=anthropic")
        if kind == "openai" and not openai_key and openai_base.rstrip("/") == OPENAI_BASE_URL:
            raise SettingsError(
                f"OPENAI_API_KEY: required when {setting}=openai talks to api.openai.com "
                "(set OPENAI_BASE_URL for a server that needs no key)"
            )


def _upstream_names(deployments: tuple[DeploymentSpec, ...]) -> dict[str, str]:
    first: dict[str, str] = {}
    for spec in sorted(deployments, key=lambda d: d.priority):
        for model, upstream in spec.models:
            first.setdefault(model, upstream)
    return first


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())
