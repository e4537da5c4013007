"""Our own format: `POST /complete` (one completion) and `POST /stream` (the same as
Server-Sent Events), as the contract in DESIGN.md fixes them.

    data: {"text":"Once"}
    ...
    event: usage
    data: {"id":"...","model":"...","finish_reason":"stop","input_tokens":12,...}

    data: [DONE]
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import chat
from dialects import DONE, PING, Decoded, Dialect, JsonInt, frame
from errors import ApiError, shaped


class CompleteBody(BaseModel):
    """The body of POST /complete and POST /stream."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=20000)
    max_tokens: JsonInt = Field(512, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    model: str | None = Field(None, min_length=1, max_length=200)
    system: str | None = Field(None, max_length=20000)


class StreamText(BaseModel):
    """One `data:` event of POST /stream."""

    text: str


class StreamUsage(BaseModel):
    """The `event: usage` of POST /stream."""

    id: str
    model: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


class CompleteResponse(BaseModel):
    id: str
    text: str
    model: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


def decode_request(body: CompleteBody, model: str, rid: str | None) -> chat.Request:
    return chat.user_text(
        body.prompt,
        system=body.system,
        model=model,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        request_id=rid,
    )


def _summary(
    id_: str, model: str, end_reason: str, usage: Any, cost: float | None
) -> dict[str, Any]:
    return {
        "id": id_,
        "model": model,
        "finish_reason": end_reason,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cost_usd": cost,
    }


def encode_response(completion: chat.Completion, cost: float | None) -> dict[str, Any]:
    summary = _summary(
        completion.id, completion.model, completion.finish_reason, completion.usage, cost
    )
    return {"id": completion.id, "text": completion.text, **summary}


class StreamEncoder:
    """`chat` events as our frames: a `data:` line a piece of text, then the usage."""

    ping = PING

    def __init__(self) -> None:
        self.id = ""

    def frames(self, event: chat.Event) -> list[bytes]:
        if isinstance(event, chat.TextDelta):
            return [frame({"text": event.text})]
        if isinstance(event, chat.Start):
            self.id = event.id
        return []

    def last(self, end: chat.End, model: str, cost: float | None) -> list[bytes]:
        usage = _summary(self.id or chat.new_id(), model, end.finish_reason, end.usage, cost)
        return [frame(usage, "usage"), DONE]

    @staticmethod
    def error(error: ApiError, request_id: str) -> bytes:
        return frame(shaped("ours", error.type, error.message, request_id), "error")


# --- the format, as the serving path uses it ------------------------------------------------


def decode(body: CompleteBody, model: str, rid: str | None) -> Decoded:
    return Decoded(decode_request(body, model, rid), [])


def answer(
    completion: chat.Completion, body: CompleteBody, call: chat.Request, cost: float | None
) -> dict[str, Any]:
    return encode_response(completion, cost)


def encoder(body: CompleteBody, call: chat.Request) -> StreamEncoder:
    return StreamEncoder()


# /complete and /stream: one body, answered whole or streamed by the route.
COMPLETE = Dialect(
    wire="ours", errors="ours", body=CompleteBody, decode=decode, answer=answer,
    encoder=encoder, streams=lambda body: False,
)  # fmt: skip
STREAM = dataclasses.replace(COMPLETE, streams=lambda body: True)
