"""The OpenAI-compatible surface: POST /v1/chat/completions and GET /v1/models.

To an OpenAI-protocol provider the client's body goes through as written (fields we
do not interpret included), with our model choice and our keys, limits and
accounting. To Anthropic and echo it is translated, and a feature that cannot be
translated is a 400 naming it, never silently dropped.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

import llm
from errors import ApiError, request_id
from jsonio import JSONResponse
from service import (
    StreamMeter,
    account,
    allowed_models,
    caller,
    choose_model,
    integral,
    parse_body,
    prompt_estimate,
    provider_call,
    reserve,
    route,
    service,
)
from streaming import DONE, open_sse, sse_frame
from usage import Usage

PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(integral)]
DEFAULT_MAX_TOKENS = 4096  # Anthropic needs one; OpenAI's default is the model's maximum


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class ChatCompletionBody(BaseModel):
    """OpenAI's chat request; fields not named here pass through to OpenAI servers."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: PositiveInt | None = None


def _unsupported(what: str, provider: str) -> ApiError:
    return ApiError(
        400, "invalid_request", f"{what} cannot be translated for the {provider} provider"
    )


def _text(content: str | list[dict[str, Any]] | None, where: str, provider: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _unsupported(f"{where}: content part of type {part.get('type')!r}", provider)
        parts.append(part["text"])
    return "".join(parts)


def translate(request: Request, body: ChatCompletionBody, model: str) -> llm.ChatRequest:
    """The request for a provider that does not speak OpenAI's protocol."""
    provider = service(request).provider.name
    extra = sorted(body.model_extra or {})
    if extra:
        raise _unsupported(", ".join(extra), provider)
    if body.n not in (None, 1):
        raise _unsupported("n > 1", provider)
    system: list[str] = []
    messages: list[llm.Message] = []
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        if message.model_extra:
            raise _unsupported(f"{where}: {', '.join(sorted(message.model_extra))}", provider)
        if message.role == "tool":
            raise _unsupported(f"{where}: the tool role", provider)
        text = _text(message.content, where, provider)
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            messages.append(llm.Message(message.role, text))
    if not messages:
        raise ApiError(400, "invalid_request", "messages needs a user message")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return llm.ChatRequest(
        model=model,
        messages=tuple(messages),
        system="\n\n".join(system) or None,
        max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        user=body.user,
        request_id=request_id(request.scope),
    )


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def completion_object(result: llm.Completion) -> dict[str, Any]:
    return {
        "id": result.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage_object(result.usage),
    }


async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionBody)
    model = choose_model(request, body.model)
    provider = service(request).provider
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if provider.passes_through:
        raw = body.model_dump(mode="json", exclude_unset=True)
        raw["model"] = model
        most = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
        await reserve(request, model, _estimate(raw, 0).input_tokens, most)
        if body.stream:
            # Always ask for usage: the accounting needs it, whatever the client wants.
            raw["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
            frames = _passthrough_frames(request, provider, raw, include_usage)
            return await open_sse(request, frames)
        rid = request_id(request.scope)
        stayed, data = await provider_call(request, lambda: provider.passthrough(raw, rid))
        if not stayed or data is None:
            return Response(status_code=499)
        _account_openai_answer(request, raw, data)
        return JSONResponse(data)

    chat = translate(request, body, model)
    await reserve(request, model, prompt_estimate(chat), chat.max_tokens)
    if body.stream:
        return await open_sse(request, _translated_frames(request, chat, include_usage))
    stayed, result = await provider_call(request, lambda: provider.complete(chat))
    if not stayed or result is None:
        return Response(status_code=499)
    account(request, result.model, result.usage, result.finish_reason)
    return JSONResponse(completion_object(result))


def _finish(choices: Any) -> str | None:
    for choice in choices or ():
        if isinstance(choice, dict) and choice.get("finish_reason"):
            return llm.OPENAI_FINISH.get(str(choice["finish_reason"]), "stop")
    return None


def _estimate(body: dict[str, Any], output_tokens: int) -> Usage:
    text = "".join(
        m["content"] if isinstance(m.get("content"), str) else str(m.get("content") or "")
        for m in body.get("messages", ())
    )
    return Usage(
        input_tokens=llm.estimate_tokens(text), output_tokens=output_tokens, estimated=True
    )


def _account_openai_answer(request: Request, body: dict[str, Any], data: dict[str, Any]) -> None:
    choices = data.get("choices") or []
    usage = llm.openai_usage(data.get("usage"))
    if usage is None:
        message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        usage = _estimate(body, llm.estimate_tokens(text if isinstance(text, str) else ""))
    account(request, str(data.get("model") or body["model"]), usage, _finish(choices) or "stop")


async def _passthrough_frames(
    request: Request, provider: llm.Provider, body: dict[str, Any], include_usage: bool
) -> AsyncGenerator[bytes, None]:
    chunks = provider.passthrough_stream(body, request_id(request.scope))
    model, finish = str(body["model"]), "stop"
    usage: Usage | None = None
    meter = StreamMeter(request, model, lambda: _estimate(body, 0).input_tokens)
    try:
        async for data, obj in chunks:
            model = str(obj.get("model") or model)
            finish = _finish(obj.get("choices")) or finish
            chunk_usage = llm.openai_usage(obj.get("usage"))
            if chunk_usage is not None:
                usage = chunk_usage
                if not include_usage and not obj.get("choices"):
                    continue  # the usage chunk this client did not ask for
            meter.sent += 1
            if not data or "\n" in data or "\r" in data:
                # Re-framed as one data: line: a multi-line event or a bare CR would
                # reach the client's parser as broken JSON.
                yield sse_frame(obj)
            else:
                yield b"data: " + data.encode() + b"\n\n"
        meter.settle(model, usage or _estimate(body, meter.sent), finish)
        yield DONE
    finally:
        await chunks.aclose()
        meter.close()


async def _translated_frames(
    request: Request, chat: llm.ChatRequest, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    events = service(request).provider.stream(chat)
    meter = StreamMeter(request, chat.model, lambda: prompt_estimate(chat))
    head = {
        "id": "chatcmpl-" + os.urandom(16).hex(),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": chat.model,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if include_usage else {}
        return sse_frame({**head, "choices": [choice], **extra})

    try:
        async for item in events:
            if meter.sent == 0:
                yield chunk({"role": "assistant", "content": ""})
            if isinstance(item, llm.StreamEnd):
                meter.settle(item.model, item.usage, item.finish_reason)
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield sse_frame({**head, "choices": [], "usage": usage_object(item.usage)})
                yield DONE
                return
            yield chunk({"content": item})
            meter.sent += 1
    finally:
        await events.aclose()
        meter.close()


async def list_models(request: Request) -> Response:
    svc = service(request)
    models = allowed_models(svc.settings, caller(request))
    owner = svc.provider.name
    return JSONResponse(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": owner} for m in models],
        }
    )


routes = [
    route("/v1/chat/completions", chat_completions, "POST"),
    route("/v1/models", list_models, "GET"),
]
