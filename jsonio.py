"""JSON on the hot path, through pydantic-core (already here for validation).

A departure from the standard library's `json`: on this project's bodies pydantic-core
encodes and parses several times as fast (bench/README.md), and a request writes
several JSON documents and reads one or two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic_core import from_json, to_json
from starlette.responses import JSONResponse as StarletteJSONResponse


def dumps(value: Any, fallback: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities become null rather than invalid JSON.
    `fallback` turns what JSON cannot hold into what it can (log lines use `str`)."""
    return to_json(value, inf_nan_mode="null", fallback=fallback)


def loads(data: str | bytes) -> Any:
    """Parse JSON (UTF-8); ValueError when it is not JSON."""
    return from_json(data)


class JSONResponse(StarletteJSONResponse):
    """Starlette's JSONResponse, rendered by `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
