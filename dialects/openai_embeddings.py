"""OpenAI's embeddings: `POST /v1/embeddings`, what every RAG stack calls.

To an OpenAI-protocol provider the body passes through (the model mapped, the
answer relayed); echo answers deterministic unit vectors made from the text, so a
pipeline can be tried offline; Anthropic has no embeddings endpoint, and says so.
No fallback provider is tried: its vectors would not be the asked model's.
The key's limits, reservation, usage and cost apply as to any other call: an
embedding's cost is its input tokens at the model's input price.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

import admission
import chat
import jsonio
import llm
from dialects import integer
from errors import ApiError, request_id
from jsonio import JSONResponse
from usage import Usage

WIRE = "openai_embeddings"
PATH = "/embeddings"

ECHO_DIMENSIONS = 256  # echo's vectors unless `dimensions` asks otherwise
MAX_DIMENSIONS = 8192
MAX_INPUTS = 2048  # OpenAI's own bound on the items of one request
ECHO_MOST_NUMBERS = 1_000_000  # echo's answer, whatever inputs x dimensions ask (~20 MB)
# An embeddings answer may be this many times LLM_MAX_RESPONSE_BYTES (64 MiB by
# default): 2,048 inputs of 3,072 dimensions are 33 MB in base64, the SDKs' default.
ANSWER_SCALE = 4

PositiveInt = Annotated[int, Field(ge=1, le=MAX_DIMENSIONS), BeforeValidator(admission.integral)]
TokenIds = list[Annotated[int, Field(ge=0), BeforeValidator(admission.integral)]]
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


# --- echo's vectors ------------------------------------------------------------------


def _words(item: str | list[int]) -> list[str]:
    if isinstance(item, str):
        return item.lower().split()
    return [str(token) for token in item]


def echo_vector(item: str | list[int], dimensions: int) -> list[float]:
    """A unit vector made by hashing each word to a signed coordinate: the same text
    always gives the same vector, and texts sharing words point the same way, so a
    search over echo's embeddings finds the overlapping texts first."""
    vector = [0.0] * dimensions
    words = _words(item) or [""]
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dimensions
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:  # every word cancelled out
        vector[0], norm = 1.0, 1.0
    return [x / norm for x in vector]


def encoded(vector: list[float], encoding: str) -> list[float] | str:
    """`base64` is the little-endian float32 array, as OpenAI sends it (its SDKs ask
    for it by default and decode it)."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def echo_answer(
    body: EmbeddingsBody, items: Sequence[str | list[int]], model: str
) -> dict[str, Any]:
    dimensions = body.dimensions or ECHO_DIMENSIONS
    if len(items) * dimensions > ECHO_MOST_NUMBERS:
        raise ApiError(
            400, "invalid_request",
            f"echo makes at most {ECHO_MOST_NUMBERS:,} numbers an answer: "
            "fewer inputs or fewer dimensions",
            param="dimensions",
        )  # fmt: skip
    tokens = sum(len(_words(item)) for item in items)
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": encoded(echo_vector(item, dimensions), body.encoding_format),
            }
            for i, item in enumerate(items)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict) or "prompt_tokens" not in data:
        return None
    return Usage(input_tokens=integer(data.get("prompt_tokens")))


# --- the route -------------------------------------------------------------------------


async def embeddings(request: Request) -> Response:
    gate = admission.of(request)
    raw = await gate.read_body(request)
    body = gate.validate(raw, EmbeddingsBody)
    model = gate.choose_model(request, body.model)
    items = inputs(body)
    rid = request_id(request.scope)
    call = as_call(items, model, rid)
    ticket = await gate.admit(request, call)

    async def attempt(provider: llm.Provider, model: str) -> Response:
        if isinstance(provider, llm.EchoProvider):
            answer = echo_answer(body, items, model)
        else:
            relay = llm.passthrough(provider, WIRE)
            if relay is None:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"the {provider.name} provider has no embeddings endpoint; "
                    "use an OpenAI-protocol provider for embeddings",
                )
            data = jsonio.loads(raw)
            data["model"] = model
            path = relay.paths[WIRE]
            answer = await gate.call(request, relay.post(data, rid, path=path, scale=ANSWER_SCALE))
        usage = usage_of(answer.get("usage")) or ticket.estimate(0)
        ticket.settle(str(answer.get("model") or model), usage, "stop")
        return JSONResponse(answer)

    # No fallback: another provider's vectors (echo's above all) are not this model's,
    # and would quietly spoil an index built with them. A failure is the client's to see.
    return await llm.serve(request, model, attempt, fallback=False)
