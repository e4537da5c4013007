"""Anthropic's Messages API, both ways: the format the `anthropic` provider (Anthropic,
or vLLM, Ollama, llama.cpp and SGLang's `/v1/messages`) is called in.

From `chat` to Anthropic: system and developer messages are folded, in order, into
the top-level `system` (Anthropic takes no system role in `messages`); a run of tool
results becomes one user turn that starts with every `tool_result`, any text after
them; consecutive turns of one role merge and empty text blocks drop. Tool calls
become `tool_use` blocks (their arguments must be a JSON object), images and PDFs
become `image` and `document` blocks (an https URL, or base64 from a `data:` URL),
a reasoning effort a thinking budget below `max_tokens`, and structured output
`output_config.format` with the schema cut down as Anthropic's SDKs cut it, or, for
a model without it, a forced tool whose input is the answer. Thinking is signed:
a signed block goes back only to the origin that made it.

From Anthropic to `chat`: text, `tool_use`, `thinking` and `redacted_thinking`
blocks, whole or streamed; its usage counts cached input apart from `input_tokens`,
ours is the total.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from typing import Any

import chat
import jsonio
import schemas
from dialects import integer, json_object
from errors import ApiError, ProviderError, ProviderUnavailable
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
# Thinking budgets for an effort, below max_tokens and at least Anthropic's 1,024.
BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768,
           "max": 32768}  # fmt: skip
MIN_BUDGET = 1024
# Models that take `output_config.format`; others get the forced-tool fallback.
_STRUCTURED = re.compile(r"^claude-(opus|sonnet|haiku)-(4-[1-9](?![0-9])|[5-9])")
ANSWER_TOOL = "json_answer"
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def auth_headers(key: str) -> dict[str, str]:
    return {"anthropic-version": VERSION, "x-api-key": key}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", f"{param}: {message}", param=param)


# --- the request ---------------------------------------------------------------------


def answer_tool(request: chat.Request) -> str | None:
    """The name of the tool that carries a structured answer, when this request needs
    the forced-tool fallback (a JSON schema, a model without `output_config.format`,
    no thinking)."""
    form = request.response_format
    if form is None or form.kind != "json_schema" or _STRUCTURED.match(request.model):
        return None
    if _thinking(request) is not None:
        return None
    names = {tool.name for tool in request.tools}
    name = ANSWER_TOOL
    while name in names:
        name += "_"
    return name


def encode_request(request: chat.Request, *, stream: bool, origin: str = "") -> dict[str, Any]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role in ("system", "developer"):
            system += [_text(p) for p in message.parts if isinstance(p, chat.Text) and p.text]
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message, origin)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            _merge(turns[-1]["content"], blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # one plain text block is sent as the string it is
        content = turn["content"]
        if len(content) == 1 and content[0]["type"] == "text" and "cache_control" not in content[0]:
            turn["content"] = content[0]["text"]
    thinking = _thinking(request)
    most = request.max_tokens or DEFAULT_MAX_TOKENS
    if thinking is not None and request.max_tokens is None:
        most = thinking["budget_tokens"] + DEFAULT_MAX_TOKENS
    body: dict[str, Any] = {"model": request.model, "max_tokens": most, "messages": turns}
    if thinking is not None:
        body["thinking"] = thinking  # and no temperature nor top_k: Anthropic refuses them
    elif request.temperature is not None:
        body["temperature"] = request.temperature
    elif request.top_p is not None:  # never both: Anthropic's newer models refuse it
        body["top_p"] = request.top_p
    if request.top_k is not None and thinking is None:
        body["top_k"] = request.top_k
    form = request.response_format
    forced = answer_tool(request)
    if form is not None and form.kind == "json_object":
        system.append({"type": "text", "text": "Answer with one JSON object, and nothing "
                       "before or after it: no prose, no code fence."})  # fmt: skip
    elif form is not None and forced is None:
        try:
            cut = schemas.for_anthropic(form.schema or {"type": "object"})
        except schemas.SchemaError as exc:
            raise bad("response_format.json_schema.schema", str(exc)) from None
        body["output_config"] = {"format": {"type": "json_schema", "schema": cut}}
    tools = [_tool(tool) for tool in request.tools]
    if forced is not None and form is not None:
        description = "Give your answer by calling this tool: its input is the answer."
        tools.append({"name": forced, "description": description,
                      "input_schema": dict(form.schema or {"type": "object"})})  # fmt: skip
        body["tool_choice"] = {"type": "tool", "name": forced}
    elif request.tools and request.tool_choice is not None:
        body["tool_choice"] = _tool_choice(request.tool_choice)
    if tools:
        body["tools"] = tools
    if system:
        body["system"] = (
            "\n\n".join(b["text"] for b in system)
            if not any("cache_control" in b for b in system)
            else system
        )
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if stream:
        body["stream"] = True
    return body


def _thinking(request: chat.Request) -> dict[str, Any] | None:
    """Anthropic's `thinking` for the request's reasoning, or None: off when asked off,
    when a tool is forced (Anthropic refuses both), when the budget would not fit
    under max_tokens, or when the last assistant turn that called a tool carries no
    signed thinking (Anthropic refuses that history with thinking on)."""
    reasoning = request.reasoning
    if reasoning is None or not reasoning.enabled:
        return None
    choice = request.tool_choice
    if choice is not None and choice.mode in ("required", "tool"):
        return None
    budget = reasoning.budget_tokens or BUDGETS.get(reasoning.effort or "medium", 8192)
    if request.max_tokens is not None:
        budget = min(budget, request.max_tokens - 1)
    if budget < MIN_BUDGET:
        return None
    for message in reversed(request.messages):
        if message.role == "assistant" and any(isinstance(p, chat.ToolCall) for p in message.parts):
            if not any(isinstance(p, chat.Reasoning) and p.signature for p in message.parts):
                return None
            break
    return {"type": "enabled", "budget_tokens": budget}


def _tool(tool: chat.Tool) -> dict[str, Any]:
    if tool.kind == "custom":  # a freeform tool: one string argument
        schema: Mapping[str, Any] = {"type": "object", "properties": {"input": {"type": "string"}},
                                     "required": ["input"]}  # fmt: skip
    else:
        schema = tool.parameters or {"type": "object", "properties": {}}
    out: dict[str, Any] = {"name": tool.name, "input_schema": dict(schema)}
    if tool.description:
        out["description"] = tool.description
    if tool.strict:
        out["strict"] = True
    if tool.cache_control is not None:
        out["cache_control"] = dict(tool.cache_control)
    return out


def _tool_choice(choice: chat.ToolChoice) -> dict[str, Any]:
    kind = {"auto": "auto", "none": "none", "required": "any", "tool": "tool"}[choice.mode]
    out: dict[str, Any] = {"type": kind}
    if choice.mode == "tool":
        out["name"] = choice.name
    if not choice.parallel and kind != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _merge(into: list[dict[str, Any]], blocks: list[dict[str, Any]]) -> None:
    """Blocks of the next message of one role: tool results go before the turn's
    other blocks (Anthropic reads them first), the rest after."""
    results = [b for b in blocks if b["type"] == "tool_result"]
    others = [b for b in blocks if b["type"] != "tool_result"]
    at = next((i for i, b in enumerate(into) if b["type"] != "tool_result"), len(into))
    into[at:at] = results
    into.extend(others)


def _blocks(message: chat.Message, origin: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, chat.Text):
            if part.text:
                blocks.append(_text(part))
        elif isinstance(part, chat.Image | chat.Document):
            blocks.append(_media(part))
        elif isinstance(part, chat.ToolCall):
            blocks.append({"type": "tool_use", "id": legal_id(part.id), "name": part.name,
                           "input": _input(part)})  # fmt: skip
        elif isinstance(part, chat.ToolResult):
            content: list[dict[str, Any]] = [
                _text(p) if isinstance(p, chat.Text) else _media(p)
                for p in part.content
                if not isinstance(p, chat.Text) or p.text
            ]
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": legal_id(part.call_id)}
            if content:
                result["content"] = content
            if part.is_error:
                result["is_error"] = True
            blocks.append(result)
        elif isinstance(part, chat.Reasoning):
            # Signed or redacted thinking goes back to its own origin only.
            if part.origin != origin or not origin:
                continue
            if part.opaque is not None:
                blocks.append({"type": "redacted_thinking", "data": part.opaque})
            elif part.signature:
                blocks.append({"type": "thinking", "thinking": part.text,
                               "signature": part.signature})  # fmt: skip
        elif isinstance(part, chat.Refusal):
            blocks.append({"type": "text", "text": part.text})
    return blocks


def _text(part: chat.Text) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": part.text}
    if part.cache_control is not None:
        block["cache_control"] = dict(part.cache_control)
    return block


def _input(call: chat.ToolCall) -> Any:
    try:
        value = jsonio.loads(call.arguments or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise bad("tool_calls", f"the arguments of tool call {call.id!r} are not a JSON object")
    return value


def _media(part: chat.Image | chat.Document) -> dict[str, Any]:
    kind = "image" if isinstance(part, chat.Image) else "document"
    url = part.url
    if url.startswith("https://"):
        return {"type": kind, "source": {"type": "url", "url": url}}
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media_type = head[5:].split(";")[0].lower()
        allowed = _IMAGE_TYPES if kind == "image" else {"application/pdf"}
        if ";base64" not in head or media_type not in allowed:
            raise bad("content", f"a {kind} must be base64 of {', '.join(sorted(allowed))}")
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad("content", f"the {kind}'s data: URL is not valid base64") from None
        return {"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}
    raise bad("content", f"a {kind} URL must be https:// or a data: URL")


def legal_id(value: str) -> str:
    """A tool call id as Anthropic takes it (letters, digits, _ and -): verbatim when
    it is, else made so the same way every time, so a history maps the same twice."""
    if _ID.match(value):
        return value
    return chat.shortened(re.sub(r"[^A-Za-z0-9_-]", "_", value), value, 64)


# --- answers -------------------------------------------------------------------------


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
    by_ttl = data.get("cache_creation")
    hour = (
        integer(by_ttl.get("ephemeral_1h_input_tokens"))
        if isinstance(by_ttl, dict)
        else before.cache_write_1h_tokens
    )
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
        cache_write_1h_tokens=hour,
    )


def _finish(native: str, called: bool) -> str:
    return "tool_calls" if called else FINISH.get(native, "stop")


def decode_response(
    data: dict[str, Any], request: chat.Request, origin: str = ""
) -> chat.Completion:
    content = data.get("content")
    if not isinstance(content, list):
        raise ProviderError("the provider's answer has no content")
    forced = answer_tool(request)
    parts: list[chat.Part] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(chat.Text(str(block.get("text", ""))))
        elif kind == "tool_use" and block.get("name") == forced:
            parts.append(chat.Text(jsonio.dumps(block.get("input") or {}).decode()))
        elif kind == "tool_use":
            arguments = jsonio.dumps(block.get("input") or {}).decode()
            parts.append(chat.ToolCall(str(block.get("id")), str(block.get("name")), arguments))
        elif kind == "thinking":
            thought = str(block.get("thinking", ""))
            parts.append(chat.Reasoning(thought, signature=block.get("signature"), origin=origin))
        elif kind == "redacted_thinking":
            parts.append(chat.Reasoning(opaque=str(block.get("data", "")), origin=origin))
    native = str(data.get("stop_reason") or "end_turn")
    called = any(isinstance(p, chat.ToolCall) for p in parts)
    return chat.Completion(
        id=str(data.get("id") or chat.new_id("msg_")),
        model=str(data.get("model") or request.model),
        parts=tuple(parts) or (chat.Text(""),),
        finish_reason="stop" if forced and not called else _finish(native, called),
        usage=usage_of(data.get("usage")),
        native=native,
    )


class StreamDecoder:
    """Anthropic's events as `chat` events. Its block indices count text and thinking
    blocks too; a tool call's `chat` index counts calls only."""

    def __init__(self, model: str = "", origin: str = "", answer_tool: str | None = None) -> None:
        self.model = model
        self.origin = origin
        self.answer_tool = answer_tool
        self.done = False
        self.finish: str | None = None
        self.stop_sequence: str | None = None
        self.usage = Usage()
        self.blocks: dict[int, tuple[str, int]] = {}  # block index -> (kind, call index)
        self.argued: set[int] = set()  # calls that had arguments
        self.calls = 0

    def feed(self, event: str, data: str) -> Iterable[chat.Event]:
        obj = json_object(data)
        kind = event if event != "message" else str(obj.get("type", ""))
        if kind == "content_block_delta":
            return self._delta(obj)
        if kind == "content_block_start":
            return self._start(obj)
        if kind == "content_block_stop":
            block = self.blocks.get(integer(obj.get("index")))
            if block is not None and block[0] == "tool_use" and block[1] not in self.argued:
                return (chat.ToolCallDelta(block[1], "{}"),)  # a call with no input
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

    def _start(self, obj: dict[str, Any]) -> Iterable[chat.Event]:
        block = obj.get("content_block") or {}
        index = integer(obj.get("index"))
        kind = str(block.get("type"))
        if kind == "tool_use" and block.get("name") == self.answer_tool:
            self.blocks[index] = ("answer", -1)
        elif kind == "tool_use":
            self.blocks[index] = ("tool_use", self.calls)
            self.calls += 1
            return (
                chat.ToolCallStart(self.calls - 1, str(block.get("id")), str(block.get("name"))),
            )
        elif kind == "redacted_thinking":
            self.blocks[index] = (kind, -1)
            return (chat.ReasoningDelta(opaque=str(block.get("data", "")), origin=self.origin),)
        else:
            self.blocks[index] = (kind, -1)
            text = block.get("text") if kind == "text" else None
            if isinstance(text, str) and text:  # a server that sends the text with its start
                return (chat.TextDelta(text),)
        return ()

    def _delta(self, obj: dict[str, Any]) -> Iterable[chat.Event]:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return ()
        kind = delta.get("type")
        if kind == "text_delta" or (kind is None and "text" in delta):
            text = delta.get("text")
            return (chat.TextDelta(text),) if isinstance(text, str) and text else ()
        if kind == "input_json_delta":
            piece = str(delta.get("partial_json", ""))
            block, call = self.blocks.get(integer(obj.get("index")), ("tool_use", 0))
            if not piece:
                return ()
            if block == "answer":
                return (chat.TextDelta(piece),)
            self.argued.add(call)
            return (chat.ToolCallDelta(call, piece),)
        if kind == "thinking_delta":
            return (chat.ReasoningDelta(str(delta.get("thinking", "")), origin=self.origin),)
        if kind == "signature_delta":
            signature = str(delta.get("signature", ""))
            return (chat.ReasoningDelta(signature=signature, origin=self.origin),)
        return ()

    def end(self) -> chat.End | None:
        if self.finish is None and not self.done:
            return None  # cut off before the answer was complete
        native = self.finish or "end_turn"
        finish = "stop" if self.answer_tool and not self.calls else _finish(native, self.calls > 0)
        return chat.End(finish, self.usage, native, self.stop_sequence)


def stream_decoder(request: chat.Request, origin: str = "") -> StreamDecoder:
    return StreamDecoder(request.model, origin, answer_tool(request))
