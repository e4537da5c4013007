"""The one error shape every route and middleware answers with.

    {"error": {"type": "...", "message": "...", "request_id": "..."}}

OpenAI's SDKs read `error.message`, `error.type` and `error.code`, so the /v1
routes can answer in this same shape (with `code` added) and the SDKs still raise
the right exception class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Scope

REQUEST_ID = "text_tool.request_id"


class ApiError(Exception):
    """A client-facing error: raise it anywhere below the router to answer with it."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = dict(headers or {})
        self.errors = list(errors) if errors is not None else None


def request_id(scope: Scope) -> str:
    return str(scope.get(REQUEST_ID, ""))


def error_body(
    type_: str,
    message: str,
    request_id: str,
    errors: Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message, "request_id": request_id}
    if errors is not None:
        error["errors"] = list(errors)
    return {"error": error}


def error_response(
    scope: Scope,
    status: int,
    type_: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[Mapping[str, str]] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(type_, message, request_id(scope), errors),
        status_code=status,
        headers=dict(headers or {}),
    )


def api_error_response(scope: Scope, exc: ApiError) -> JSONResponse:
    return error_response(
        scope, exc.status, exc.type, exc.message, headers=exc.headers, errors=exc.errors
    )
