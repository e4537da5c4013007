"""One module per wire format, each both ways: decoding and encoding requests, whole
answers and stream events, to and from `chat`. A route speaks its client's format;
a provider speaks its own; when the two are the same, the body passes through.

What every format's decoder needs of a provider's JSON is here.
"""

from __future__ import annotations

from typing import Any

import jsonio
from errors import ProviderError


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
