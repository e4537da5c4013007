"""Anthropic's Messages API, both ways: the `/v1/messages` routes our clients (the
Anthropic SDKs, Claude Code) call, and the format the `anthropic` provider (Anthropic,
or vLLM, Ollama, llama.cpp and SGLang's `/v1/messages`) is called in.

To an Anthropic-protocol provider a client's body passes through as written, but for
the model; its `anthropic-version` and `anthropic-beta` headers and `?beta=true` go
with it, the provider's events are relayed re-framed, and its refusals come back with
their status and words. To any other it is translated through `chat`.

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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

import chat
import jsonio
import schemas
from dialects import (
    Accounted,
    Decoded,
    Dialect,
    Passthrough,
    Step,
    bad,
    integer,
    integral,
    json_object,
    nothing,
    own_api,
    reframed,
    text_size,
)
from errors import ANTHROPIC_TYPES, ApiError, ProviderError, ProviderUnavailable
from usage import Usage

WIRE = "anthropic_messages"
PATH = "/v1/messages"
VERSION = "2023-06-01"
# Message threads (stored.py): ours to keep, whatever the provider, never forwarded.
THREADS_BETA = "message-threads-2026-08-12"
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
BUDGETS = {
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 32768,
    "max": 32768,
}
MIN_BUDGET = 1024
# Models that take `output_config.format`; others get the forced-tool fallback.
_STRUCTURED = re.compile(r"^claude-(opus|sonnet|haiku)-(4-[1-9](?![0-9])|[5-9])")
ANSWER_TOOL = "json_answer"
# Anthropic's own API, which honours a named `tool_choice`.
ANTHROPIC_HOSTS = ("api.anthropic.com",)
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def auth_headers(key: str) -> dict[str, str]:
    return {"anthropic-version": VERSION, "x-api-key": key}


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
    runs: list[_Turn] = []
    for message in request.messages:
        if message.role in ("system", "developer"):
            system += [_text(p) for p in message.parts if isinstance(p, chat.Text) and p.text]
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message, origin)
        if not blocks:
            continue
        if runs and runs[-1].role == role:
            runs[-1].merge(blocks)
        else:
            runs.append(_Turn(role, blocks))
    turns: list[dict[str, Any]] = []
    for run in runs:  # one plain text block is sent as the string it is
        content: Any = run.results + run.rest
        if len(content) == 1 and content[0]["type"] == "text" and "cache_control" not in content[0]:
            content = content[0]["text"]
        turns.append({"role": run.role, "content": content})
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
        system.append(
            {
                "type": "text",
                "text": "Answer with one JSON object, and nothing "
                "before or after it: no prose, no code fence.",
            }
        )
    elif form is not None and forced is None:
        try:
            cut = schemas.for_anthropic(form.schema or {"type": "object"})
        except schemas.SchemaError as exc:
            raise bad("response_format.json_schema.schema", str(exc)) from None
        body["output_config"] = {"format": {"type": "json_schema", "schema": cut}}
    tools = [_tool(tool) for tool in request.tools]
    # A server that speaks the protocol but is not Anthropic's (llama.cpp's takes a named
    # tool as "any" tool) is sent the tool it must call alone: it means the same.
    alone = not own_api(origin, *ANTHROPIC_HOSTS)
    if forced is not None and form is not None:
        if alone:
            tools = []
        description = "Give your answer by calling this tool: its input is the answer."
        tools.append(
            {
                "name": forced,
                "description": description,
                "input_schema": dict(form.schema or {"type": "object"}),
            }
        )
        # One answer: a second call of it would be a second JSON text after the first.
        body["tool_choice"] = {"type": "tool", "name": forced, "disable_parallel_tool_use": True}
    elif request.tools and request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = _tool_choice(choice)
        named = [t for t in tools if t["name"] == choice.name]
        if choice.mode == "tool" and named and alone:
            tools = named
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
    if tool.kind == "custom":
        schema: Mapping[str, Any] = chat.FREEFORM
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


class _Turn:
    """One turn being made of consecutive messages of one role: the tool results of
    each next message go before the turn's other blocks (Anthropic reads them first),
    the rest after. Kept as the two runs, so that a merge costs what it adds, however
    long the turn (a turn of 21,000 results is not rescanned for each)."""

    __slots__ = ("role", "results", "rest")

    def __init__(self, role: str, blocks: list[dict[str, Any]]) -> None:
        at = next((i for i, b in enumerate(blocks) if b["type"] != "tool_result"), len(blocks))
        self.role = role
        self.results = blocks[:at]  # the turn's leading tool results
        self.rest = blocks[at:]  # everything from its first other block on

    def merge(self, blocks: list[dict[str, Any]]) -> None:
        self.results += [b for b in blocks if b["type"] == "tool_result"]
        self.rest += [b for b in blocks if b["type"] != "tool_result"]


def _blocks(message: chat.Message, origin: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, chat.Text):
            if part.text:
                blocks.append(_text(part))
        elif isinstance(part, chat.Image | chat.Document):
            blocks.append(_media(part))
        elif isinstance(part, chat.ToolCall):
            blocks.append(
                {
                    "type": "tool_use",
                    "id": legal_id(part.id),
                    "name": part.name,
                    "input": _input(part),
                }
            )
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
                blocks.append(
                    {"type": "thinking", "thinking": part.text, "signature": part.signature}
                )
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
    answer: chat.Text | None = None
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(chat.Text(str(block.get("text", ""))))
        elif kind == "tool_use" and forced and block.get("name") == forced:
            if answer is None:  # the first call is the answer; a server's second, not
                answer = chat.Text(jsonio.dumps(block.get("input") or {}).decode())
        elif kind == "tool_use":
            arguments = jsonio.dumps(block.get("input") or {}).decode()
            parts.append(chat.ToolCall(str(block.get("id")), str(block.get("name")), arguments))
        elif kind == "thinking":
            thought = str(block.get("thinking", ""))
            parts.append(chat.Reasoning(thought, signature=block.get("signature"), origin=origin))
        elif kind == "redacted_thinking":
            parts.append(chat.Reasoning(opaque=str(block.get("data", "")), origin=origin))
    if answer is not None:
        # The answer is the forced tool's input alone: text around the call (llama.cpp's
        # server writes some first) would make it something that is not JSON.
        parts = [p for p in parts if not isinstance(p, chat.Text)] + [answer]
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
        # With an answer tool forced, text is held until the answer comes (then it is
        # dropped: the answer is the tool's input alone) or the answer ends without it
        # (then it is the answer); past HELD_MOST characters it goes as it comes.
        self.started = False  # message_start seen (or stood in for)
        self.held: list[str] | None = [] if answer_tool else None
        self.held_size = 0
        self.answered = False

    def feed(self, event: str, data: str) -> Iterable[chat.Event]:
        obj = json_object(data)
        kind = event if event != "message" else str(obj.get("type", ""))
        if not self.started and kind in _CONTENT_EVENTS:
            # llama.cpp's server may leave message_start out (seen on sampled answers):
            # the answer starts all the same.
            self.started = True
            return (chat.Start(chat.new_id("msg_"), self.model), *self.feed(event, data))
        if kind == "content_block_delta":
            return self._delta(obj)
        if kind == "content_block_start":
            return self._start(obj)
        if kind == "content_block_stop":
            block = self.blocks.get(integer(obj.get("index")))
            if block is not None and block[0] == "tool_use" and block[1] not in self.argued:
                return (chat.ToolCallDelta(block[1], "{}"),)  # a call with no input
        elif kind == "message_start":
            self.started = True
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
            return self._unheld()
        elif kind == "message_stop":
            self.done = True
            return self._unheld()
        elif kind == "error":
            error = obj.get("error") or {}
            cls = ProviderUnavailable if error.get("type") in _UNAVAILABLE else ProviderError
            raise cls(f"the provider failed mid-stream: {error.get('message', '')}")
        return ()

    def _start(self, obj: dict[str, Any]) -> Iterable[chat.Event]:
        block = obj.get("content_block") or {}
        index = integer(obj.get("index"))
        kind = str(block.get("type"))
        if kind == "tool_use" and self.answer_tool and block.get("name") == self.answer_tool:
            # The first call is the answer; a server's second is not read (its input
            # would be a second JSON text after the first).
            self.blocks[index] = ("unread" if self.answered else "answer", -1)
            self.held, self.answered = None, True  # the text before it was not the answer
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
                return self._text(text)
        return ()

    def _text(self, text: str) -> tuple[chat.Event, ...]:
        if self.answered:
            return ()  # text after the forced answer: not part of it
        if self.held is not None:
            self.held.append(text)
            self.held_size += len(text)
            if self.held_size <= HELD_MOST:
                return ()
            return self._unheld()
        return (chat.TextDelta(text),)

    def _unheld(self) -> tuple[chat.Event, ...]:
        """The text held, when it turns out to be the answer."""
        if not self.held:
            return ()
        text, self.held = "".join(self.held), None
        return (chat.TextDelta(text),)

    def _delta(self, obj: dict[str, Any]) -> Iterable[chat.Event]:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return ()
        kind = delta.get("type")
        if kind == "text_delta" or (kind is None and "text" in delta):
            text = delta.get("text")
            return self._text(text) if isinstance(text, str) and text else ()
        if kind == "input_json_delta":
            piece = str(delta.get("partial_json", ""))
            block, call = self.blocks.get(integer(obj.get("index")), ("tool_use", 0))
            if not piece:
                return ()
            if block == "answer":
                return (chat.TextDelta(piece),)
            if block == "unread":
                return (chat.Unread(len(piece)),)
            self.argued.add(call)
            return (chat.ToolCallDelta(call, piece),)
        if kind == "thinking_delta":
            return (chat.ReasoningDelta(str(delta.get("thinking", "")), origin=self.origin),)
        if kind == "signature_delta":
            signature = str(delta.get("signature", ""))
            return (chat.ReasoningDelta(signature=signature, origin=self.origin),)
        # A kind not read (citations_delta...): counted against the cap, not carried.
        return (chat.Unread(text_size(delta, frozenset({"type"}))),)

    def end(self) -> chat.End | None:
        if self.finish is None and not self.done:
            return None  # cut off before the answer was complete
        native = self.finish or "end_turn"
        finish = "stop" if self.answer_tool and not self.calls else _finish(native, self.calls > 0)
        return chat.End(finish, self.usage, native, self.stop_sequence)


# The events of an answer's content: one before message_start means it was left out.
_CONTENT_EVENTS = frozenset(
    {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"}
)

# The text a stream with a forced answer tool holds back, at most (characters).
HELD_MOST = 1_000_000


def stream_decoder(request: chat.Request, origin: str = "") -> StreamDecoder:
    return StreamDecoder(request.model, origin, answer_tool(request))


# --- the Messages routes: clients that speak this format ----------------------------

PositiveOrZero = Annotated[int, Field(ge=0), BeforeValidator(integral)]
# Anthropic's own server tools: what a provider of another format has no counterpart for.
_SERVER_TOOL = re.compile(r"^[a-z_]+_\d{8}$")
# Fields with no counterpart elsewhere that change nothing an answer means.
ADVISORY = frozenset(
    {
        "context_management",
        "service_tier",
        "container",
        "inference_geo",
        "cache_control",
        "mcp_servers",
    }
)


class MessageItem(BaseModel):
    """One message; a `system` one too, as Claude Code sends it."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class MessagesBody(BaseModel):
    """Anthropic's Messages request; fields not named here pass through to Anthropic."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, min_length=1, max_length=200)
    max_tokens: PositiveOrZero
    # None at all only on a turn that continues a thread (stored.py), which gets its
    # history before it is decoded: `decode_request` refuses an empty list.
    messages: list[MessageItem]
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: PositiveOrZero | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thread: dict[str, Any] | None = Field(
        None,
        description='A message thread, kept by this service: {"type": "create"}, or '
        '{"type": "continue", "previous_message_id": ...} with only the new messages',
    )


class CountTokensBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, min_length=1, max_length=200)
    messages: list[MessageItem] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


def _bounded(body: MessagesBody | CountTokensBody) -> None:
    """Counts past what a provider takes (chat.MAX_*): a 400 naming the field. Tools
    are not counted: Anthropic has no limit on them (Claude Code sends hundreds)."""
    if len(body.messages) > chat.MAX_MESSAGES:
        raise bad("messages", f"at most {chat.MAX_MESSAGES:,} messages, not {len(body.messages):,}")
    parts = len(body.system) if isinstance(body.system, list) else 0
    for message in body.messages:
        content = message.content
        if not isinstance(content, list):
            parts += 1
            continue
        parts += len(content)
        for block in content:  # a tool result's own blocks count too
            inner = block.get("content") if block.get("type") == "tool_result" else None
            parts += len(inner) if isinstance(inner, list) else 0
    if parts > chat.MAX_PARTS:
        raise bad("messages", f"at most {chat.MAX_PARTS:,} content blocks in all")


def decode_request(body: MessagesBody | CountTokensBody, model: str, rid: str | None) -> Decoded:
    if not body.messages:
        raise bad("messages", "at least one message is needed")
    _bounded(body)
    lost: list[tuple[str, str]] = []
    dropped = sorted(k for k in (body.model_extra or {}) if k in ADVISORY or k not in _KNOWN)
    messages: list[chat.Message] = []
    if body.system is not None:
        messages.append(chat.Message("system", tuple(_texts(body.system, "system"))))
    calls: set[str] = set()
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        role = message.role
        content = message.content
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        parts: list[chat.Part] = []
        for j, block in enumerate(blocks):
            part = _part(block, f"{where}.content.{j}", calls, lost)
            if part is not None:
                parts.append(part)
        results = [p for p in parts if isinstance(p, chat.ToolResult)]
        others = [p for p in parts if not isinstance(p, chat.ToolResult)]
        if results:  # tool results are their own turn in chat, as in Chat Completions
            messages.append(chat.Message("tool", tuple(results)))
        if others or not results:
            messages.append(chat.Message(role, tuple(others)))
    tools: list[chat.Tool] = []
    for i, tool in enumerate(getattr(body, "tools", None) or ()):
        kind = tool.get("type")
        if kind not in (None, "custom") or (isinstance(kind, str) and _SERVER_TOOL.match(kind)):
            dropped.append(f"tools.{i} ({kind})")  # a server tool: Anthropic's own
            continue
        if not isinstance(tool.get("name"), str):
            raise bad(f"tools.{i}.name", "a tool needs a name")
        schema = tool.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad(f"tools.{i}.input_schema", "must be a JSON Schema object")
        strict = tool.get("strict")
        tools.append(
            chat.Tool(
                tool["name"],
                tool.get("description"),
                schema,
                strict=strict if isinstance(strict, bool) else None,
                cache_control=tool.get("cache_control"),
            )
        )
    if not isinstance(body, MessagesBody):
        return Decoded(chat.Request(model=model, messages=tuple(messages), tools=tuple(tools)), [])
    config = body.output_config or {}
    form = config.get("format")
    thinking = body.thinking or {}
    reasoning = None
    if thinking.get("type") == "enabled":
        reasoning = chat.ReasoningConfig(
            budget_tokens=integer(thinking.get("budget_tokens")) or None
        )
    elif thinking.get("type") == "adaptive":
        reasoning = chat.ReasoningConfig(effort=_effort(config.get("effort")))
    elif thinking.get("type") == "disabled":
        reasoning = chat.ReasoningConfig(enabled=False)
    elif "effort" in config:
        dropped.append("output_config.effort")  # without thinking, an effort has no counterpart
    user = (body.metadata or {}).get("user_id")
    request = chat.Request(
        model=model,
        messages=tuple(messages),
        max_tokens=body.max_tokens or 1,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=tuple(body.stop_sequences or ()),
        tools=tuple(tools),
        tool_choice=_decode_choice(body.tool_choice) if tools else None,
        response_format=(
            chat.ResponseFormat("json_schema", schema=form.get("schema") or {"type": "object"})
            if isinstance(form, dict) and form.get("type") == "json_schema"
            else None
        ),
        reasoning=reasoning,
        user=user if isinstance(user, str) else None,
        request_id=rid,
        dropped=tuple(dropped),
    )
    return Decoded(request, lost)


_KNOWN = frozenset(MessagesBody.model_fields) | {"metadata"}


def _effort(value: Any) -> str:
    return {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}.get(
        str(value), "medium"
    )


def _texts(system: str | list[dict[str, Any]], where: str) -> list[chat.Part]:
    if isinstance(system, str):
        return [chat.Text(system)] if system else []
    out: list[chat.Part] = []
    for i, block in enumerate(system):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad(f"{where}.{i}", "a system block must be text")
        out.append(chat.Text(block["text"], block.get("cache_control")))
    return out


def _part(block: Any, where: str, calls: set[str], lost: list[tuple[str, str]]) -> chat.Part | None:
    if not isinstance(block, dict):
        raise bad(where, "a content block must be an object")
    kind = block.get("type")
    if kind == "text":
        return chat.Text(str(block.get("text", "")), block.get("cache_control"))
    if kind in ("image", "document"):
        source = block.get("source") or {}
        url = source.get("url")
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data', '')}"
        elif source.get("type") == "text" and kind == "document":
            return chat.Text(str(source.get("data", "")))
        if not isinstance(url, str):
            lost.append((f"{where}.source", f"an {kind} source of type {source.get('type')!r}"))
            return None
        return chat.Image(url) if kind == "image" else chat.Document(url, block.get("title"))
    if kind == "tool_use":
        call_id, name = block.get("id"), block.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise bad(where, "a tool_use block needs an id and a name")
        calls.add(call_id)
        return chat.ToolCall(call_id, name, jsonio.dumps(block.get("input") or {}).decode())
    if kind == "tool_result":
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str) or call_id not in calls:
            raise bad(f"{where}.tool_use_id", f"no earlier tool_use has the id {call_id!r}")
        content = block.get("content")
        inner: list[chat.Text | chat.Image] = []
        for k, item in enumerate(
            [{"type": "text", "text": content}] if isinstance(content, str) else content or ()
        ):
            part = _part(item, f"{where}.content.{k}", calls, lost)
            if isinstance(part, chat.Text | chat.Image):
                inner.append(part)
        return chat.ToolResult(call_id, tuple(inner), is_error=bool(block.get("is_error")))
    if kind == "thinking":
        return chat.Reasoning(str(block.get("thinking", "")), signature=block.get("signature"))
    if kind == "redacted_thinking":
        return chat.Reasoning(opaque=str(block.get("data", "")))
    lost.append((where, f"a content block of type {kind!r}"))
    return None


def _decode_choice(raw: dict[str, Any] | None) -> chat.ToolChoice | None:
    if raw is None:
        return None
    parallel = not raw.get("disable_parallel_tool_use", False)
    kind = raw.get("type")
    if kind == "tool":
        return chat.ToolChoice("tool", str(raw.get("name")), parallel=parallel)
    mode = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
    if mode is None:
        raise bad("tool_choice.type", "must be auto, any, tool or none")
    return chat.ToolChoice(mode, parallel=parallel)  # type: ignore[arg-type]


_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(end_reason: str, stop_sequence: str | None) -> str:
    if end_reason == "stop" and stop_sequence:
        return "stop_sequence"
    return _STOP.get(end_reason, "end_turn")


def usage_object(usage: Usage, *, whole: bool = False) -> dict[str, Any]:
    """Anthropic counts cache reads and writes apart from `input_tokens`. `whole`: a
    message's usage (its `Usage`), else a `message_delta`'s; each with every field the
    SDKs' types require present, null where we know nothing."""
    plain = max(usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens, 0)
    thinking = {"thinking_tokens": usage.reasoning_tokens} if usage.reasoning_tokens else None
    out: dict[str, Any] = {
        "input_tokens": plain,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "output_tokens_details": thinking,
        "server_tool_use": None,
    }
    if whole:
        out.update(cache_creation=None, inference_geo=None, service_tier=None, speed=None)
    return out


# A tool call made by the model itself (not by a server tool's code): the `caller` the
# SDKs' types require on every tool_use block.
DIRECT = {"type": "direct"}


def message_object(
    id_: str, model: str, content: list[dict[str, Any]], usage: Usage, stop: str | None
) -> dict[str, Any]:
    """A message as Anthropic's API answers it, every field its SDKs' types require."""
    return {
        "id": id_,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "stop_details": None,
        "container": None,
        "diagnostics": None,
        "usage": usage_object(usage, whole=True),
    }


def encode_response(completion: chat.Completion) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for part in completion.parts:
        if isinstance(part, chat.Text | chat.Refusal):
            if part.text:
                content.append({"type": "text", "text": part.text, "citations": None})
        elif isinstance(part, chat.ToolCall):
            content.append(
                {
                    "type": "tool_use",
                    "id": part.id,
                    "name": part.name,
                    "input": _arguments(part.arguments),
                    "caller": DIRECT,
                }
            )
        elif isinstance(part, chat.Reasoning):
            if part.opaque is not None:
                content.append({"type": "redacted_thinking", "data": part.opaque})
            else:
                content.append(
                    {"type": "thinking", "thinking": part.text, "signature": part.signature or ""}
                )
    id_ = completion.id if completion.id.startswith("msg_") else "msg_" + completion.id
    stop = stop_reason(completion.finish_reason, None)
    return message_object(id_, completion.model, content, completion.usage, stop)


def _arguments(text: str) -> Any:
    try:
        value = jsonio.loads(text or "{}")
    except ValueError:
        return {"input": text}  # what a provider wrote that is not JSON, kept
    return value if isinstance(value, dict) else {"input": value}


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + jsonio.dumps(data) + b"\n\n"


class StreamEncoder:
    """`chat` events as Anthropic's event sequence: message_start, a
    content_block_start/delta/stop run for each text, thinking and tool_use block,
    message_delta with the final counts, message_stop; `event: ping` while idle."""

    ping = _event("ping", {"type": "ping"})  # sent while the stream is idle

    def __init__(self, model: str, input_tokens: int = 0) -> None:
        self.model = model
        self.input_tokens = input_tokens  # in message_start: the prompt's estimate
        self.index = -1
        self.open: str | None = None  # the kind of the block open, if any
        self.started = False

    def _start(self, id_: str = "") -> list[bytes]:
        if self.started:
            return []
        self.started = True
        # The input as estimated (no provider of another format says it before its
        # end): clients that meter the context read it here; message_delta has the count.
        usage = Usage(input_tokens=self.input_tokens)
        message = message_object(id_ or chat.new_id("msg_"), self.model, [], usage, None)
        return [_event("message_start", {"type": "message_start", "message": message})]

    def _block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self.index += 1
        self.open = kind
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*out, _event("content_block_start", start)]

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        body = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return _event("content_block_delta", body)

    def frames(self, event: chat.Event) -> list[bytes]:
        if isinstance(event, chat.Start):
            return self._start(event.id)
        out = self._start()
        if isinstance(event, chat.TextDelta | chat.RefusalDelta):
            if self.open != "text":
                out += self._block("text", {"type": "text", "text": "", "citations": None})
            out.append(self._delta({"type": "text_delta", "text": event.text}))
        elif isinstance(event, chat.ToolCallStart):
            block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {},
                     "caller": DIRECT}  # fmt: skip
            out += self._block("tool_use", block)
        elif isinstance(event, chat.ToolCallDelta):
            out.append(self._delta({"type": "input_json_delta", "partial_json": event.arguments}))
        elif isinstance(event, chat.ReasoningDelta):
            if event.opaque is not None:
                out += self._block(
                    "redacted_thinking", {"type": "redacted_thinking", "data": event.opaque}
                )
                out += self._close()
                return out
            if self.open != "thinking":
                out += self._block(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
            if event.text:
                out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
            if event.signature is not None:
                out.append(self._delta({"type": "signature_delta", "signature": event.signature}))
                out += self._close()
        return out

    def last(self, end: chat.End, model: str, cost: float | None) -> list[bytes]:
        out = [*self._start(), *self._close()]
        delta = {
            "stop_reason": stop_reason(end.finish_reason, end.stop_sequence),
            "stop_sequence": end.stop_sequence,
            "stop_details": None,
            "container": None,
        }
        out.append(
            _event(
                "message_delta",
                {"type": "message_delta", "delta": delta, "usage": usage_object(end.usage)},
            )
        )
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out

    @staticmethod
    def error(error: ApiError, request_id: str) -> bytes:
        kind = ANTHROPIC_TYPES.get(error.status, "api_error")
        inner = {"type": kind, "message": error.message}
        return _event("error", {"type": "error", "error": inner, "request_id": request_id or None})


# --- passed through ----------------------------------------------------------------------


def accounted(answer: dict[str, Any]) -> Accounted:
    model = answer.get("model")
    finish = FINISH.get(str(answer.get("stop_reason")), "stop")
    return Accounted(str(model) if model else None, usage_of(answer.get("usage")), finish)


class Relay:
    """The provider's events as they come, each re-framed (one data: line), read for
    the accounting, and cut past the body's max tokens with a max_tokens end of ours.
    An `error` event goes to the client as it came, and ends the stream."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.decoder = StreamDecoder(str(data["model"]))
        self.encoder = StreamEncoder(str(data["model"]))

    @property
    def model(self) -> str:
        return self.decoder.model

    def read(self, event: str, data: str) -> Step:
        started = self.decoder.started
        try:
            events = list(self.decoder.feed(event, data))
        except ProviderError:
            return Step(_event(event or "error", json_object(data)), [], failed=True)
        deltas = [e for e in events if isinstance(e, chat.Delta)]
        lead: tuple[bytes, ...] = ()
        if (
            not started
            and event != "message_start"
            and events[:1]
            and isinstance(events[0], chat.Start)
        ):  # the provider left message_start out: the client's SDK needs it first
            message = message_object(events[0].id, self.model, [], Usage(), None)
            lead = (_event("message_start", {"type": "message_start", "message": message}),)
        # Kinds of delta the decoder does not read, by the size it found them
        more = tuple(e.size for e in events if isinstance(e, chat.Unread))
        return Step(reframed(data, event), deltas, last=self.decoder.done, more=more, lead=lead)

    def cut(self, sent: int) -> list[bytes]:
        stop = {"type": "content_block_stop", "index": max(self.decoder.blocks, default=0)}
        delta = {"stop_reason": "max_tokens", "stop_sequence": None, "stop_details": None,
                 "container": None}  # fmt: skip
        # What was sent is known; the input the provider would have counted is not.
        usage = {**usage_object(Usage(output_tokens=sent)), "input_tokens": None,
                 "cache_creation_input_tokens": None, "cache_read_input_tokens": None}  # fmt: skip
        return [
            _event("content_block_stop", stop),
            _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
            _event("message_stop", {"type": "message_stop"}),
        ]

    def end(self) -> Accounted | None:
        end = self.decoder.end()
        return None if end is None else Accounted(self.model, end.usage, end.finish_reason)

    def tail(self) -> list[bytes]:
        return []


class Snapshot:
    """A streamed message put back together from its events, as the whole answer would
    have been (`reply`): what a thread keeps of a streamed turn (stored.py). `size`
    counts the characters taken in, for the keeper's bound."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, Any]] = {}
        self.pieces: dict[int, tuple[str, list[str]]] = {}  # index: (key, its deltas)
        self.size = 0

    def feed(self, data: Mapping[str, Any]) -> None:
        kind = data.get("type")
        index = data.get("index")
        if not isinstance(index, int):
            return
        if kind == "content_block_start" and isinstance(data.get("content_block"), dict):
            block = dict(data["content_block"])
            # What it holds counts, and so does the block itself: endless empty blocks
            # reach the bound as surely as endless text.
            self.size += text_size(block) + _BLOCK_SIZE
            self.blocks[index] = block
        elif kind == "content_block_delta" and index in self.blocks:
            delta = data.get("delta")
            if not isinstance(delta, dict):
                return
            step = delta.get("type")
            if step == "signature_delta":
                self.blocks[index]["signature"] = delta.get("signature")
            elif step == "citations_delta":
                self.blocks[index].setdefault("citations", []).append(delta.get("citation"))
            elif step in _PIECES:
                key, field = _PIECES[step]
                text = delta.get(field)
                if isinstance(text, str):
                    self.pieces.setdefault(index, (key, []))[1].append(text)
                    self.size += len(text)
        elif kind == "content_block_stop":
            self._close(index)

    def _close(self, index: int) -> None:
        key, pieces = self.pieces.pop(index, ("", []))
        block = self.blocks.get(index)
        if block is None or not key:
            return
        text = "".join(pieces)
        if key == "input":
            try:
                block["input"] = jsonio.loads(text) if text.strip() else {}
            except ValueError:
                block["input"] = {}
        else:
            block[key] = block.get(key, "") + text

    def reply(self) -> dict[str, Any]:
        """The assistant message, every block closed."""
        for index in list(self.pieces):
            self._close(index)
        return {"role": "assistant", "content": [self.blocks[i] for i in sorted(self.blocks)]}


# What a block counts toward a snapshot's bound, whatever it holds (about its memory).
_BLOCK_SIZE = 200
# Deltas that add to a block: the key of the block they add to, and their own.
_PIECES = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "input_json_delta": ("input", "partial_json"),
}


def relay(data: dict[str, Any], body: MessagesBody, call: chat.Request) -> Relay:
    return Relay(data)


def model_object(model: str) -> dict[str, Any]:
    """A `ModelInfo`: a model served here is `active`; what we do not know of it (its
    context window, its capabilities, its line) is null, as the SDKs' types allow."""
    return {
        "type": "model",
        "id": model,
        "display_name": model,
        "created_at": "1970-01-01T00:00:00Z",
        "lifecycle": "active",
        "deprecated_at": None,
        "retires_at": None,
        "capabilities": None,
        "line": None,
        "max_input_tokens": None,
        "max_tokens": None,
    }


def model_list(models: Iterable[str]) -> dict[str, Any]:
    """GET /v1/models in Anthropic's shape."""
    data = [model_object(m) for m in models]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# --- the format, as the serving path uses it ------------------------------------------------


def answer(
    completion: chat.Completion, body: MessagesBody, call: chat.Request, cost: float | None
) -> dict[str, Any]:
    return encode_response(completion)


def encoder(body: MessagesBody, call: chat.Request) -> StreamEncoder:
    return StreamEncoder(call.model, chat.input_estimate(call))


DIALECT = Dialect(
    wire=WIRE,
    errors="anthropic",
    body=MessagesBody,
    decode=decode_request,
    answer=answer,
    encoder=encoder,
    passthrough=Passthrough(
        prepare=nothing,
        accounted=accounted,
        relay=relay,
        # Its API version and beta flags go with it (`?beta=true` too), never its key.
        headers=("anthropic-version", "anthropic-beta"),
        query=("beta",),
        own=(THREADS_BETA,),
        # Its refusals come back with their status and words: Claude Code matches on them.
        verbatim=True,
    ),
    keeps="threads",
)

# count_tokens: the same format, counted (gateway.count_tokens); no answer to encode.
COUNT_PATH = "/v1/messages/count_tokens"
