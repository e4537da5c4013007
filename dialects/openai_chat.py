"""OpenAI's Chat Completions, both ways: the `/v1/chat/completions` route our clients
call, and the format the `openai` provider (OpenAI, vLLM, Ollama, llama.cpp, SGLang,
Groq...) is called in.

To an OpenAI-protocol provider the client's body passes through as written (fields we
do not interpret included), with our model choice, keys, limits and accounting; the
provider's chunks are relayed, each re-framed as one `data:` line. To any other it is
translated through `chat`, and a feature that cannot be translated is a 400 naming
it, never silently dropped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

import admission
import chat
import jsonio
import llm
import sse
from dialects import error_message, integer, json_object
from errors import ApiError, ProviderError, error_body, request_id
from jsonio import JSONResponse
from usage import Usage

WIRE = "openai_chat"
PATH = "/chat/completions"
DEFAULT_MAX_TOKENS = 4096  # Anthropic needs one; OpenAI's default is the model's maximum

FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def auth_headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


# --- the request ---------------------------------------------------------------------

PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(admission.integral)]


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


def decode_request(
    body: ChatCompletionBody, model: str, rid: str | None
) -> tuple[chat.Request, list[str]]:
    """The canonical request, and what in the body it cannot carry (a 400 unless the
    body passes through to a provider that speaks this format)."""
    lost = [f"{name}" for name in sorted(body.model_extra or {})]
    if body.n not in (None, 1):
        lost.append("n > 1")
    messages: list[chat.Message] = []
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        if message.model_extra:
            lost.append(f"{where}: {', '.join(sorted(message.model_extra))}")
        if message.role == "tool":
            lost.append(f"{where}: the tool role")
            continue
        parts: list[chat.Part] = []
        if isinstance(message.content, str):
            parts.append(chat.Text(message.content))
        for part in message.content if isinstance(message.content, list) else ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                lost.append(f"{where}: content part of type {part.get('type')!r}")
                continue
            parts.append(chat.Text(part["text"]))
        messages.append(chat.Message(message.role, tuple(parts)))
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    request = chat.Request(
        model=model,
        messages=tuple(messages),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        user=body.user,
        request_id=rid,
    )
    return request, lost


def encode_request(request: chat.Request, *, stream: bool) -> dict[str, Any]:
    """The body for an OpenAI-protocol provider."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in request.messages
    ]
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = list(request.stop)
    if request.user:
        body["user"] = request.user
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# --- answers -------------------------------------------------------------------------


def usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    details = data.get("prompt_tokens_details")
    cached = integer(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(
        input_tokens=integer(data.get("prompt_tokens")),
        output_tokens=integer(data.get("completion_tokens")),
        cached_input_tokens=cached,
    )


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def decode_response(data: dict[str, Any], request: chat.Request) -> chat.Completion:
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        native = str(choice.get("finish_reason") or "stop")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ProviderError("the provider's answer has no choices") from None
    return chat.Completion(
        id=str(data.get("id") or chat.new_id()),
        model=str(data.get("model") or request.model),
        parts=(chat.Text(str(text)),),
        finish_reason=FINISH.get(native, "stop"),
        usage=usage_of(data.get("usage")) or Usage(estimated=True),
        native=native,
    )


def encode_response(completion: chat.Completion) -> dict[str, Any]:
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage_object(completion.usage),
    }


class StreamDecoder:
    """A provider's chunks as `chat` events (its first choice: ours are one choice)."""

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.started = False
        self.done = False
        self.finish: str | None = None
        self.usage: Usage | None = None

    def feed(self, event: str, data: str) -> Iterable[chat.Event]:
        if data == "[DONE]":
            self.done = True
            return ()
        return self.chunk(json_object(data))

    def chunk(self, obj: dict[str, Any]) -> list[chat.Event]:
        if "error" in obj:
            raise ProviderError(f"the provider failed mid-stream: {error_message(obj)}")
        events: list[chat.Event] = []
        if not self.started:
            self.started = True
            self.model = str(obj.get("model") or self.model)
            events.append(chat.Start(str(obj.get("id") or chat.new_id("chatcmpl-")), self.model))
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                events.append(chat.TextDelta(text))
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        if obj.get("usage"):  # the last chunk only, mostly
            self.usage = usage_of(obj["usage"]) or self.usage
        return events

    def end(self) -> chat.End | None:
        if self.finish is None and not self.done:
            return None  # cut off before the answer was complete
        native = self.finish or "stop"
        usage = self.usage or Usage(estimated=True)
        return chat.End(FINISH.get(native, "stop"), usage, native)


def stream_decoder(request: chat.Request) -> StreamDecoder:
    return StreamDecoder(request.model)


class StreamEncoder:
    """`chat` events as Chat Completions chunks, for a client of this format."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.head = {
            "id": "chatcmpl-" + chat.new_id(""),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self.include_usage = include_usage
        self.started = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if self.include_usage else {}
        return sse.frame({**self.head, "choices": [choice], **extra})

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True  # the role chunk, once
        return [self._chunk({"role": "assistant", "content": ""})]

    def frames(self, event: chat.Event) -> list[bytes]:
        out = self._start()
        if isinstance(event, chat.TextDelta):
            out.append(self._chunk({"content": event.text}))
        return out

    def last(self, end: chat.End, model: str, cost: float | None) -> list[bytes]:
        out = [*self._start(), self._chunk({}, end.finish_reason)]
        if self.include_usage:
            out.append(sse.frame({**self.head, "choices": [], "usage": usage_object(end.usage)}))
        out.append(sse.DONE)
        return out

    @staticmethod
    def error(error: ApiError, scope: Scope) -> bytes:
        return sse.frame(error_body(scope, error.type, error.message), "error")


# --- the route -------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    gate = admission.of(request)
    raw = await gate.read_body(request)
    body = gate.validate(raw, ChatCompletionBody)
    call, lost = decode_request(
        body, gate.choose_model(request, body.model), request_id(request.scope)
    )
    ticket = await gate.admit(request, call)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def attempt(provider: llm.Provider, model: str) -> Response:
        relay = llm.passthrough(provider, WIRE)
        if relay is not None:
            data = jsonio.loads(raw)
            data["model"] = model
            return await _passed_through(request, ticket, relay, data, include_usage)
        if lost:
            raise ApiError(
                400,
                "invalid_request",
                f"{', '.join(lost)} cannot be translated for the {provider.name} provider",
            )
        translated = chat.with_model(call, model)
        if body.stream:
            encoder = StreamEncoder(model, include_usage)
            frames = sse.relay(ticket, provider.stream(translated), encoder)
            return await sse.respond(request, frames, encoder)
        completion = await gate.call(request, provider.complete(translated))
        ticket.settle(completion.model, completion.usage, completion.finish_reason)
        return JSONResponse(encode_response(completion))

    return await llm.of(request).run(call.model, attempt)


async def _passed_through(
    request: Request,
    ticket: admission.Ticket,
    relay: llm.HttpProvider,
    data: dict[str, Any],
    include_usage: bool,
) -> Response:
    """The client's body to a provider of its own format, the answer as it came."""
    rid = request_id(request.scope)
    if not data.get("stream"):
        answer = await admission.of(request).call(request, relay.post(data, rid))
        usage = usage_of(answer.get("usage"))
        if usage is None:
            choices = answer.get("choices")
            message = (
                choices[0].get("message") if choices and isinstance(choices[0], dict) else None
            )
            text = message.get("content") if isinstance(message, dict) else None
            usage = ticket.estimate(chat.estimate_tokens(text if isinstance(text, str) else ""))
        ticket.settle(str(answer.get("model") or data["model"]), usage, _finish(answer) or "stop")
        return JSONResponse(answer)
    # Always ask for usage: the accounting needs it, whatever the client wants.
    data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
    encoder = StreamEncoder(str(data["model"]), include_usage)
    return await sse.respond(request, _relayed(ticket, relay, data, include_usage, rid), encoder)


def _finish(obj: dict[str, Any]) -> str | None:
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason"):
            return FINISH.get(str(choice["finish_reason"]), "stop")
    return None


async def _relayed(
    ticket: admission.Ticket,
    relay: llm.HttpProvider,
    data: dict[str, Any],
    include_usage: bool,
    rid: str,
) -> AsyncGenerator[bytes, None]:
    """The provider's chunks, each re-framed as one data: line (a multi-line event or a
    bare CR would reach the client's parser as broken JSON), read as `chat` events for
    the accounting, and cut as `length` past the body's max tokens."""
    decoder = StreamDecoder(str(data["model"]))
    model = str(data["model"])
    try:
        async with relay.open_stream(data, rid) as events:
            async for _, text in events:
                if text == "[DONE]":
                    break
                obj = json_object(text)
                try:
                    counted = [e for e in decoder.chunk(obj) if isinstance(e, chat.TextDelta)]
                except ProviderError as exc:
                    raise relay.redacted(exc) from None
                model = str(obj.get("model") or model)
                if not all(ticket.counts(e) for e in counted):
                    cut = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
                    yield sse.frame({**obj, "choices": [cut], "usage": None})
                    decoder.finish, decoder.usage = "length", None
                    break
                if obj.get("usage") and not include_usage and not obj.get("choices"):
                    continue  # the usage chunk this client did not ask for
                if "\n" in text or "\r" in text:
                    yield sse.frame(obj)
                else:
                    yield b"data: " + text.encode() + b"\n\n"
        end = decoder.end()
        if end is None:
            raise ProviderError("the provider's stream ended before the answer was complete")
        usage = end.usage if not end.usage.estimated else ticket.estimate(ticket.sent)
        ticket.settle(model, usage, end.finish_reason)
        yield sse.DONE
    finally:
        ticket.close()


async def list_models(request: Request) -> Response:
    gate = admission.of(request)
    models = gate.allowed_models(admission.caller(request))
    owner = llm.of(request).name
    return JSONResponse(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": owner} for m in models],
        }
    )
