"""One module per wire format, each both ways: decoding and encoding requests, whole
answers and stream events, to and from `chat`. A route speaks its client's format;
a provider speaks its own; when the two are the same, the body passes through.

What every format's decoder shares is here: reading a provider's JSON, the 400 for a
field, and the decoded request with what of it no other format carries.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

import admission
import chat
import jsonio
from errors import ApiError, ProviderError


def bad(param: str, message: str) -> ApiError:
    """The 400 for one field of a client's body, named in `param`."""
    return ApiError(400, "invalid_request", f"{param}: {message}", param=param)


class Decoded:
    """A client's body read into `chat`, and what of it no other format can carry:
    `lost`, (field, what it asks for), each a 400 unless the body passes through; or
    `refused`, the error that kept the body from being read at all."""

    def __init__(
        self,
        request: chat.Request,
        lost: list[tuple[str, str]],
        refused: ApiError | None = None,
    ) -> None:
        self.request = request
        self.lost = lost
        self.refused = refused

    def as_is(self, wire: str) -> str | None:
        """`wire` when the body can only pass through (it has what no other format
        carries, or could not be read at all): for `llm.serve`'s choice."""
        return wire if self.refused is not None or self.lost else None

    def refusal(self, provider: str) -> ApiError | None:
        if self.refused is not None:
            return self.refused
        if not self.lost:
            return None
        param, what = self.lost[0]
        return bad(param, f"{what} cannot be translated for the {provider} provider")

    def translated(self, request: Request, provider: str, model: str) -> chat.Request:
        """The request for `provider` (and `model`, a fallback's) through the hub: the
        400 if it cannot be, what was dropped named in the access line."""
        refusal = self.refusal(provider)
        if refusal is not None:
            raise refusal
        if self.request.dropped:
            admission.note(request, dropped=list(self.request.dropped))
        return chat.with_model(self.request, model)


def json_object(data: str | bytes) -> dict[str, Any]:
    """A provider's JSON object, or the ProviderError for one that is not."""
    try:
        value = jsonio.loads(data)
    except ValueError:
        raise ProviderError("the provider sent an answer that is not JSON") from None
    if not isinstance(value, dict):
        raise ProviderError("the provider sent an answer that is not a JSON object")
    return value


def integer(value: Any) -> int:
    """A count as a provider sent it; anything but an integer counts 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def error_message(data: Any) -> str:
    """The human message inside an OpenAI or Anthropic error body, if there is one."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return ""
