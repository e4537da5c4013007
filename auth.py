"""API-key auth: a pure ASGI middleware in front of every route that is not public.

Keys are held as SHA-256 digests and looked up by digest, so the lookup time says
nothing about how much of a guess was right, and a keys file can hold digests only.
The caller's identity travels downstream in `scope["text_tool.auth"]`.

The keys file is read again when its modification time changes (looked at, at most,
every KEYS_CHECK_S, on a request's way in: a mounted app has no task of its own to do
it) and on SIGHUP: a removed key is refused from its next request, a request already
admitted (an open stream) goes on, and the counters of a key are kept, as they are by
its name. A file that no longer reads keeps the previous keys, with one line logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from config import Rate, Settings, SettingsError, toml_tables, unique_names
from errors import error_response, relative_path

AUTH = "text_tool.auth"
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/openapi.json", "/docs",
                          # the dashboard's page asks for a key; its figures need one
                          "/dashboard", "/dashboard/app.js", "/dashboard/app.css"})  # fmt: skip
PUBLIC_PREFIXES = ("/docs/",)  # the Swagger UI page's own assets
KEYS_CHECK_S = 2.0
_FILE_FIELDS = {"name", "key", "rate_limit", "models", "token_limit", "budget_usd", "budget_period",
                "max_concurrent", "admin"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One client key: its name (what logs and metrics show) and its own settings."""

    name: str
    digest: bytes
    rate_limit: Rate | None = None
    models: tuple[str, ...] | None = None
    token_limit: Rate | None = None
    budget_usd: float | None = None
    budget_period: str = "day"
    max_concurrent: int | None = None  # calls in flight at once
    admin: bool = False  # may read every key's usage (GET /usage?key=, the dashboard)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def default_name(key_digest: bytes) -> str:
    return "key-" + key_digest.hex()[:8]


class KeyRing:
    def __init__(
        self,
        keys: Iterable[ApiKey] = (),
        *,
        settings: Settings | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._by_digest = {key.digest: key for key in keys}
        self._clock = clock  # when the keys file is next looked at
        self.loaded_at = time.time()
        # What reloads need: the settings naming the file, and where to say how it went.
        self._settings = settings if settings and settings.api_keys_file else None
        self._logger = logger or logging.getLogger("text_tool")
        self._stamp = _stamp(self._settings)
        self._next_check = clock() + KEYS_CHECK_S
        self.failing: str | None = None  # why the last reload failed, while it does
        self.on_reload: list[Callable[[KeyRing], None]] = []

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self) -> list[str]:
        return [key.name for key in self._by_digest.values()]

    def keys(self) -> list[ApiKey]:
        """Every key, for what shows their settings by name (the dashboard's budgets)."""
        return list(self._by_digest.values())

    def lookup(self, presented: str) -> ApiKey | None:
        if self._settings is not None and self._clock() >= self._next_check:
            self._check()
        if not presented:
            return None
        return self._by_digest.get(digest(presented))

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> KeyRing:
        """`API_KEYS` and `API_KEYS_FILE` together; a key in both takes the file's settings."""
        stamp = _stamp(settings)  # before the read: a change during it is seen next time
        ring = cls(_keys(settings).values(), settings=settings, logger=logger, clock=clock)
        ring._stamp = stamp
        return ring

    # --- reloads ------------------------------------------------------------------

    def _check(self) -> None:
        self._next_check = self._clock() + KEYS_CHECK_S
        if _stamp(self._settings) != self._stamp or self.failing is not None:
            self.reload("the keys file changed")  # or a failed reload, tried again

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Read the keys again; False (and the previous keys kept) if they do not read.
        A failure is logged once for each different error, and tried again at each
        check, so a file caught half-written is read once it is whole."""
        if self._settings is None:
            return False
        stamp = _stamp(self._settings)
        try:
            fresh = _keys(self._settings)
        except Exception as exc:  # a bad file must never fail a request or a signal
            error = str(exc) if isinstance(exc, SettingsError) else f"{type(exc).__name__}: {exc}"
            if error != self.failing:
                self._logger.error(
                    "keys not reloaded; the previous keys stay",
                    extra={"event": "keys_reload_failed", "reason": reason, "error": error},
                )
            self.failing = error
            return False
        self._stamp, self.failing = stamp, None
        before = {key.name for key in self._by_digest.values()}
        self._by_digest = {key.digest: key for key in fresh.values()}
        self.loaded_at = time.time()
        after = set(self.names())
        self._logger.info(
            "keys reloaded",
            extra={"event": "keys_reloaded", "reason": reason, "keys": len(after),
                   "added": sorted(after - before), "removed": sorted(before - after)},
        )  # fmt: skip
        for listener in self.on_reload:
            listener(self)
        return True


def _stamp(settings: Settings | None) -> tuple[int, int] | None:
    """The keys file's modification time and size: what says it changed."""
    if settings is None or settings.api_keys_file is None:
        return None
    try:
        stat = os.stat(settings.api_keys_file)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _keys(settings: Settings) -> dict[bytes, ApiKey]:
    keys: dict[bytes, ApiKey] = {}
    for plain in settings.api_keys:
        d = digest(plain)
        keys[d] = ApiKey(name=default_name(d), digest=d)
    if settings.api_keys_file is not None:
        for key in _read_keys_file(settings):
            keys[key.digest] = key
    unique_names("API_KEYS_FILE", [key.name for key in keys.values()])
    return keys


def _read_keys_file(settings: Settings) -> list[ApiKey]:
    assert settings.api_keys_file is not None
    tables = toml_tables("API_KEYS_FILE", settings.api_keys_file, "keys", _FILE_FIELDS)
    return [_key_from_entry(where, entry) for where, entry in tables]


def _key_from_entry(where: str, entry: Mapping[str, Any]) -> ApiKey:
    raw = entry.get("key")
    if not isinstance(raw, str) or not raw:
        raise SettingsError(f"{where}: 'key' is required (the key, or sha256:<hex>)")
    if raw.startswith("sha256:"):
        try:
            key_digest = bytes.fromhex(raw[7:])
        except ValueError:
            key_digest = b""
        if len(key_digest) != 32:
            raise SettingsError(f"{where}: 'key' sha256: must be followed by 64 hex digits")
    else:
        key_digest = digest(raw)
    name = entry.get("name", default_name(key_digest))
    if not isinstance(name, str) or not name:
        raise SettingsError(f"{where}: 'name' must be a non-empty string")
    rates: dict[str, Rate | None] = {"rate_limit": None, "token_limit": None}
    for field_name in rates:
        if field_name in entry:
            try:
                rates[field_name] = Rate.parse(str(entry[field_name]))
            except ValueError as exc:
                raise SettingsError(f"{where}: {field_name}: {exc}") from None
    budget = entry.get("budget_usd")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0
    ):
        raise SettingsError(f"{where}: budget_usd must be a number of dollars, 0 or more")
    period = entry.get("budget_period", "day")
    if period not in ("day", "month"):
        raise SettingsError(f"{where}: budget_period must be day or month (UTC)")
    concurrent = entry.get("max_concurrent")
    if concurrent is not None and (
        isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1
    ):
        raise SettingsError(f"{where}: max_concurrent must be a whole number, 1 or more")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise SettingsError(f"{where}: admin must be true or false")
    models = entry.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise SettingsError(f"{where}: 'models' must be a list of model names")
    return ApiKey(
        name=name,
        digest=key_digest,
        rate_limit=rates["rate_limit"],
        models=tuple(models) if models is not None else None,
        token_limit=rates["token_limit"],
        budget_usd=float(budget) if budget is not None else None,
        budget_period=period,
        max_concurrent=concurrent,
        admin=admin,
    )


def presented_key(scope: Scope) -> str:
    """The key from `X-API-Key`, else from `Authorization: Bearer`. An empty header is
    no header: a client library that always sends `X-API-Key` (empty when unset) must
    not hide the bearer token beside it."""
    bearer = ""
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            key = bytes(value).decode("latin-1").strip()
            if key:
                return key
        elif name == b"authorization" and not bearer:
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                bearer = token.strip()
    return bearer


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyRing,
        public_paths: frozenset[str] = PUBLIC_PATHS,
        public_prefixes: tuple[str, ...] = PUBLIC_PREFIXES,
    ) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = public_paths
        self.public_prefixes = public_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = relative_path(scope)
        if path in self.public_paths or path.startswith(self.public_prefixes):
            await self.app(scope, receive, send)
            return
        key = self.keys.lookup(presented_key(scope))
        if key is None:
            # Missing and wrong keys get the same answer: nothing to learn from it.
            response = error_response(
                scope,
                401,
                "invalid_api_key",
                "a valid API key is required (X-API-Key or Authorization: Bearer)",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        scope[AUTH] = key
        await self.app(scope, receive, send)
