"""The one error shape every route and middleware answers with, and the errors a
provider call raises.

    {"error": {"type": "...", "message": "...", "request_id": "..."}}

OpenAI's SDKs read `error.message`, `error.type` and `error.code`, so the /v1
routes can answer in this same shape (with `code` added) and the SDKs still raise
the right exception class.

A provider call fails with one of these; `provider_api_error` is the one place where
they become HTTP answers:

    ProviderError               502 upstream_error: an answer we cannot use
     ├── ProviderTimeout        504 upstream_timeout: no answer within the read timeout
     ├── ProviderUnavailable    502 upstream_error: no connection, or the provider's 5xx
     ├── ProviderRateLimited    429 rate_limit_exceeded: the provider is limiting us
     ├── ProviderRejected       502 upstream_error: the provider refused our credentials
     └── ProviderBadRequest     400 invalid_request: the provider refused this request

No message carries our provider key: provider messages are redacted, and credential
failures never quote the provider.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.types import Scope

from jsonio import JSONResponse

REQUEST_ID = "text_tool.request_id"
# Headers for the response, whatever answers: a list the outermost middleware puts in
# the scope and adds to the response start, so inner ones need no send wrapper of their own.
RESPONSE_HEADERS = "text_tool.response_headers"


class ProviderError(Exception):
    """The provider's answer could not be used. `answer`, for a refusal, is the
    provider's own status and body, in the wire format `wire`, which a client of that
    format gets as they are."""

    answer: tuple[int, bytes] | None = None
    wire: str | None = None


class ProviderTimeout(ProviderError):
    """The provider did not answer within the read timeout."""


class ProviderUnavailable(ProviderError):
    """No connection to the provider, or it failed on its side (5xx)."""


class ProviderRateLimited(ProviderError):
    """The provider rate-limited us (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderRejected(ProviderError):
    """The provider refused our credentials (HTTP 401/403)."""


class ProviderBadRequest(ProviderError):
    """The provider refused this request as invalid (HTTP 400, 404, 413, 422...)."""


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
        param: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = dict(headers or {})
        # Anthropic's `error.details` (`{"error_code": ...}`), which its SDKs branch on.
        self.details = dict(details) if details is not None else None
        self.errors = list(errors) if errors is not None else None
        self.param = (
            param if param is not None else (self.errors[0]["field"] if self.errors else None)
        )


def whole_seconds(seconds: float) -> int:
    """Seconds for Retry-After and RateLimit-Reset: whole, rounded up, at least 1."""
    return max(1, math.ceil(seconds))


def request_id(scope: Scope) -> str:
    return str(scope.get(REQUEST_ID, ""))


def relative_path(scope: Scope) -> str:
    """The path inside this app: under `Mount`, `path` keeps the mount prefix."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# Anthropic's error types by status, for the Messages routes: its SDKs raise by status,
# and Claude Code reads the type.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# The error shape the request's client reads ("ours", "openai", "anthropic"): recorded
# once for the request, from the route table, by the outermost middleware.
ERROR_SHAPE = "text_tool.error_shape"


def guessed_shape(path: str, anthropic: bool = False) -> str:
    """The shape for a path the route table gives none (the models' routes, which
    both SDKs call, or a 404): what a client of that prefix reads; under /v1 an
    Anthropic SDK's (it always sends `anthropic-version`) reads Anthropic's."""
    if path.startswith("/v1/messages") or (anthropic and path.startswith("/v1/")):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ours"


def shape_of(scope: Scope) -> str:
    shape = scope.get(ERROR_SHAPE)
    return shape if isinstance(shape, str) else guessed_shape(relative_path(scope))


def shaped(
    shape: str,
    type_: str,
    message: str,
    request_id: str,
    errors: Sequence[Mapping[str, str]] | None = None,
    param: str | None = None,
    status: int = 400,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Our error shape; OpenAI's (ours, with `code` and `param`); or Anthropic's
    (`{"type": "error", "error": {type, message[, details]}}`)."""
    if shape == "anthropic":
        kind = ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        inner: dict[str, Any] = {"type": kind, "message": message}
        if details is not None:
            inner["details"] = dict(details)
        return {"type": "error", "error": inner, "request_id": request_id}
    error: dict[str, Any] = {"type": type_, "message": message, "request_id": request_id}
    if errors is not None:
        error["errors"] = list(errors)
    if shape == "openai":
        error["code"] = type_
        error["param"] = param if param is not None else (errors[0]["field"] if errors else None)
    return {"error": error}


def error_body(
    scope: Scope,
    type_: str,
    message: str,
    errors: Sequence[Mapping[str, str]] | None = None,
    param: str | None = None,
    status: int = 400,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The error in the shape the request's client reads."""
    shape = shape_of(scope)
    return shaped(shape, type_, message, request_id(scope), errors, param, status, details)


def error_response(
    scope: Scope,
    status: int,
    type_: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[Mapping[str, str]] | None = None,
    param: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> JSONResponse:
    if status == 422 and shape_of(scope) != "ours":
        status = 400  # OpenAI's and Anthropic's APIs answer a schema violation with 400
    return JSONResponse(
        error_body(scope, type_, message, errors, param, status, details),
        status_code=status,
        headers=dict(headers or {}),
    )


def api_error_response(scope: Scope, exc: ApiError) -> JSONResponse:
    return error_response(
        scope,
        exc.status,
        exc.type,
        exc.message,
        headers=exc.headers,
        errors=exc.errors,
        param=exc.param,
        details=exc.details,
    )


def provider_api_error(exc: ProviderError) -> ApiError:
    """The one place where provider failures become HTTP answers."""
    if isinstance(exc, ProviderTimeout):
        return ApiError(504, "upstream_timeout", str(exc))
    if isinstance(exc, ProviderRateLimited):
        retry = whole_seconds(exc.retry_after_s or 1)
        return ApiError(429, "rate_limit_exceeded", str(exc), headers={"Retry-After": str(retry)})
    if isinstance(exc, ProviderBadRequest):
        return ApiError(400, "invalid_request", str(exc))
    return ApiError(502, "upstream_error", str(exc))
