"""OpenAI's Chat Completions, both ways: the `/v1/chat/completions` route our clients
call, and the format the `openai` provider (OpenAI, vLLM, Ollama, llama.cpp, SGLang,
Groq...) is called in.

To an OpenAI-protocol provider the client's body passes through as written (fields we
do not interpret included), with our model choice, keys, limits and accounting; the
provider's chunks are relayed, each re-framed as one `data:` line. To any other it is
translated through `chat`: tools and tool calls, structured output, images and
documents, reasoning (`reasoning_content` and `reasoning` both, and the signatures
of the reasoning a provider signs, as `reasoning_details`, so that they can come
back). Advisory fields with no counterpart are dropped and named in the access
line; a field whose meaning would be lost is a 400 naming it in `param`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

import chat
import jsonio
from dialects import (
    DONE,
    PING,
    Accounted,
    Decoded,
    Dialect,
    Passthrough,
    Step,
    bad,
    error_message,
    frame,
    integer,
    integral,
    json_object,
    own_api,
    reframed,
    text_size,
)
from errors import ApiError, ProviderError, shaped
from usage import Usage

WIRE = "openai_chat"
PATH = "/chat/completions"

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

PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(integral)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
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
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None


# Fields that change nothing an answer means, and have no counterpart elsewhere.
ADVISORY = frozenset(
    {
        "seed",
        "service_tier",
        "store",
        "metadata",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
        "verbosity",
        "presence_penalty",
        "frequency_penalty",
        "prediction",
        "moderation",
        "top_k",
    }
)


def decode_request(body: ChatCompletionBody, model: str, rid: str | None) -> Decoded:
    """The canonical request. Refusals that hold for any provider (a tool result for a
    call never made, arguments that are not JSON, a schema that is no schema) are
    raised here; what only a translation would lose is collected."""
    extra = dict(body.model_extra or {})
    lost: list[tuple[str, str]] = []
    dropped: list[str] = []

    def refuse_if(condition: bool, param: str, what: str) -> None:
        if condition:
            lost.append((param, what))

    refuse_if(body.n not in (None, 1), "n", "more than one choice (n > 1)")
    refuse_if(bool(extra.pop("logprobs", False)), "logprobs", "log probabilities")
    refuse_if(extra.pop("top_logprobs", None) is not None, "top_logprobs", "log probabilities")
    refuse_if(bool(extra.pop("logit_bias", None)), "logit_bias", "a logit bias")
    refuse_if(extra.pop("audio", None) is not None, "audio", "audio output")
    refuse_if("audio" in (extra.pop("modalities", None) or ()), "modalities", "audio output")
    refuse_if(
        extra.pop("web_search_options", None) is not None,
        "web_search_options",
        "built-in web search",
    )
    functions = extra.pop("functions", None)  # the old form of tools
    function_call = extra.pop("function_call", None)
    top_k = extra.get("top_k")
    dropped += sorted(k for k in extra if k != "top_k")

    _bounded(body, functions)
    tools = _tools(body.tools, functions)
    messages = _messages(body)
    reasoning = None
    if body.reasoning_effort is not None:
        effort = body.reasoning_effort
        reasoning = chat.ReasoningConfig(effort=effort, enabled=effort != "none")
    request = chat.Request(
        model=model,
        messages=tuple(messages),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=top_k if isinstance(top_k, int) and not isinstance(top_k, bool) else None,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        tools=tools,
        tool_choice=_tool_choice(body, function_call) if tools else None,
        response_format=_response_format(body.response_format),
        reasoning=reasoning,
        user=body.user,
        request_id=rid,
        dropped=tuple(dropped),
        choices=body.n or 1,
    )
    return Decoded(request, lost)


def _bounded(body: ChatCompletionBody, functions: Any) -> None:
    """Counts past what a provider takes (chat.MAX_*): a 400 naming the field."""
    tools = len(body.tools or ()) + (len(functions) if isinstance(functions, list) else 0)
    if tools > chat.MAX_TOOLS:
        field = "tools" if body.tools else "functions"
        raise bad(field, f"at most {chat.MAX_TOOLS} tools (OpenAI's own limit), not {tools}")
    if len(body.messages) > chat.MAX_MESSAGES:
        raise bad("messages", f"at most {chat.MAX_MESSAGES:,} messages, not {len(body.messages):,}")
    parts = 0
    for message in body.messages:
        content, calls = message.content, (message.model_extra or {}).get("tool_calls")
        parts += len(content) if isinstance(content, list) else 1
        parts += len(calls) if isinstance(calls, list) else 0
    if parts > chat.MAX_PARTS:
        raise bad("messages", f"at most {chat.MAX_PARTS:,} content parts and tool calls in all")


def _tools(raw: list[dict[str, Any]] | None, functions: Any) -> tuple[chat.Tool, ...]:
    tools: list[chat.Tool] = []
    for i, tool in enumerate(raw or ()):
        where = f"tools.{i}"
        kind = tool.get("type", "function")
        if kind == "custom":
            custom = tool.get("custom")
            if not isinstance(custom, dict) or not isinstance(custom.get("name"), str):
                raise bad(f"{where}.custom", "a custom tool needs a name")
            tools.append(
                chat.Tool(custom["name"], _text_or_none(custom.get("description")), kind="custom")
            )
            continue
        if kind != "function":
            raise bad(f"{where}.type", f"tools of type {kind!r} cannot be translated")
        tools.append(_function(tool.get("function"), f"{where}.function"))
    if isinstance(functions, list):
        tools += [_function(f, f"functions.{i}") for i, f in enumerate(functions)]
    return tuple(tools)


def _function(function: Any, where: str) -> chat.Tool:
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad(where, "a function tool needs a name")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise bad(f"{where}.parameters", "the parameters must be a JSON Schema of an object")
    strict = function.get("strict")
    return chat.Tool(
        function["name"],
        _text_or_none(function.get("description")),
        parameters,
        strict=strict if isinstance(strict, bool) else None,
    )


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _tool_choice(body: ChatCompletionBody, function_call: Any) -> chat.ToolChoice | None:
    raw = body.tool_choice if body.tool_choice is not None else function_call
    parallel = body.parallel_tool_calls is not False
    if raw is None:
        return None if parallel else chat.ToolChoice("auto", parallel=False)
    if raw in ("auto", "none", "required"):
        return chat.ToolChoice(raw, parallel=parallel)  # type: ignore[arg-type]
    if isinstance(raw, dict):
        named = raw.get("function") or raw.get("custom") or raw
        if isinstance(named, dict) and isinstance(named.get("name"), str):
            return chat.ToolChoice("tool", named["name"], parallel=parallel)
    raise bad("tool_choice", "must be auto, none, required, or a named function")


def _response_format(raw: dict[str, Any] | None) -> chat.ResponseFormat | None:
    if raw is None or raw.get("type") in (None, "text"):
        return None
    if raw["type"] == "json_object":
        return chat.ResponseFormat("json_object")
    if raw["type"] == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format.json_schema", "needs a name and a schema object")
        strict = spec.get("strict")
        return chat.ResponseFormat(
            "json_schema",
            name=_text_or_none(spec.get("name")),
            schema=spec.get("schema") or {"type": "object"},
            strict=strict if isinstance(strict, bool) else None,
        )
    raise bad("response_format.type", f"{raw['type']!r} is not text, json_object or json_schema")


def _messages(body: ChatCompletionBody) -> list[chat.Message]:
    messages: list[chat.Message] = []
    calls: set[str] = set()  # the call ids made so far, for the results that follow
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        extra = message.model_extra or {}
        role = message.role
        if role == "function":
            raise bad(f"{where}.role", "the function role is gone; use tool messages")
        if role == "tool":
            call_id = extra.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise bad(f"{where}.tool_call_id", f"no earlier tool call has the id {call_id!r}")
            content = tuple(
                p for p in _parts(message.content, where) if isinstance(p, chat.Text | chat.Image)
            )
            result = chat.ToolResult(call_id, content)
            messages.append(chat.Message("tool", (result,)))
            continue
        parts: list[chat.Part] = []
        if role == "assistant":
            parts += _reasoning_parts(extra, where)
        parts += _parts(message.content, where)
        if role == "assistant":
            if isinstance(extra.get("refusal"), str) and extra["refusal"]:
                parts.append(chat.Refusal(extra["refusal"]))
            for j, call in enumerate(_calls_of(extra)):
                call_where = f"{where}.tool_calls.{j}"
                if not isinstance(call, dict):
                    raise bad(call_where, "a tool call must be an object")
                function = call.get("function") or call.get("custom") or {}
                arguments = _arguments(function)
                call_id = call.get("id")
                if not isinstance(call_id, str) or not isinstance(function.get("name"), str):
                    raise bad(call_where, "a tool call needs an id and a name")
                if not isinstance(arguments, str):
                    raise bad(f"{call_where}.function.arguments", "must be a string of JSON")
                calls.add(call_id)
                parts.append(chat.ToolCall(call_id, function["name"], arguments))
        messages.append(chat.Message(role, tuple(parts)))
    return messages


def _arguments(function: Mapping[str, Any]) -> Any:
    """A call's arguments: a function's JSON text, or a custom tool's `input` as the
    JSON of its one string argument (chat.FREEFORM)."""
    if "arguments" not in function and isinstance(function.get("input"), str):
        return jsonio.dumps({"input": function["input"]}).decode()
    return function.get("arguments", "")


def _calls_of(extra: Mapping[str, Any]) -> list[Any]:
    calls = extra.get("tool_calls")
    if calls is None and isinstance(extra.get("function_call"), dict):
        legacy = extra["function_call"]
        return [{"id": "call_" + str(legacy.get("name")), "function": legacy}]
    if calls is not None and not isinstance(calls, list):
        raise bad("tool_calls", "must be a list")
    return list(calls or ())


def _parts(content: str | list[dict[str, Any]] | None, where: str) -> list[chat.Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [chat.Text(content)] if content else []
    parts: list[chat.Part] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        at = f"{where}.content.{j}"
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(chat.Text(part["text"], part.get("cache_control")))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad(f"{at}.image_url", "needs a url")
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append(chat.Image(url, detail if isinstance(detail, str) else None))
        elif kind == "file":
            file = part.get("file") or {}
            data = file.get("file_data") if isinstance(file, dict) else None
            if not isinstance(data, str) or not data.startswith("data:application/pdf"):
                raise bad(f"{at}.file", "only a PDF given as file_data can be translated")
            parts.append(chat.Document(data, _text_or_none(file.get("filename"))))
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(chat.Refusal(part["refusal"]))
        else:
            raise bad(at, f"a content part of type {kind!r} cannot be translated")
    return parts


def _reasoning_parts(extra: Mapping[str, Any], where: str) -> list[chat.Part]:
    """An assistant turn's reasoning: `reasoning_details` (with signatures and opaque
    content, tagged with their origin) when the client sent them back, else the
    plain text of `reasoning_content` or `reasoning`."""
    details = extra.get("reasoning_details")
    if isinstance(details, list) and details:
        parts: list[chat.Part] = []
        for detail in details:
            if not isinstance(detail, dict):
                continue
            origin = _text_or_none(detail.get("format"))
            if detail.get("type") == "reasoning.encrypted":
                parts.append(chat.Reasoning(opaque=str(detail.get("data", "")), origin=origin))
            else:
                text = str(detail.get("text") or detail.get("summary") or "")
                signature = _text_or_none(detail.get("signature"))
                parts.append(chat.Reasoning(text, signature=signature, origin=origin))
        return parts
    plain = extra.get("reasoning_content") or extra.get("reasoning")
    return [chat.Reasoning(plain)] if isinstance(plain, str) and plain else []


# OpenAI's own API (and Azure's), which honours a named `tool_choice`.
OPENAI_HOSTS = ("api.openai.com", ".openai.com", ".openai.azure.com")


def encode_request(request: chat.Request, *, stream: bool, origin: str = "") -> dict[str, Any]:
    """The body for an OpenAI-protocol provider."""
    body: dict[str, Any] = {"model": request.model, "messages": _encode_messages(request.messages)}
    if request.max_tokens is not None:
        key = "max_completion_tokens" if request.reasoning else "max_tokens"
        body[key] = request.max_tokens
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.stop:
        body["stop"] = list(request.stop)
    if request.user:
        body["user"] = request.user
    if request.tools:
        body["tools"] = [_encode_tool(tool) for tool in request.tools]
        choice = request.tool_choice
        if choice is not None:
            named = [t for t in body["tools"] if t["function"]["name"] == choice.name]
            if choice.mode == "tool" and named and not own_api(origin, *OPENAI_HOSTS):
                # llama.cpp's server (and others) take only a string: "required" with
                # the one tool offered means the same.
                body["tools"], body["tool_choice"] = named, "required"
            elif choice.mode == "tool":
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = choice.mode
            if not choice.parallel and choice.mode != "none":
                body["parallel_tool_calls"] = False
    form = request.response_format
    if form is not None and form.kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif form is not None:
        spec: dict[str, Any] = {"name": form.name or "answer", "schema": form.schema or {}}
        if form.strict is not None:
            spec["strict"] = form.strict
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    reasoning = request.reasoning
    if reasoning is not None:
        body["reasoning_effort"] = _effort(reasoning)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _effort(reasoning: chat.ReasoningConfig) -> str:
    if not reasoning.enabled:
        return "none"
    if reasoning.effort is not None:
        return reasoning.effort
    budget = reasoning.budget_tokens or 0
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def _encode_tool(tool: chat.Tool) -> dict[str, Any]:
    # A custom tool as a function of one string (what every OpenAI-compatible server
    # takes); a Chat client's own custom tools pass through to OpenAI as they are.
    parameters = chat.FREEFORM if tool.kind == "custom" else tool.parameters
    function: dict[str, Any] = {"name": tool.name, "parameters": dict(parameters)}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _encode_messages(messages: Iterable[chat.Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if role == "tool" or any(isinstance(p, chat.ToolResult) for p in message.parts):
            images: list[dict[str, Any]] = []
            for part in message.parts:
                if isinstance(part, chat.ToolResult):
                    text = "".join(p.text for p in part.content if isinstance(p, chat.Text))
                    images += [_image(p) for p in part.content if isinstance(p, chat.Image)]
                    out.append({"role": "tool", "tool_call_id": part.call_id, "content": text})
            rest = [p for p in message.parts if not isinstance(p, chat.ToolResult)]
            # Going back, a tool result's images follow the tool messages, from the user.
            if images or rest:
                out.append({"role": "user", "content": images + _content_parts(rest)})
            continue
        entry: dict[str, Any] = {"role": role}
        calls = [p for p in message.parts if isinstance(p, chat.ToolCall)]
        content = [p for p in message.parts if not isinstance(p, chat.ToolCall | chat.Reasoning)]
        if all(isinstance(p, chat.Text) for p in content):
            entry["content"] = "".join(p.text for p in content if isinstance(p, chat.Text))
        else:
            entry["content"] = _content_parts(content)
        if calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
            if not entry["content"]:
                entry["content"] = None
        out.append(entry)
    return out


def _content_parts(parts: Iterable[chat.Part]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, chat.Text):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, chat.Image):
            out.append(_image(part))
        elif isinstance(part, chat.Document):
            file = {"file_data": part.url, "filename": part.name or "document.pdf"}
            out.append({"type": "file", "file": file})
        elif isinstance(part, chat.Refusal):
            out.append({"type": "text", "text": part.text})
    return out


def _image(image: chat.Image) -> dict[str, Any]:
    spec = {"url": image.url} | ({"detail": image.detail} if image.detail else {})
    return {"type": "image_url", "image_url": spec}


# --- answers -------------------------------------------------------------------------


def usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    details = data.get("prompt_tokens_details")
    cached = integer(details.get("cached_tokens")) if isinstance(details, dict) else 0
    output = data.get("completion_tokens_details")
    reasoning = integer(output.get("reasoning_tokens")) if isinstance(output, dict) else 0
    return Usage(
        input_tokens=integer(data.get("prompt_tokens")),
        output_tokens=integer(data.get("completion_tokens")),
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
    )


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def _finish(native: str | None, called: bool) -> str:
    """If a tool call was emitted, the reason is the tool one, whatever was said."""
    return "tool_calls" if called else FINISH.get(native or "stop", "stop")


def decode_response(
    data: dict[str, Any], request: chat.Request, origin: str = ""
) -> chat.Completion:
    try:
        choice = data["choices"][0]
        message = choice["message"]
        native = str(choice.get("finish_reason") or "stop")
        if not isinstance(message, dict):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise ProviderError("the provider's answer has no choices") from None
    parts: list[chat.Part] = []
    reasoning, _ = _reasoning_text(message)
    if reasoning:
        parts.append(chat.Reasoning(reasoning, origin=origin or None))
    if isinstance(message.get("content"), str) and message["content"]:
        parts.append(chat.Text(message["content"]))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append(chat.Refusal(message["refusal"]))
    for call in message.get("tool_calls") or ():
        function = (
            (call.get("function") or call.get("custom") or {}) if isinstance(call, dict) else {}
        )
        arguments = _arguments(function)
        call_id = str(call.get("id") or chat.new_id("call_"))
        parts.append(chat.ToolCall(call_id, str(function.get("name", "")), str(arguments or "{}")))
    called = any(isinstance(p, chat.ToolCall) for p in parts)
    if not parts:
        parts.append(chat.Text(""))
    return chat.Completion(
        id=str(data.get("id") or chat.new_id("chatcmpl-")),
        model=str(data.get("model") or request.model),
        parts=tuple(parts),
        finish_reason=_finish(native, called),
        usage=usage_of(data.get("usage")) or Usage(estimated=True),
        native=native,
    )


def encode_response(completion: chat.Completion) -> dict[str, Any]:
    """A whole answer as a `chat.completion` object."""
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    text = [p.text for p in completion.parts if isinstance(p, chat.Text)]
    if text or not any(isinstance(p, chat.ToolCall) for p in completion.parts):
        message["content"] = "".join(text)
    refusals = [p.text for p in completion.parts if isinstance(p, chat.Refusal)]
    if refusals:
        message["refusal"] = "".join(refusals)
    reasoning = [p for p in completion.parts if isinstance(p, chat.Reasoning)]
    if reasoning:
        thought = "".join(p.text for p in reasoning)
        if thought:
            message["reasoning_content"] = message["reasoning"] = thought
        details = [_detail(p) for p in reasoning if p.signature is not None or p.opaque is not None]
        if details:
            message["reasoning_details"] = details
    calls = [p for p in completion.parts if isinstance(p, chat.ToolCall)]
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage_object(completion.usage),
    }


def _detail(part: chat.Reasoning | chat.ReasoningDelta) -> dict[str, Any]:
    """Reasoning only its origin can read, in the form OpenRouter gave Chat clients:
    `format` names the origin, so that it goes back to that provider only."""
    if part.opaque is not None:
        return {"type": "reasoning.encrypted", "data": part.opaque, "format": part.origin}
    return {
        "type": "reasoning.text",
        "text": part.text,
        "signature": part.signature,
        "format": part.origin,
    }


# Keys of a delta that name or number it, not output.
_NOT_OUTPUT = frozenset({"role", "index", "type", "id"})
# What the decoder reads of the first choice's delta; the rest is counted by its size.
_READ = frozenset(
    {"role", "content", "reasoning_content", "reasoning", "reasoning_details", "refusal",
     "tool_calls"}
)  # fmt: skip


def _reasoning_text(message: Mapping[str, Any]) -> tuple[str, int]:
    """A provider's reasoning text (of a message or a delta), and the size of what it
    sends of it that we do not carry: `reasoning_content` (vLLM, DeepSeek) or
    `reasoning` (OpenRouter, Ollama); else the text of OpenRouter's `reasoning_details`,
    which repeat `reasoning` when both come, so that it is read, and counted against
    the cap, once. Their encrypted blocks are only counted: a translated request sends
    no reasoning back to an OpenAI-protocol provider, so they would have no use."""
    plain = message.get("reasoning_content") or message.get("reasoning")
    details = message.get("reasoning_details")
    if not isinstance(details, list):
        return (plain if isinstance(plain, str) else ""), 0
    texts, hidden = [], 0
    for detail in details:
        if not isinstance(detail, dict):
            continue
        if detail.get("type") == "reasoning.encrypted":
            hidden += text_size(detail.get("data"))
        elif isinstance(text := detail.get("text") or detail.get("summary"), str):
            texts.append(text)
    if isinstance(plain, str) and plain:
        return plain, hidden
    return "".join(texts), hidden


class StreamDecoder:
    """A provider's chunks as `chat` events (its first choice: ours are one choice)."""

    def __init__(self, model: str = "", origin: str = "") -> None:
        self.model = model
        self.origin = origin or None
        self.started = False
        self.done = False
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.calls: dict[int, str] = {}  # the provider's index of each call -> its id
        self.positions: dict[int, int] = {}  # the provider's index of each call -> ours

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
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:  # another choice: counted, not carried
                events.append(chat.Unread(text_size(choice.get("delta"), _NOT_OUTPUT)))
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, events)
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        if obj.get("usage"):  # the last chunk only, mostly
            self.usage = usage_of(obj["usage"]) or self.usage
        return events

    def _delta(self, delta: dict[str, Any], events: list[chat.Event]) -> None:
        if not _READ.issuperset(delta):  # a kind not read (audio...): counted, not carried
            size = text_size({k: v for k, v in delta.items() if k not in _READ})
            if size:
                events.append(chat.Unread(size))
        reasoning, hidden = _reasoning_text(delta)
        if reasoning:
            events.append(chat.ReasoningDelta(reasoning, origin=self.origin))
        if hidden:
            events.append(chat.Unread(hidden))
        text = delta.get("content")
        if isinstance(text, str) and text:
            events.append(chat.TextDelta(text))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            events.append(chat.RefusalDelta(refusal))
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            index = call.get("index", len(self.calls))
            function = call.get("function") or {}
            if index not in self.calls:  # the first delta of a call names it
                call_id = str(call.get("id") or chat.new_id("call_"))
                self.calls[index] = call_id
                self.positions[index] = len(self.positions)
                events.append(
                    chat.ToolCallStart(len(self.calls) - 1, call_id, str(function.get("name", "")))
                )
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                events.append(chat.ToolCallDelta(self.positions[index], arguments))

    def end(self) -> chat.End | None:
        if self.finish is None and not self.done:
            return None  # cut off before the answer was complete
        usage = self.usage or Usage(estimated=True)
        return chat.End(_finish(self.finish, bool(self.calls)), usage, self.finish or "stop")


def stream_decoder(request: chat.Request, origin: str = "") -> StreamDecoder:
    return StreamDecoder(request.model, origin)


class StreamEncoder:
    """`chat` events as Chat Completions chunks, for a client of this format: the role
    chunk once, then content, reasoning and refusal deltas, and tool calls counted
    by `index`, the first delta of each carrying its id, type, name and empty
    arguments."""

    ping = PING

    def __init__(self, model: str, include_usage: bool) -> None:
        self.head = {
            "id": chat.new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self.include_usage = include_usage
        self.started = False
        self.called = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if self.include_usage else {}
        return frame({**self.head, "choices": [choice], **extra})

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True  # the role chunk, once
        return [self._chunk({"role": "assistant", "content": ""})]

    def frames(self, event: chat.Event) -> list[bytes]:
        out = self._start()
        if isinstance(event, chat.TextDelta):
            out.append(self._chunk({"content": event.text}))
        elif isinstance(event, chat.ToolCallDelta):
            call = {"index": event.index, "function": {"arguments": event.arguments}}
            out.append(self._chunk({"tool_calls": [call]}))
        elif isinstance(event, chat.ToolCallStart):
            self.called = True
            call = {
                "index": event.index,
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            out.append(self._chunk({"tool_calls": [call]}))
        elif isinstance(event, chat.ReasoningDelta):
            if event.text:
                out.append(self._chunk({"reasoning_content": event.text, "reasoning": event.text}))
            if event.signature is not None or event.opaque is not None:
                out.append(self._chunk({"reasoning_details": [_detail(event)]}))
        elif isinstance(event, chat.RefusalDelta):
            out.append(self._chunk({"refusal": event.text}))
        return out

    def last(self, end: chat.End, model: str, cost: float | None) -> list[bytes]:
        finish = "tool_calls" if self.called else end.finish_reason
        out = [*self._start(), self._chunk({}, finish)]
        if self.include_usage:
            out.append(frame({**self.head, "choices": [], "usage": usage_object(end.usage)}))
        out.append(DONE)
        return out

    @staticmethod
    def error(error: ApiError, request_id: str) -> bytes:
        return frame(shaped("openai", error.type, error.message, request_id), "error")


# --- passed through ----------------------------------------------------------------------


def prepare(data: dict[str, Any]) -> None:
    """Always ask a stream for usage: the accounting needs it, whatever the client wants."""
    if data.get("stream"):
        data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}


def accounted(answer: dict[str, Any]) -> Accounted:
    choices = answer.get("choices") or ()
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    finish = next(
        (FINISH.get(str(c.get("finish_reason")), "stop") for c in choices if isinstance(c, dict)),
        "stop",
    )
    model = answer.get("model")
    return Accounted(
        str(model) if model else None,
        usage_of(answer.get("usage")),
        finish,
        text if isinstance(text, str) else "",
    )


class Relay:
    """A provider's chunks, passed through: each re-framed as one data: line, read as
    `chat` events for the accounting; the usage chunk the client did not ask for is
    dropped; cut as `length` past the body's max tokens."""

    def __init__(self, data: dict[str, Any], include_usage: bool) -> None:
        self.model = str(data["model"])
        self.decoder = StreamDecoder(self.model)
        self.include_usage = include_usage
        self.encoder = StreamEncoder(self.model, include_usage)
        self.last: dict[str, Any] = {}

    def read(self, event: str, data: str) -> Step:
        if data == "[DONE]":
            self.decoder.done = True
            return Step(None, [], last=True)
        obj = json_object(data)
        events = self.decoder.chunk(obj)
        deltas = [e for e in events if isinstance(e, chat.Delta)]
        self.model = str(obj.get("model") or self.model)
        self.last = obj
        more = tuple(e.size for e in events if isinstance(e, chat.Unread))
        if obj.get("usage") and not self.include_usage and not obj.get("choices"):
            return Step(None, deltas, more=more)  # the usage chunk this client did not ask for
        return Step(reframed(data), deltas, more=more)

    def cut(self, sent: int) -> list[bytes]:
        self.decoder.finish, self.decoder.usage = "length", None
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
        return [frame({**self.last, "choices": [choice], "usage": None})]

    def end(self) -> Accounted | None:
        end = self.decoder.end()
        if end is None:
            return None
        return Accounted(self.model, None if end.usage.estimated else end.usage, end.finish_reason)

    def tail(self) -> list[bytes]:
        return [DONE]


def relay(data: dict[str, Any], body: ChatCompletionBody, call: chat.Request) -> Relay:
    options = body.stream_options  # as the client sent it (`prepare` asks for usage)
    return Relay(data, bool(options and options.include_usage))


def model_object(model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}


def model_list(models: Iterable[str], owner: str) -> dict[str, Any]:
    """GET /v1/models in OpenAI's shape."""
    return {"object": "list", "data": [model_object(m, owner) for m in models]}


# --- the format, as the serving path uses it ------------------------------------------------


def answer(
    completion: chat.Completion, body: ChatCompletionBody, call: chat.Request, cost: float | None
) -> dict[str, Any]:
    return encode_response(completion)


def encoder(body: ChatCompletionBody, call: chat.Request) -> StreamEncoder:
    options = body.stream_options
    return StreamEncoder(call.model, bool(options and options.include_usage))


DIALECT = Dialect(
    wire=WIRE,
    errors="openai",
    body=ChatCompletionBody,
    decode=decode_request,
    answer=answer,
    encoder=encoder,
    passthrough=Passthrough(prepare=prepare, accounted=accounted, relay=relay),
)
