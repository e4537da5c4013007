"""OpenAI's embeddings: `POST /v1/embeddings`, what every RAG stack calls.

To an OpenAI-protocol provider the body passes through (the model mapped, the
answer relayed); echo makes deterministic unit vectors from the text (llm.py), so a
pipeline can be tried offline, written here in OpenAI's shape; Anthropic has no
embeddings endpoint, and says so.
No fallback provider is tried: its vectors would not be the asked model's.
The key's limits, reservation, usage and cost apply as to any other call: an
embedding's cost is its input tokens at the model's input price.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

import chat
from dialects import Accounted, Decoded, Dialect, Passthrough, integer, integral, nothing
from usage import Usage

WIRE = "openai_embeddings"
PATH = "/embeddings"

MAX_DIMENSIONS = 8192
MAX_INPUTS = 2048  # OpenAI's own bound on the items of one request
# An embeddings answer may be this many times LLM_MAX_RESPONSE_BYTES (64 MiB by
# default): 2,048 inputs of 3,072 dimensions are 33 MB in base64, the SDKs' default.
ANSWER_SCALE = 4

PositiveInt = Annotated[int, Field(ge=1, le=MAX_DIMENSIONS), BeforeValidator(integral)]
TokenIds = list[Annotated[int, Field(ge=0), BeforeValidator(integral)]]
Texts = Annotated[
    list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)
]
Tokens = Annotated[
    list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)
]


class EmbeddingsBody(BaseModel):
    """OpenAI's embeddings request; fields not named here pass through to OpenAI."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, min_length=1, max_length=200)
    # A text, texts, a text as token ids, or texts as token ids.
    input: (
        Annotated[str, Field(min_length=1)]
        | Texts
        | Annotated[TokenIds, Field(min_length=1)]
        | Tokens
    )
    dimensions: PositiveInt | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def inputs(body: EmbeddingsBody) -> list[str | list[int]]:
    """The input as a list of items, each a text or a list of token ids."""
    value = body.input
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, int) for v in value):
        return [[v for v in value if isinstance(v, int)]]
    return [v for v in value if isinstance(v, str | list)]


def as_call(items: Sequence[str | list[int]], model: str, rid: str | None) -> chat.Request:
    """The call as admission counts it: its texts as the input (token ids as one
    token each); an embedding has no output, so one token is reserved for it."""
    texts = [item if isinstance(item, str) else " " * (4 * len(item) - 1) for item in items]
    message = chat.Message("user", tuple(chat.Text(t) for t in texts))
    return chat.Request(model=model, messages=(message,), max_tokens=1, request_id=rid)


def encoded(vector: list[float], encoding: str) -> list[float] | str:
    """`base64` is the little-endian float32 array, as OpenAI sends it (its SDKs ask
    for it by default and decode it)."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def answer(
    vectors: chat.Vectors, body: EmbeddingsBody, call: chat.Request, cost: float | None
) -> dict[str, Any]:
    """Vectors a provider made itself (echo), in OpenAI's shape."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors.vectors)
        ],
        "model": vectors.model,
        "usage": {"prompt_tokens": vectors.input_tokens, "total_tokens": vectors.input_tokens},
    }


def usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict) or "prompt_tokens" not in data:
        return None
    return Usage(input_tokens=integer(data.get("prompt_tokens")))


# --- the format, as the serving path uses it ------------------------------------------------


def decode(body: EmbeddingsBody, model: str, rid: str | None) -> Decoded:
    items = inputs(body)
    asked = tuple(item if isinstance(item, str) else tuple(item) for item in items)
    return Decoded(
        as_call(items, model, rid), [], embeddings=chat.Embeddings(model, asked, body.dimensions)
    )


def accounted(answer: dict[str, Any]) -> Accounted:
    model = answer.get("model")
    return Accounted(str(model) if model else None, usage_of(answer.get("usage")), "stop")


def raw_accounted(raw: bytes) -> Accounted | None:
    """What the accounting needs of a raw answer, without parsing it whole: a 2,048
    vector answer is up to 64 MB, hundreds of MB of objects parsed, for two fields.
    OpenAI's (and the compatible servers') `usage` and `model` come last or first; the
    vectors, numbers or base64, hold no quote, so the keys found are these. None: not
    an answer of that shape (it is then parsed whole, and refused if it is not JSON)."""
    body = raw.strip()
    if not (body.startswith(b"{") and body.endswith(b"}")):
        return None
    usage = _value_after(body[-_ENDS:], b"usage")
    if not isinstance(usage, dict):
        return None
    model = _value_after(body[-_ENDS:], b"model") or _value_after(body[:_ENDS], b"model")
    return Accounted(model if isinstance(model, str) else None, usage_of(usage), "stop")


_ENDS = 64 << 10  # how much of each end of an answer is looked at
_JSON = json.JSONDecoder()


def _value_after(text: bytes, key: bytes) -> Any:
    """The JSON value of the last `"key":` in `text`, or None."""
    at = text.rfind(b'"' + key + b'"')
    colon = text.find(b":", at + len(key) + 2) if at >= 0 else -1
    if colon < 0:
        return None
    try:
        value, _ = _JSON.raw_decode(text[colon + 1 :].decode().lstrip())
    except (ValueError, UnicodeDecodeError):
        return None
    return value


DIALECT = Dialect(
    wire=WIRE,
    errors="openai",
    body=EmbeddingsBody,
    decode=decode,
    answer=answer,
    passthrough=Passthrough(
        prepare=nothing, accounted=accounted, raw=raw_accounted, scale=ANSWER_SCALE
    ),
    # No fallback: another provider's vectors (echo's above all) are not this model's,
    # and would quietly spoil an index built with them. A failure is the client's to see.
    fallback=False,
    streams=lambda body: False,
)
