"""OpenAI's Responses API, served stateless: the `/v1/responses` route of the OpenAI
SDKs' `responses`, Codex CLI, the Vercel AI SDK and the OpenAI Agents SDK.

Its answers and events are in the Open Responses schema: a response object echoing
the request's settings, output items (reasoning, then one message per run of text,
then function calls, each with an id made once), and a stream of typed events with a
`sequence_number` from 0, from `response.created` to `response.completed` (or
`.incomplete`, or `error` and `response.failed`), no `[DONE]`.

To an OpenAI provider that serves Responses itself (api.openai.com, unless
OPENAI_RESPONSES says otherwise) the body passes through, with `store: false` sent
explicitly; to any other it is translated through `chat`. Nothing is stored: a
`previous_response_id`, a `conversation`, `store: true` or `background` is a 400 that
says to send the whole input.

Reasoning only its origin can read (Anthropic's signed thinking, an OpenAI
`encrypted_content`) travels in a reasoning item's `encrypted_content`, wrapped with
the origin it came from, so that a client that sends it back (Codex asks for it with
`include`) reaches that origin with it, and no other.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

import chat
import jsonio
from dialects import (
    PING,
    Accounted,
    Decoded,
    Dialect,
    Passthrough,
    Step,
    bad,
    integer,
    integral,
    json_object,
    reframed,
    text_size,
)
from errors import ApiError, ProviderError
from usage import Usage

WIRE = "openai_responses"
PATH = "/responses"

PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(integral)]
# Built-in tools: what only OpenAI's own service runs.
BUILT_IN = frozenset(
    {"web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
     "computer", "image_generation", "mcp", "local_shell", "shell"}
)  # fmt: skip
_WRAP = "tt1:"  # an encrypted_content of ours: the origin and what it gave


class ReasoningParam(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextParam(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesBody(BaseModel):
    """The Responses request; fields not named here pass through to OpenAI."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, min_length=1, max_length=200)
    input: (
        Annotated[str, Field(min_length=1)] | Annotated[list[dict[str, Any]], Field(min_length=1)]
    )
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    include: list[str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


def stateless(body: ResponsesBody) -> None:
    """What would need a stored response is a 400, whoever the provider."""
    send_all = "this service stores nothing: send the whole input in each request"
    if body.previous_response_id is not None:
        raise bad("previous_response_id", send_all)
    if body.conversation is not None:
        raise bad("conversation", send_all)
    if body.store:
        raise bad("store", send_all)
    if body.background:
        raise bad("background", "background responses need storage; " + send_all)


def _bounded(body: ResponsesBody) -> None:
    """Counts past what a provider takes (chat.MAX_*): a 400 naming the field."""
    tools = len(body.tools or ())
    if tools > chat.MAX_TOOLS:
        raise bad("tools", f"at most {chat.MAX_TOOLS} tools (OpenAI's own limit), not {tools}")
    if isinstance(body.input, str):
        return
    if len(body.input) > chat.MAX_MESSAGES:
        raise bad("input", f"at most {chat.MAX_MESSAGES:,} input items, not {len(body.input):,}")
    parts = 0
    for item in body.input:
        lists = [v for v in (item.get("content"), item.get("output"), item.get("summary"))
                 if isinstance(v, list)]  # fmt: skip
        parts += sum(len(v) for v in lists) if lists else 1
    if parts > chat.MAX_PARTS:
        raise bad("input", f"at most {chat.MAX_PARTS:,} content parts and items in all")


def decode_request(body: ResponsesBody, model: str, rid: str | None) -> Decoded:
    _bounded(body)
    lost: list[tuple[str, str]] = []
    extra = dict(body.model_extra or {})
    if extra.pop("top_logprobs", None):
        lost.append(("top_logprobs", "log probabilities"))
    dropped = sorted(k for k in extra if k != "stream_options")
    dropped += [name for name in ("prompt_cache_key", "safety_identifier", "metadata")
                if getattr(body, name)]  # fmt: skip
    dropped += [f"include: {value}" for value in body.include or ()]
    messages = _Messages()
    if body.instructions:
        messages.add("system", [chat.Text(body.instructions)])
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    calls: set[str] = set()
    for i, item in enumerate(items):
        _item(item, f"input.{i}", messages, calls, lost)
    tools = _tools(body.tools or [], lost, dropped)
    choice, tools = _tool_choice(body.tool_choice, body.parallel_tool_calls, tools, lost)
    text = body.text or TextParam()
    if text.verbosity:
        dropped.append("text.verbosity")
    reasoning = None
    if body.reasoning is not None and body.reasoning.effort is not None:
        effort = body.reasoning.effort
        reasoning = chat.ReasoningConfig(effort=effort, enabled=effort != "none")
    request = chat.Request(
        model=model,
        messages=messages.done(),
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=tuple(tools),
        tool_choice=choice,
        response_format=_format(text.format),
        reasoning=reasoning,
        user=body.user,
        request_id=rid,
        dropped=tuple(dropped),
    )
    return Decoded(request, lost)


def _tools(
    raw: list[dict[str, Any]], lost: list[tuple[str, str]], dropped: list[str]
) -> list[chat.Tool]:
    tools: list[chat.Tool] = []
    names: set[str] = set()  # of the function and custom tools so far
    for i, tool in enumerate(raw):
        kind, name, where = tool.get("type"), tool.get("name"), f"tools.{i}"
        if kind in ("function", "custom") and isinstance(name, str) and name in names:
            raise bad(f"{where}.name", f"another tool is named {name!r}")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise bad(f"{where}.description", "must be a string")
        if kind in ("function", "custom") and not (isinstance(name, str) and name):
            raise bad(f"{where}.name", f"a {kind} tool needs a name")
        name = str(name)
        if kind == "function":
            parameters = tool.get("parameters") or {"type": "object", "properties": {}}
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise bad(f"{where}.parameters", "must be a JSON Schema of an object")
            strict = tool.get("strict")
            strict = strict if isinstance(strict, bool) else None
            tools.append(chat.Tool(name, description, parameters, strict=strict))
            names.add(name)
        elif kind == "custom":
            tools.append(chat.Tool(name, description, kind="custom"))
            names.add(name)
        elif not isinstance(kind, str):
            raise bad(f"{where}.type", "a tool needs a type")
        elif _built_in(kind):
            lost.append((where, f"the built-in tool {kind!r}"))
        else:  # a namespace of tools, say: only a Responses service runs it
            dropped.append(f"{where} ({kind})")
    return tools


class _Messages:
    """The messages being read from the input items, their parts still lists: an
    item added to the turn before costs the same however long that turn is."""

    def __init__(self) -> None:
        self._turns: list[tuple[chat.Role, list[chat.Part]]] = []

    def add(self, role: chat.Role, parts: list[chat.Part]) -> None:
        """A message of its own."""
        self._turns.append((role, parts))

    def append(self, role: chat.Role, part: chat.Part) -> None:
        """A part into the last message if it has `role` (an assistant's calls and
        reasoning are one turn), else into a new one."""
        if self._turns and self._turns[-1][0] == role and role in ("assistant", "tool"):
            self._turns[-1][1].append(part)
        else:
            self._turns.append((role, [part]))

    def done(self) -> tuple[chat.Message, ...]:
        return tuple(chat.Message(role, tuple(parts)) for role, parts in self._turns)


def _item(
    item: Mapping[str, Any],
    where: str,
    messages: _Messages,
    calls: set[str],
    lost: list[tuple[str, str]],
) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise bad(f"{where}.role", "must be user, assistant, system or developer")
        if item.get("content") is None:
            raise bad(f"{where}.content", "a message needs content")
        messages.add(role, _parts(item["content"], f"{where}.content", lost))
    elif kind in ("function_call", "custom_tool_call"):
        call_id, name = item.get("call_id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise bad(where, f"a {kind} needs a call_id and a name")
        calls.add(call_id)
        arguments = item.get("arguments")
        if kind == "custom_tool_call":  # its input, as a call of chat.FREEFORM
            text = _string(item.get("input", ""), f"{where}.input")
            arguments = jsonio.dumps({"input": text}).decode()
        elif not isinstance(arguments, str):
            raise bad(f"{where}.arguments", "must be a string of JSON")
        messages.append("assistant", chat.ToolCall(call_id, name, arguments))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or call_id not in calls:
            raise bad(f"{where}.call_id", f"no earlier call has the id {call_id!r}")
        output = item.get("output")
        content = [
            p
            for p in _parts(output, f"{where}.output", lost)
            if isinstance(p, chat.Text | chat.Image)
        ]
        messages.append("tool", chat.ToolResult(call_id, tuple(content)))
    elif kind == "reasoning":
        text = ""
        for field in ("summary", "content"):
            pieces = item.get(field) or []
            if not isinstance(pieces, list) or not all(isinstance(p, dict) for p in pieces):
                raise bad(f"{where}.{field}", "must be a list of text parts")
            text += "".join(_string(p.get("text", ""), f"{where}.{field}") for p in pieces)
        messages.append("assistant", _unwrap(text, item.get("encrypted_content")))
    elif kind == "item_reference":
        raise bad(f"{where}.type", "this service stores nothing: send the items themselves")
    else:
        lost.append((f"{where}.type", f"an input item of type {kind!r}"))


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise bad(where, "must be a string")
    return value


def _optional(value: Any, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _parts(content: Any, where: str, lost: list[tuple[str, str]]) -> list[chat.Part]:
    if isinstance(content, str):
        return [chat.Text(content)] if content else []
    if not isinstance(content, list):
        raise bad(where, "must be a string or a list of content parts")
    parts: list[chat.Part] = []
    for j, part in enumerate(content):
        at = f"{where}.{j}"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(at, "a content part is an object with a type")
        kind = part["type"]
        if kind in ("input_text", "output_text", "text"):
            parts.append(chat.Text(_string(part.get("text"), f"{at}.text")))
        elif kind == "input_image" and part.get("image_url") is not None:
            detail = _optional(part.get("detail"), f"{at}.detail")
            parts.append(chat.Image(_string(part["image_url"], f"{at}.image_url"), detail))
        elif kind == "input_file" and (part.get("file_data") or part.get("file_url")):
            name = _optional(part.get("filename"), f"{at}.filename")
            if part.get("file_data"):
                data = _string(part["file_data"], f"{at}.file_data")
                url = data if data.startswith("data:") else f"data:application/pdf;base64,{data}"
            else:
                url = _string(part["file_url"], f"{at}.file_url")
            parts.append(chat.Document(url, name))
        elif kind == "refusal":
            parts.append(chat.Refusal(_string(part.get("refusal"), f"{at}.refusal")))
        else:
            lost.append((at, f"a content part of type {kind!r} (a stored file, say)"))
    return parts


def _tool_choice(
    raw: Any, parallel_calls: bool | None, tools: list[chat.Tool], lost: list[tuple[str, str]]
) -> tuple[chat.ToolChoice | None, list[chat.Tool]]:
    """The choice, and the tools it leaves (`allowed_tools` narrows them); a choice
    without tools is dropped, as Chat's is."""
    parallel = parallel_calls is not False
    names = {tool.name for tool in tools}
    choice: chat.ToolChoice | None = None
    if raw is None:
        choice = None if parallel else chat.ToolChoice("auto", parallel=False)
    elif raw in ("auto", "none", "required"):
        choice = chat.ToolChoice(raw, parallel=parallel)
    elif isinstance(raw, dict) and raw.get("type") in ("function", "custom"):
        if not isinstance(raw.get("name"), str) or raw["name"] not in names:
            raise bad("tool_choice.name", f"no tool is named {raw.get('name')!r}")
        choice = chat.ToolChoice("tool", raw["name"], parallel=parallel)
    elif isinstance(raw, dict) and raw.get("type") == "allowed_tools":
        listed = raw.get("tools")
        if raw.get("mode") not in ("auto", "required"):
            raise bad("tool_choice.mode", "must be auto or required")
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in listed)
        ):
            raise bad("tool_choice.tools", "must list the allowed tools by name")
        allowed = {t["name"] for t in listed}
        if allowed - names:
            raise bad("tool_choice.tools", f"no tool is named {sorted(allowed - names)[0]!r}")
        tools = [tool for tool in tools if tool.name in allowed]
        choice = chat.ToolChoice(raw["mode"], parallel=parallel)
    elif isinstance(raw, dict) and isinstance(raw.get("type"), str) and _built_in(raw["type"]):
        lost.append(("tool_choice", f"a choice of the built-in tool {raw['type']!r}"))
    else:
        raise bad("tool_choice", "must be auto, none, required, a named tool or allowed_tools")
    return (choice if tools else None), tools


def _built_in(kind: str) -> bool:
    return kind in BUILT_IN or kind.startswith("web_search")


def _format(form: Mapping[str, Any] | None) -> chat.ResponseFormat | None:
    """Responses' text.format is flat: {type, name, schema, strict}."""
    if form is None or form.get("type") in (None, "text"):
        return None
    if form["type"] == "json_object":
        return chat.ResponseFormat("json_object")
    if form["type"] == "json_schema":
        schema = form.get("schema")
        if not isinstance(schema, dict):
            raise bad("text.format.schema", "a json_schema format needs a schema object")
        strict = form.get("strict")
        _optional(form.get("description"), "text.format.description")
        return chat.ResponseFormat(
            "json_schema",
            name=_optional(form.get("name"), "text.format.name"),
            schema=schema,
            strict=strict if isinstance(strict, bool) else None,
        )
    raise bad("text.format.type", f"{form['type']!r} is not text, json_object or json_schema")


def _wrap(part: chat.Reasoning | chat.ReasoningDelta) -> str | None:
    """What only the origin can read, as an encrypted_content a client sends back."""
    if part.signature is None and part.opaque is None:
        return None
    inner = {"origin": part.origin, "signature": part.signature, "opaque": part.opaque}
    return _WRAP + base64.urlsafe_b64encode(jsonio.dumps(inner)).decode()


def _unwrap(text: str, encrypted: Any) -> chat.Reasoning:
    if isinstance(encrypted, str) and encrypted.startswith(_WRAP):
        try:
            inner = jsonio.loads(base64.urlsafe_b64decode(encrypted[len(_WRAP) :]))
        except (ValueError, TypeError):
            inner = None
        if isinstance(inner, dict):
            return chat.Reasoning(
                text,
                signature=inner.get("signature"),
                opaque=inner.get("opaque"),
                origin=inner.get("origin"),
            )
    if isinstance(encrypted, str) and encrypted:
        # An OpenAI's own: it goes back to an OpenAI Responses service, passed through.
        return chat.Reasoning(text, opaque=encrypted, origin="openai_responses")
    return chat.Reasoning(text)


# --- answers -------------------------------------------------------------------------


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    cached = data.get("input_tokens_details") or {}
    reasoning = data.get("output_tokens_details") or {}
    return Usage(
        input_tokens=integer(data.get("input_tokens")),
        output_tokens=integer(data.get("output_tokens")),
        cached_input_tokens=integer(cached.get("cached_tokens")) if isinstance(cached, dict) else 0,
        cache_write_tokens=integer(cached.get("cache_write_tokens"))
        if isinstance(cached, dict)
        else 0,
        reasoning_tokens=integer(reasoning.get("reasoning_tokens"))
        if isinstance(reasoning, dict)
        else 0,
    )


def _tool_shown(tool: chat.Tool) -> dict[str, Any]:
    if tool.kind == "custom":
        return {"type": "custom", "name": tool.name, "description": tool.description}
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": dict(tool.parameters), "strict": tool.strict}  # fmt: skip


def _choice_shown(request: chat.Request) -> str | dict[str, Any]:
    choice = request.tool_choice
    if choice is None:
        return "auto"
    if choice.mode != "tool":
        return choice.mode
    kinds = {tool.name: tool.kind for tool in request.tools}
    return {"type": kinds.get(str(choice.name), "function"), "name": choice.name}


class ResponseEcho:
    """The response object's echo of the request's settings, and its ids."""

    def __init__(self, body: ResponsesBody, model: str, request: chat.Request) -> None:
        self.id = chat.new_id("resp_")
        self.created_at = int(time.time())
        self.model = model
        self.custom = {t.name for t in request.tools if t.kind == "custom"}
        form = request.response_format
        if form is None:
            shown: dict[str, Any] = {"type": "text"}
        elif form.kind == "json_object":
            shown = {"type": "json_object"}
        else:
            asked = (body.text.format if body.text else None) or {}
            shown = {"type": "json_schema", "name": form.name or "answer",
                     "schema": dict(form.schema or {}), "strict": bool(form.strict)}  # fmt: skip
            if isinstance(asked.get("description"), str):  # a string, or not there at all
                shown["description"] = asked["description"]
        choice = _choice_shown(request)
        self.settings: dict[str, Any] = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": model,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {
                "effort": body.reasoning.effort if body.reasoning else None,
                "summary": body.reasoning.summary if body.reasoning else None,
            },
            "store": False,
            "background": False,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "top_logprobs": 0,
            "text": {"format": shown, "verbosity": body.text.verbosity if body.text else None},
            "tool_choice": choice,
            "tools": [_tool_shown(t) for t in request.tools],
            "truncation": "disabled",
            "max_tool_calls": None,
            "service_tier": "default",
            "metadata": body.metadata or {},
            "prompt_cache_key": body.prompt_cache_key,
            "safety_identifier": body.safety_identifier,
            "user": body.user,
        }

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        *,
        incomplete: str | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "output": output,
            "usage": usage_object(usage) if usage is not None else None,
            **self.settings,
        }


def _status(end_reason: str) -> tuple[str, str | None]:
    if end_reason == "length":
        return "incomplete", "max_output_tokens"
    if end_reason == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def _call_item(
    call_id: str, name: str, arguments: str, echo: ResponseEcho, status: str
) -> dict[str, Any]:
    if name in echo.custom:  # a freeform tool: its one string argument is its input
        try:
            value = jsonio.loads(arguments or "{}")
        except ValueError:
            value = {"input": arguments}
        text = value.get("input", "") if isinstance(value, dict) else str(value)
        return {"type": "custom_tool_call", "id": chat.new_id("ctc_"), "call_id": call_id,
                "name": name, "input": str(text), "status": status}  # fmt: skip
    return {"type": "function_call", "id": chat.new_id("fc_"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip


def encode_response(completion: chat.Completion, echo: ResponseEcho) -> dict[str, Any]:
    """The whole answer: the response object its stream would end with, so that the
    two are one thing (items in the order they came, ids made once)."""
    encoder = StreamEncoder(echo)
    for event in chat.events_of(completion):
        if isinstance(event, chat.End):
            return encoder.final(event)
        encoder.frames(event)
    raise AssertionError("events_of ends with End")


def _event(data: dict[str, Any]) -> bytes:
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + jsonio.dumps(data) + b"\n\n"


class StreamEncoder:
    """`chat` events as Responses' event sequence, each with the next sequence_number:
    output items in the order they come (reasoning, one message per run of text or
    refusal, function calls), each added, streamed and done. Calls stay open together
    until the next text or the end, since a provider may interleave their arguments.
    `response.completed` carries the response object a non-streamed call returns."""

    ping = PING

    def __init__(self, echo: ResponseEcho) -> None:
        self.echo = echo
        self.sequence = 0
        self.started = False
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the message or reasoning being streamed
        self.text: list[str] = []
        self.part = "output_text"  # the open message's part: output_text or refusal
        self._around: tuple[str, bytes] | None = None  # an item id, its delta's fields
        # chat's call index -> [its item, its output index, its argument pieces...]
        self.calls: dict[int, list[Any]] = {}
        self._final: dict[str, Any] = {}

    def _emit(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return _event(data)

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        response = self.echo.response("in_progress", [])
        return [self._emit("response.created", response=response),
                self._emit("response.in_progress", response=response)]  # fmt: skip

    def _add(self, item: dict[str, Any], empty: dict[str, Any]) -> bytes:
        self.output.append(item)
        return self._emit("response.output_item.added", output_index=len(self.output) - 1,
                          item={**item, **empty})  # fmt: skip

    def _open(self, item: dict[str, Any], empty: dict[str, Any]) -> list[bytes]:
        out = [*self._close(), *self._close_calls()]
        self.open = item
        return [*out, self._add(item, empty)]

    _DELTA = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"'

    def _text_delta(self, text: str) -> bytes:
        """The hot path, one event a token: what `_at` would make, the open item's
        fields encoded once rather than in every event."""
        assert self.open is not None
        if self._around is None or self._around[0] != self.open["id"]:
            around = jsonio.dumps({"item_id": self.open["id"], "output_index": len(self.output) - 1,
                                   "content_index": 0})  # fmt: skip
            self._around = (self.open["id"], b"," + around[1:-1] + b',"delta":')
        number = str(self.sequence).encode()
        self.sequence += 1
        return (self._DELTA + b',"sequence_number":' + number + self._around[1]
                + jsonio.dumps(text) + b',"logprobs":[]}\n\n')  # fmt: skip

    def _at(self, kind: str, **fields: Any) -> bytes:
        """An event of the open item's, at its place in the output."""
        assert self.open is not None
        return self._emit(kind, item_id=self.open["id"], output_index=len(self.output) - 1,
                          **fields)  # fmt: skip

    def _close(self, status: str = "completed") -> list[bytes]:
        item = self.open
        if item is None:
            return []
        index = len(self.output) - 1
        out: list[bytes] = []
        text = "".join(self.text)
        self.text = []
        if item["type"] == "message":
            if self.part == "refusal":
                part: dict[str, Any] = {"type": "refusal", "refusal": text}
                out.append(self._at("response.refusal.done", content_index=0, refusal=text))
            else:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                out.append(self._at("response.output_text.done", content_index=0, text=text,
                                    logprobs=[]))  # fmt: skip
            item["content"] = [part]
            item["status"] = status
            out.append(self._at("response.content_part.done", content_index=0, part=part))
        elif text:  # reasoning: its summary part was added with its first text
            part = {"type": "summary_text", "text": text}
            item["summary"] = [part]
            out.append(self._at("response.reasoning_summary_text.done", summary_index=0, text=text))
            out.append(self._at("response.reasoning_summary_part.done", summary_index=0, part=part))
        self.open = None
        out.append(self._emit("response.output_item.done", output_index=index, item=item))
        return out

    def _close_calls(self, status: str = "completed") -> list[bytes]:
        out: list[bytes] = []
        for item, index, *pieces in self.calls.values():
            fields = {"item_id": item["id"], "output_index": index}
            if item["type"] == "function_call":
                item.update(arguments="".join(pieces) or "{}", status=status)
                out.append(self._emit("response.function_call_arguments.done", **fields,
                                      name=item["name"], arguments=item["arguments"]))  # fmt: skip
            else:  # a custom tool call: its input, whole once its JSON is (OpenAI's events)
                made = _call_item(item["call_id"], item["name"], "".join(pieces), self.echo, status)
                item.update(input=made["input"], status=status)
                out += [self._emit("response.custom_tool_call_input.delta", **fields,
                                   delta=item["input"]),
                        self._emit("response.custom_tool_call_input.done", **fields,
                                   input=item["input"])]  # fmt: skip
            out.append(self._emit("response.output_item.done", output_index=index, item=item))
        self.calls = {}
        return out

    def frames(self, event: chat.Event) -> list[bytes]:
        if isinstance(event, chat.Start) and event.model:
            self.echo.settings["model"] = event.model  # the provider's name for it
        out = self._start()
        if isinstance(event, chat.TextDelta | chat.RefusalDelta):
            kind = "refusal" if isinstance(event, chat.RefusalDelta) else "output_text"
            if self.open is None or self.open["type"] != "message" or self.part != kind:
                message = {"type": "message", "id": chat.new_id("msg_"), "status": "in_progress",
                           "role": "assistant", "content": []}  # fmt: skip
                out += self._open(message, {})
                self.part = kind
                empty = (
                    {"type": "refusal", "refusal": ""} if kind == "refusal"
                    else {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                )  # fmt: skip
                out.append(self._at("response.content_part.added", content_index=0, part=empty))
            self.text.append(event.text)
            if kind == "refusal":
                out.append(self._at("response.refusal.delta", content_index=0, delta=event.text))
            else:
                out.append(self._text_delta(event.text))
        elif isinstance(event, chat.ReasoningDelta):
            if self.open is None or self.open["type"] != "reasoning":
                reasoning = {"type": "reasoning", "id": chat.new_id("rs_"), "summary": []}
                out += self._open(reasoning, {})
            if event.text:
                if not self.text:
                    part = {"type": "summary_text", "text": ""}
                    out.append(self._at("response.reasoning_summary_part.added", summary_index=0,
                                        part=part))  # fmt: skip
                self.text.append(event.text)
                out.append(self._at("response.reasoning_summary_text.delta", summary_index=0,
                                    delta=event.text))  # fmt: skip
            wrapped = _wrap(event)
            if wrapped is not None:
                assert self.open is not None
                self.open["encrypted_content"] = wrapped
                out += self._close()
        elif isinstance(event, chat.ToolCallStart):
            out += self._close()
            item = _call_item(event.id, event.name, "", self.echo, "in_progress")
            out.append(self._add(item, {}))
            self.calls[event.index] = [item, len(self.output) - 1]
        elif isinstance(event, chat.ToolCallDelta):
            call = self.calls.get(event.index)
            if call is not None:
                call.append(event.arguments)
                item, index = call[0], call[1]
                if item["type"] == "function_call":
                    out.append(self._emit("response.function_call_arguments.delta",
                                          item_id=item["id"], output_index=index,
                                          delta=event.arguments))  # fmt: skip
        return out

    def follow(self, event: dict[str, Any]) -> None:
        """A provider's own event, relayed: where its response has got to."""
        number = event.get("sequence_number")
        if isinstance(number, int) and not isinstance(number, bool):
            self.sequence = number + 1
        response = event.get("response")
        if isinstance(response, dict) and isinstance(response.get("id"), str):
            self.echo.id = response["id"]
            self.started = True
        index, item = event.get("output_index"), event.get("item")
        if isinstance(index, int) and isinstance(item, dict) and 0 <= index <= len(self.output):
            self.output[index : index + 1] = [item]

    def final(self, end: chat.End) -> dict[str, Any]:
        """Close what is open; the response object the answer ends with."""
        self.finish(end)
        return self._final

    def finish(self, end: chat.End) -> list[bytes]:
        status, incomplete = _status(end.finish_reason)
        # Cut short (max_output_tokens): the item being written is incomplete.
        item_status = "incomplete" if status == "incomplete" else "completed"
        out = [*self._start(), *self._close(item_status), *self._close_calls(item_status)]
        self._final = self.echo.response(status, self.output, end.usage, incomplete=incomplete)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._emit(kind, response=self._final))
        return out

    def last(self, end: chat.End, model: str, cost: float | None) -> list[bytes]:
        return self.finish(end)

    def error(self, error: ApiError, request_id: str) -> bytes:
        """The items so far (the open ones incomplete, with what they had), then
        OpenAI's `error` event, which has code, message and param at its top, and the
        Open Responses one in `error`: it carries both, for either kind of client."""
        out = [*self._close("incomplete"), *self._close_calls("incomplete")]
        fields = {"code": error.type, "message": error.message, "param": error.param}
        # A failed response's code is one of OpenAI's few.
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        failed = self.echo.response("failed", self.output,
                                    error={"code": code, "message": error.message})  # fmt: skip
        out += [self._emit("error", **fields, error={"type": error.type, **fields}),
                self._emit("response.failed", response=failed)]  # fmt: skip
        return b"".join(out)


# --- passed through ----------------------------------------------------------------------


def prepare(data: dict[str, Any]) -> None:
    data["store"] = False  # served stateless, and said so


def _finish(status: object) -> str:
    return "length" if status == "incomplete" else "stop"


def accounted(answer: dict[str, Any]) -> Accounted:
    model = answer.get("model")
    return Accounted(
        str(model) if model else None, usage_of(answer.get("usage")), _finish(answer.get("status"))
    )


_LAST = ("response.completed", "response.incomplete", "response.failed")


class Relay:
    """The provider's events as they come, re-framed, its usage read from its last.
    The encoder follows them (the response id, the sequence, the items), so that an
    error of ours after them continues the same response."""

    def __init__(self, data: dict[str, Any], encoder: StreamEncoder) -> None:
        self.model = str(data["model"])
        self.encoder = encoder
        self.final: Accounted | None = None

    def read(self, event: str, data: str) -> Step:
        obj = json_object(data)
        kind = str(obj.get("type") or event)
        deltas: list[chat.Delta] = []
        more: tuple[int, ...] = ()
        if kind == "response.output_text.delta" or kind.endswith("arguments.delta"):
            deltas.append(chat.TextDelta(str(obj.get("delta", ""))))
        elif kind.endswith(".delta"):  # reasoning, refusals, a custom tool's input...
            more = (text_size(obj.get("delta")),)
        elif kind == "response.output_item.added":  # each item counts, kept or not
            more = (0,)
        self.encoder.follow(obj)
        if kind in _LAST:
            response = obj.get("response") or {}
            self.model = str(response.get("model") or self.model)
            usage = usage_of(response.get("usage"))
            finish = "length" if kind == "response.incomplete" else "stop"
            self.final = Accounted(self.model, usage, finish)
        return Step(reframed(data, kind), deltas, last=self.final is not None, more=more)

    def cut(self, sent: int) -> list[bytes]:
        raise ProviderError("the provider streamed past max_output_tokens")

    def end(self) -> Accounted | None:
        return self.final

    def tail(self) -> list[bytes]:
        return []


def relay(data: dict[str, Any], body: ResponsesBody, call: chat.Request) -> Relay:
    return Relay(data, StreamEncoder(ResponseEcho(body, str(data["model"]), call)))


# --- the format, as the serving path uses it ------------------------------------------------


def decode(body: ResponsesBody, model: str, rid: str | None) -> Decoded:
    """The canonical request; what needs a stored response is refused whoever the
    provider. A body the decoder refuses is still fine for a provider that reads it
    itself (OpenAI knows its own new fields better than this module): `refused`."""
    stateless(body)
    try:
        return decode_request(body, model, rid)
    except ApiError as exc:
        return Decoded(chat.user_text("", model=model, request_id=rid), [], refused=exc)


def answer(
    completion: chat.Completion, body: ResponsesBody, call: chat.Request, cost: float | None
) -> dict[str, Any]:
    return encode_response(completion, ResponseEcho(body, call.model, call))


def encoder(body: ResponsesBody, call: chat.Request) -> StreamEncoder:
    return StreamEncoder(ResponseEcho(body, call.model, call))


DIALECT = Dialect(
    wire=WIRE,
    errors="openai",
    body=ResponsesBody,
    decode=decode,
    answer=answer,
    encoder=encoder,
    passthrough=Passthrough(prepare=prepare, accounted=accounted, relay=relay),
    keeps="responses",
)
