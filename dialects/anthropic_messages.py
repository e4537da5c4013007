"""Anthropic's Messages API, both ways: the format the `anthropic` provider (Anthropic,
or vLLM, Ollama, llama.cpp and SGLang's `/v1/messages`) is called in.

Anthropic takes the system prompt apart from the messages, so the request's system
and developer messages are folded, in order, into its top-level `system`. Its usage
counts cached input apart from `input_tokens`; ours is the total.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import chat
from dialects import integer, json_object
from errors import ProviderError, ProviderUnavailable
from usage import Usage

WIRE = "anthropic_messages"
PATH = "/v1/messages"
VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # required by Anthropic; OpenAI's default is the model's maximum

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Errors mid-stream that say the provider, not the request, failed.
_UNAVAILABLE = {"overloaded_error", "api_error"}


def auth_headers(key: str) -> dict[str, str]:
    return {"anthropic-version": VERSION, "x-api-key": key}


def encode_request(request: chat.Request, *, stream: bool) -> dict[str, Any]:
    system = [m.text() for m in request.messages if m.role in ("system", "developer")]
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": [
            {"role": m.role, "content": m.text()}
            for m in request.messages
            if m.role not in ("system", "developer")
        ],
    }
    if request.temperature is not None:
        body["temperature"] = request.temperature
    elif request.top_p is not None:  # never both: Anthropic's newer models refuse it
        body["top_p"] = request.top_p
    if system:
        body["system"] = "\n\n".join(system)
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if stream:
        body["stream"] = True
    return body


def usage_of(data: Any, previous: Usage | None = None) -> Usage:
    """Anthropic's counts (cumulative, in a stream) onto what was known before."""
    before = previous or Usage()
    if not isinstance(data, dict):
        return before
    read = integer(data["cache_read_input_tokens"]) if "cache_read_input_tokens" in data else None
    written = (
        integer(data["cache_creation_input_tokens"])
        if "cache_creation_input_tokens" in data
        else None
    )
    cached = before.cached_input_tokens if read is None else read
    creation = before.cache_write_tokens if written is None else written
    if "input_tokens" in data:
        input_tokens = integer(data["input_tokens"]) + cached + creation
    else:
        input_tokens = before.input_tokens
    output = integer(data["output_tokens"]) if "output_tokens" in data else before.output_tokens
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output,
        cached_input_tokens=cached,
        cache_write_tokens=creation,
    )


def decode_response(data: dict[str, Any], request: chat.Request) -> chat.Completion:
    content = data.get("content")
    if not isinstance(content, list):
        raise ProviderError("the provider's answer has no content")
    text = "".join(
        str(block.get("text", ""))
        for block in content
        if isinstance(block, dict) and block.get("type") == "text"
    )
    native = str(data.get("stop_reason") or "end_turn")
    return chat.Completion(
        id=str(data.get("id") or chat.new_id("msg_")),
        model=str(data.get("model") or request.model),
        parts=(chat.Text(text),),
        finish_reason=FINISH.get(native, "stop"),
        usage=usage_of(data.get("usage")),
        native=native,
    )


class StreamDecoder:
    """Anthropic's events as `chat` events."""

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.done = False
        self.finish: str | None = None
        self.stop_sequence: str | None = None
        self.usage = Usage()

    def feed(self, event: str, data: str) -> Iterable[chat.Event]:
        obj = json_object(data)
        kind = event if event != "message" else str(obj.get("type", ""))
        if kind == "content_block_delta":
            delta = obj.get("delta")
            text = delta.get("text") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                return (chat.TextDelta(text),)
        elif kind == "message_start":
            message = obj.get("message") or {}
            self.model = str(message.get("model") or self.model)
            self.usage = usage_of(message.get("usage"), self.usage)
            return (chat.Start(str(message.get("id") or chat.new_id("msg_")), self.model),)
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.finish = str(delta["stop_reason"])
                self.stop_sequence = delta.get("stop_sequence")
            self.usage = usage_of(obj.get("usage"), self.usage)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            error = obj.get("error") or {}
            cls = ProviderUnavailable if error.get("type") in _UNAVAILABLE else ProviderError
            raise cls(f"the provider failed mid-stream: {error.get('message', '')}")
        return ()

    def end(self) -> chat.End | None:
        if self.finish is None and not self.done:
            return None  # cut off before the answer was complete
        native = self.finish or "end_turn"
        return chat.End(FINISH.get(native, "stop"), self.usage, native, self.stop_sequence)


def stream_decoder(request: chat.Request) -> StreamDecoder:
    return StreamDecoder(request.model)
