"""API-key auth: a pure ASGI middleware in front of every route that is not public.

Keys are held as SHA-256 digests and looked up by digest, so the lookup time says
nothing about how much of a guess was right, and a keys file can hold digests only.
The caller's identity travels downstream in `scope["text_tool.auth"]`.

The keys file is read again when it changes (looked at, at most, every KEYS_CHECK_S,
on a request's way in: a mounted app has no task of its own to do it), once it has
stayed the same (size, modification time, inode) over two looks, and on SIGHUP; only a
file that is not changing while it is read and that parses whole is taken. A removed key
is refused from its next request, a request already admitted (an open stream) goes on,
and the counters of a key are kept, as they are by its name. A file that no longer
reads keeps the previous keys, with one line logged.

Nothing read from the file but the keys' names reaches a log line, an error or /ready:
a mistake is named by its entry (`keys[3]`) and its field, never by a value or by a
field name that is not one of ours (it may be a key pasted in the wrong place).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from config import Rate, Settings, SettingsError, unique_names
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
        self._stamp = _stamp(self._settings)  # the file's, as it was read
        self._seen = self._stamp  # the file's, at the last look
        self._next_check = clock() + KEYS_CHECK_S
        # The keys of API_KEYS, and those the file gave at the last read.
        self._env = {digest(plain) for plain in settings.api_keys} if settings else set()
        self._filed: set[bytes] = set()
        self.failing: str | None = None  # why the last reload failed, while it does
        self.on_reload: list[Callable[[KeyRing], None]] = []
        self._reading = False  # a read of the file in a thread, not yet put in place

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self) -> list[str]:
        return [key.name for key in self._by_digest.values()]

    def keys(self) -> list[ApiKey]:
        """Every key, for what shows their settings by name (the dashboard's budgets)."""
        return list(self._by_digest.values())

    def lookup(self, presented: str) -> ApiKey | None:
        if self._settings is not None and self._clock() >= self._next_check:
            self._check()  # a look (a stat); a read, if one is due, off the request path
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
        """`API_KEYS` and `API_KEYS_FILE` together; a key in both takes the file's settings
        (and a line logged says so)."""
        for attempt in range(3):  # a file being written as the service starts: again
            try:
                loaded = _load(settings)
                break
            except _Changing:
                if attempt == 2:
                    raise SettingsError(
                        "API_KEYS_FILE: the file kept changing while it was read; write it "
                        "beside and rename it into place"
                    ) from None
                time.sleep(0.05)
        ring = cls(loaded.keys.values(), settings=settings, logger=logger, clock=clock)
        ring._stamp = ring._seen = loaded.stamp
        ring._filed = loaded.filed
        ring._say_overlap()
        return ring

    # --- reloads ------------------------------------------------------------------

    def _check(self) -> None:
        """A look at the file: one that changed (or failed to read) is read again once
        a second look finds it as the first did, so that a file being written in
        several steps is not read between two of them."""
        self._next_check = self._clock() + KEYS_CHECK_S
        stamp = _stamp(self._settings)
        if stamp == self._stamp and self.failing is None:
            self._seen = stamp
            return
        if stamp != self._seen:  # changed since the last look: look again first
            self._seen = stamp
            return
        self.reread("the keys file changed")  # or a failed read tried again

    def reread(self, reason: str = "SIGHUP") -> None:
        """`reload`, off the request path: read in a thread (20,000 keys take 0.4 s to
        read, which no request waits for) and put in place on the loop; here, when
        there is no loop (a test). One read at a time: a change meanwhile is seen at a
        later look, the file's stamp being that of what was read."""
        if self._settings is None or self._reading:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.reload(reason)
            return
        self._reading = True
        read = loop.run_in_executor(None, _attempt, self._settings)
        read.add_done_callback(
            lambda done: self._put(done.result(), reason) if not done.cancelled() else None
        )

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Read the keys again; False (and the previous keys kept) if they do not read.
        A failure is logged once for each different error, and tried again at each
        check, so a file caught half-written is read once it is whole; a file that
        changes while it is read is read again at a later look."""
        if self._settings is None:
            return False
        return self._put(_attempt(self._settings), reason)

    def _put(self, attempt: _Loaded | Exception, reason: str) -> bool:
        """The keys read (or the failure to read them) taking effect."""
        self._reading = False
        try:
            if isinstance(attempt, Exception):
                raise attempt
            loaded = attempt
        except _Changing:
            self._seen = None  # two more looks, then a read
            self._logger.info(
                "the keys file is changing; it is read once it stays the same",
                extra={"event": "keys_reload_deferred", "reason": reason},
            )
            return False
        except Exception as exc:  # a bad file must never fail a request or a signal
            # Our own words only: an error of another kind could quote the file.
            error = (
                str(exc)
                if isinstance(exc, SettingsError)
                else f"API_KEYS_FILE: the file could not be read ({type(exc).__name__})"
            )
            if error != self.failing:
                self._logger.error(
                    "keys not reloaded; the previous keys stay",
                    extra={"event": "keys_reload_failed", "reason": reason, "error": error},
                )
            self.failing = error
            return False
        self._stamp = self._seen = loaded.stamp
        self.failing = None
        previous = self._by_digest
        before = {key.name for key in previous.values()}
        self._by_digest = dict(loaded.keys)
        widened = sorted(
            previous[d].name for d in (self._filed - loaded.filed) & self._env if d in previous
        )
        self._filed = loaded.filed
        self.loaded_at = time.time()
        after = set(self.names())
        self._logger.info(
            "keys reloaded",
            extra={"event": "keys_reloaded", "reason": reason, "keys": len(after),
                   "added": sorted(after - before), "removed": sorted(before - after)},
        )  # fmt: skip
        if widened:
            self._logger.warning(
                "keys left the keys file but are in API_KEYS: they stay valid, with "
                "API_KEYS' settings (every model, the default limits)",
                extra={"event": "keys_widened", "names": widened},
            )
        self._say_overlap()
        for listener in self.on_reload:
            listener(self)
        return True

    def _say_overlap(self) -> None:
        """The keys both in API_KEYS and in the file, by their names in the file."""
        both = sorted(self._by_digest[d].name for d in self._env & self._filed)
        if both:
            self._logger.info(
                "keys in both API_KEYS and the keys file take the file's settings",
                extra={"event": "keys_overlap", "names": both},
            )


Stamp = tuple[int, int, int]


def _stamp(settings: Settings | None) -> Stamp | None:
    """The keys file's modification time, size and inode: what says it changed."""
    if settings is None or settings.api_keys_file is None:
        return None
    try:
        return _stamp_of(os.stat(settings.api_keys_file))
    except OSError:
        return None


def _stamp_of(stat: os.stat_result) -> Stamp:
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class _Changing(Exception):
    """The keys file changed while it was read."""


@dataclass(frozen=True, slots=True)
class _Loaded:
    keys: dict[bytes, ApiKey]
    filed: set[bytes]  # the keys the file gave
    stamp: Stamp | None  # the file's, as it was read


def _attempt(settings: Settings) -> _Loaded | Exception:
    """The keys file read, or what kept it from being read (for a thread to hand back)."""
    try:
        return _load(settings)
    except Exception as exc:
        return exc


def _load(settings: Settings) -> _Loaded:
    keys: dict[bytes, ApiKey] = {}
    for plain in settings.api_keys:
        d = digest(plain)
        keys[d] = ApiKey(name=default_name(d), digest=d)
    filed: dict[bytes, ApiKey] = {}
    stamp = None
    if settings.api_keys_file is not None:
        text, stamp = _read(settings.api_keys_file)
        for where, entry in _entries(text, settings.api_keys_file):
            key = _key_from_entry(where, entry)
            other = filed.get(key.digest)
            if other is not None:  # by its names: the key itself is never said
                raise SettingsError(
                    f"{where} ({key.name!r}) holds the same key as {other.name!r}: "
                    "a key is listed once"
                )
            filed[key.digest] = key
    keys.update(filed)  # a key in both takes the file's settings
    unique_names("API_KEYS_FILE", [key.name for key in keys.values()])
    return _Loaded(keys, set(filed), stamp)


def _read(path: os.PathLike[str] | str) -> tuple[str, Stamp]:
    """The file's text, and its stamp; _Changing if a look after the read does not
    find it as the look before did."""
    try:
        before = _stamp_of(os.stat(path))
        with open(path, "rb") as fh:
            data = fh.read()
        after = _stamp_of(os.stat(path))
    except OSError as exc:
        raise SettingsError(f"API_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
    if before != after or len(data) != after[1]:
        raise _Changing
    try:
        return data.decode(), after
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"API_KEYS_FILE: cannot read {path}: not UTF-8 (at byte {exc.start})"
        ) from None


_AT = re.compile(r"\((at line \d+, column \d+|at end of document)\)$")


def _entries(text: str, path: object) -> list[tuple[str, dict[str, Any]]]:
    """The file's `[[keys]]` entries, each with where it is, every one a table of our
    fields. The messages say where a mistake is, never what the file has there."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its words may quote the file: where only
        at = _AT.search(str(exc))
        where = at.group(1) if at else "somewhere"
        raise SettingsError(f"API_KEYS_FILE: cannot read {path}: not TOML ({where})") from None
    entries = data.get("keys", [])
    if not isinstance(entries, list):
        raise SettingsError("API_KEYS_FILE: expected [[keys]] tables")
    found = []
    for index, entry in enumerate(entries):
        where = f"API_KEYS_FILE: keys[{index}]"
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: expected a table")
        unknown = [field for field in entry if field not in _FILE_FIELDS]
        if unknown:
            line = _line_of(text, unknown[0])
            raise SettingsError(
                f"{where}: an unknown field{line} (not named here: it may be a key); "
                f"the fields are {', '.join(sorted(_FILE_FIELDS))}"
            )
        found.append((where, entry))
    return found


def _line_of(text: str, field: str) -> str:
    """Where a field is defined, as " at line N", if a line starts with it."""
    for number, line in enumerate(text.splitlines(), 1):
        head = line.lstrip()
        for written in (field, f'"{field}"', f"'{field}'"):
            if head.startswith(written) and head[len(written) :].lstrip()[:1] in ("=", "."):
                return f" at line {number}"
    return ""


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
            except ValueError:  # its words quote the value, which may be a key
                raise SettingsError(
                    f"{where}: {field_name} must be a rate like 60/minute "
                    "(per second, minute or hour)"
                ) from None
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
