"""Settings: parsed once, bad values named, `.env` read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config import DeploymentSpec, Rate, Settings, SettingsError


def test_defaults_to_echo_when_no_provider_key_is_set() -> None:
    settings = Settings.from_env(environ={}, env_file=None)
    assert settings.provider == "echo" and settings.provider_was_defaulted
    assert settings.model == "echo" and settings.models == ("echo",)
    assert settings.rate_limit == Rate(60, 60)
    assert settings.max_body_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("environ", "provider", "model"),
    [
        ({"OPENAI_API_KEY": "k"}, "openai", "gpt-4o-mini"),
        ({"ANTHROPIC_API_KEY": "k"}, "anthropic", "claude-haiku-4-5"),
        ({"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}, "openai", "gpt-4o-mini"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, "openai", "gpt-4o-mini"),
        ({"ANTHROPIC_API_KEY": "k", "LLM_PROVIDER": "echo"}, "echo", "echo"),
    ],
)
def test_provider_is_chosen_by_the_keys_present(
    environ: dict[str, str], provider: str, model: str
) -> None:
    settings = Settings.from_env(environ=environ, env_file=None)
    assert (settings.provider, settings.model) == (provider, model)


def test_models_list_always_includes_the_default_model() -> None:
    settings = Settings.from_env(
        environ={"OPENAI_API_KEY": "k", "LLM_MODEL": "gpt-4.1-mini", "LLM_MODELS": "gpt-4o, o3"},
        env_file=None,
    )
    assert settings.models == ("gpt-4.1-mini", "gpt-4o", "o3")


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LLM_PROVIDER=echo\nRATE_LIMIT=5/second\nMAX_BODY_BYTES=2048\n")
    settings = Settings.from_env(environ={"MAX_BODY_BYTES": "4096"}, env_file=env_file)
    assert settings.rate_limit == Rate(5, 1)
    assert settings.max_body_bytes == 4096


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("60/minute", Rate(60, 60)),
        ("10/second", Rate(10, 1)),
        ("1000 / hour", Rate(1000, 3600)),
        ("5/s", Rate(5, 1)),
        ("7/MIN", Rate(7, 60)),
    ],
)
def test_rates_parse(text: str, rate: Rate) -> None:
    assert Rate.parse(text) == rate


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
        ({"RATE_LIMIT": "0/minute"}, "RATE_LIMIT"),
        ({"RATE_LIMIT": "5/fortnight"}, "RATE_LIMIT"),
        ({"LLM_PROVIDER": "gemini"}, "LLM_PROVIDER"),
        ({"LLM_PROVIDER": "anthropic"}, "ANTHROPIC_API_KEY"),
        ({"LLM_PROVIDER": "openai"}, "OPENAI_API_KEY"),
        ({"LLM_TIMEOUT_S": "soon"}, "LLM_TIMEOUT_S"),
        ({"LLM_TIMEOUT_S": "-1"}, "LLM_TIMEOUT_S"),
        ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES"),
        ({"SSE_PING_INTERVAL_S": "0"}, "SSE_PING_INTERVAL_S"),
        ({"KEY_MAX_CONCURRENT": "0"}, "KEY_MAX_CONCURRENT"),
        ({"KEY_MAX_CONCURRENT": "many"}, "KEY_MAX_CONCURRENT"),
        ({"CONCURRENCY_LEASE_S": "0.5"}, "CONCURRENCY_LEASE_S"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_EXPORTER_OTLP_HEADERS": "no-equals-sign",
            },
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "maybe"}, "CAPTURE_MESSAGE"),
        ({"API_KEYS_FILE": "/nonexistent/keys.toml"}, "API_KEYS_FILE"),
        ({"PRICES_FILE": "/nonexistent/prices.toml"}, "PRICES_FILE"),
    ],
)
def test_a_bad_setting_is_named_in_the_error(environ: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(environ=environ, env_file=None)


def test_provider_keys_stay_out_of_the_settings_repr() -> None:
    settings = Settings(
        provider="openai", openai_api_key="sk-very-secret", api_keys=("client-key",)
    )
    assert "sk-very-secret" not in repr(settings) and "client-key" not in repr(settings)


def test_otlp_headers_are_read_only_when_traces_are_on() -> None:
    # Another tool's malformed setting in the same environment stops nothing here.
    settings = Settings.from_env(environ={"OTEL_EXPORTER_OTLP_HEADERS": "junk"}, env_file=None)
    assert settings.otel_headers == ()
    on = Settings.from_env(
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                 "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20t, x-team = a"},
        env_file=None,
    )  # fmt: skip
    assert on.otel_headers == (("authorization", "Bearer t"), ("x-team", "a"))


@pytest.mark.parametrize(
    ("environ", "line"),
    [
        (
            {"RATE_LIMIT": "x"},
            "RATE_LIMIT: 'x' is not a rate like 60/minute (per second, minute or hour)",
        ),
        ({"LLM_TIMEOUT_S": "soon"}, "LLM_TIMEOUT_S: 'soon' is not a number"),
        ({"MAX_INFLIGHT": "1e3"}, "MAX_INFLIGHT: '1e3' is not a whole number"),
        ({"LLM_TRANSPORT": "curl"}, "LLM_TRANSPORT: 'curl' is not aiohttp or httpx"),
        ({"LLM_MAX_RETRIES": "-1"}, "LLM_MAX_RETRIES: must be 0 or more, got -1"),
        ({"LLM_PROVIDER": "anthropic"}, "ANTHROPIC_API_KEY: required when LLM_PROVIDER=anthropic"),
    ],
)
def test_the_error_is_one_line_naming_the_variable_first(
    environ: dict[str, str], line: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ=environ, env_file=None)
    assert str(info.value) == line


def test_a_variable_left_empty_is_unset() -> None:
    settings = Settings.from_env(
        environ={"LLM_TIMEOUT_S": " ", "RATE_LIMIT": "", "LLM_PROVIDER": ""}, env_file=None
    )
    assert (settings.timeout_s, settings.rate_limit) == (60.0, Rate(60, 60))
    assert settings.provider_was_defaulted
    assert not Settings.from_env(
        environ={"LLM_PROVIDER": "echo"}, env_file=None
    ).provider_was_defaulted


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"provider": "echo", "model": "echo", "models": ("echo",)}),
        (
            {"provider": "anthropic", "anthropic_api_key": "k", "models": ("claude-sonnet-4-5",)},
            {"model": "claude-haiku-4-5", "models": ("claude-haiku-4-5", "claude-sonnet-4-5")},
        ),
        (
            {"provider": "openai", "openai_api_key": "k", "fallback_provider": "echo"},
            {"model": "gpt-4o-mini", "fallback_model": "echo"},
        ),
        (
            {"provider": "openai", "openai_api_key": "k", "fallback_model": "gpt-4.1-mini"},
            {"fallback_provider": "openai", "fallback_model": "gpt-4.1-mini"},
        ),
    ],
)
def test_values_given_directly_are_completed_as_the_environments_are(
    given: dict[str, object], expected: dict[str, object]
) -> None:
    settings = Settings(**given)  # type: ignore[arg-type]
    assert {name: getattr(settings, name) for name in expected} == expected


def test_the_deployments_give_the_provider_the_models_and_their_upstream_names() -> None:
    spec = DeploymentSpec(
        name="a", provider="anthropic", base_url="http://a.test", api_key="k",
        models=(("fast", "claude-haiku-4-5"), ("slow", "claude-sonnet-4-5")),
    )  # fmt: skip
    settings = Settings(deployments=(spec,))
    assert (settings.provider, settings.model, settings.models) == (
        "anthropic",
        "fast",
        ("fast", "slow"),
    )
    assert settings.upstream_names == {"fast": "claude-haiku-4-5", "slow": "claude-sonnet-4-5"}


def test_values_given_directly_are_checked_and_the_object_never_changes() -> None:
    with pytest.raises(SettingsError, match="MAX_BODY_BYTES: must be 1 or more, got 0"):
        Settings(max_body_bytes=0)
    with pytest.raises(SettingsError, match="LOG_FORMAT"):
        Settings().replace(log_format="xml")
    with pytest.raises(TypeError, match="max_body"):
        Settings(max_body=1)  # type: ignore[call-arg]
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model = "other"  # type: ignore[misc]
    assert settings.replace(max_retries=5).max_retries == 5
    assert settings == Settings() and hash(settings) == hash(Settings())
