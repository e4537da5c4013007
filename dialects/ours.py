"""Our own format: `POST /complete` (one completion) and `POST /stream` (the same as
Server-Sent Events), as the contract in DESIGN.md fixes them.

    data: {"text":"Once"}
    ...
    event: usage
    data: {"id":"...","model":"...","finish_reason":"stop","input_tokens":12,...}

    data: [DONE]
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

import admission
import chat
import llm
import sse
from admission import JsonInt
from errors import ApiError, error_body, request_id
from jsonio import JSONResponse


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

    ping = sse.PING

    def __init__(self) -> None:
        self.id = ""

    def frames(self, event: chat.Event) -> list[bytes]:
        if isinstance(event, chat.TextDelta):
            return [sse.frame({"text": event.text})]
        if isinstance(event, chat.Start):
            self.id = event.id
        return []

    def last(self, end: chat.End, model: str, cost: float | None) -> list[bytes]:
        usage = _summary(self.id or chat.new_id(), model, end.finish_reason, end.usage, cost)
        return [sse.frame(usage, "usage"), sse.DONE]

    @staticmethod
    def error(error: ApiError, scope: Scope) -> bytes:
        return sse.frame(error_body(scope, error.type, error.message), "error")


async def _admitted(request: Request) -> tuple[admission.Ticket, chat.Request]:
    gate = admission.of(request)
    body = await gate.parse(request, CompleteBody)
    call = decode_request(body, gate.choose_model(request, body.model), request_id(request.scope))
    return await gate.admit(request, call), call


async def complete(request: Request) -> Response:
    ticket, call = await _admitted(request)
    completion = await llm.serve(
        request,
        call.model,
        lambda p, m: admission.of(request).call(request, p.complete(chat.with_model(call, m))),
    )
    cost = ticket.finish(completion)
    return JSONResponse(encode_response(completion, cost))


async def stream(request: Request) -> Response:
    ticket, call = await _admitted(request)

    async def attempt(provider: llm.Provider, model: str) -> Response:
        encoder = StreamEncoder()
        events = provider.stream(chat.with_model(call, model))
        return await sse.respond(request, sse.relay(ticket, events, encoder), encoder)

    return await llm.serve(request, call.model, attempt)
