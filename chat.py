"""The hub: one canonical request, one canonical stream of events, between every wire
format a client speaks and every one a provider speaks.

Each dialect (dialects/) decodes its requests into a `Request` and encodes `Event`s
back; each provider takes a `Request` and yields `Event`s. N formats need N
translators, not N x N. A completion is the stream gathered (`gather`), so a whole
answer and a streamed one are one thing seen twice.

Messages keep their order, system and developer ones included: a dialect that needs
them elsewhere (Anthropic's top-level `system`) moves them when it encodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from usage import Usage

# --- the request ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    text: str
    cache_control: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Image:
    """An image by URL: https, or a `data:` URL carrying it as base64."""

    url: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Document:
    """A document (a PDF) by URL: https, or a `data:` URL carrying it as base64."""

    url: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the assistant made: `arguments` is the raw JSON text, as the model wrote
    it; `id` is the call id (apart from any item id a format gives the call)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    content: tuple[Text | Image, ...]
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class Reasoning:
    """The model's reasoning: its text, and what only its origin can read back (a
    signature, redacted or encrypted content), tagged with that origin."""

    text: str = ""
    signature: str | None = None
    opaque: str | None = None
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    text: str


Part = Text | Image | Document | ToolCall | ToolResult | Reasoning | Refusal
Role = Literal["system", "developer", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, Text))


# A custom (freeform) tool, to a format that has only functions: one string argument.
# Its calls' `arguments` are always this object's JSON, whichever format they came in.
FREEFORM: Mapping[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
}


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)  # a JSON Schema
    strict: bool | None = None
    kind: Literal["function", "custom"] = "function"
    cache_control: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "tool"]
    name: str | None = None  # with mode "tool"
    parallel: bool = True


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    kind: Literal["json_object", "json_schema"]
    name: str | None = None
    schema: Mapping[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ReasoningConfig:
    """Reasoning asked for: by effort ("minimal", "low", "medium", "high"...) or by a
    budget of tokens; `enabled` False turns it off."""

    effort: str | None = None
    budget_tokens: int | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Request:
    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None = None  # None: the provider's own default
    temperature: float | None = None  # None: the provider's default
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    reasoning: ReasoningConfig | None = None
    user: str | None = None
    request_id: str | None = None
    dropped: tuple[str, ...] = ()  # advisory fields of the client's body, not carried
    # Answers asked for at once (Chat's `n`): only a body passed through asks for more
    # than one, and each is reserved and capped at `max_tokens`.
    choices: int = 1


# Bounds on what one request holds, past which a provider refuses it anyway: each
# dialect's decoder answers a 400 naming the field, rather than read it all through.
MAX_MESSAGES = 100_000  # Anthropic's documented limit, past any model's context
MAX_PARTS = 100_000  # content parts, tool calls and tool results, in all the messages
MAX_TOOLS = 128  # OpenAI's limit on the tools of Chat Completions and Responses


def user_text(text: str, *, model: str, system: str | None = None, **settings: Any) -> Request:
    """A request of one user message, and a system prompt if given."""
    messages = (Message("system", (Text(system),)),) if system else ()
    return Request(model=model, messages=(*messages, Message("user", (Text(text),))), **settings)


def new_id(prefix: str = "cmpl-") -> str:
    return prefix + os.urandom(16).hex()  # as random as uuid4().hex, at a fifth of the cost


def shortened(legal: str, original: str, most: int) -> str:
    """`legal` cut to at most `most` characters with a suffix made from `original`:
    the same original always gives the same name, so a translation needs no state."""
    suffix = "_" + hashlib.sha256(original.encode()).hexdigest()[:8]
    return legal[: most - len(suffix)] + suffix


def with_model(request: Request, model: str) -> Request:
    """The request for another model (a fallback's)."""
    return request if request.model == model else dataclasses.replace(request, model=model)


def estimate_tokens(text: str) -> int:
    """About four characters a token: for reservations, and for a provider that
    reports no usage (logged as such)."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def input_estimate(request: Request) -> int:
    """The request's input in tokens, estimated from its text: what a reservation
    counts before the provider has said, and a cut-short stream is billed."""
    size = 0
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, Text | Refusal):
                size += len(part.text)
            elif isinstance(part, Reasoning):
                size += len(part.text)
            elif isinstance(part, ToolCall):
                size += len(part.name) + len(part.arguments)
            elif isinstance(part, ToolResult):
                size += sum(len(p.text) for p in part.content if isinstance(p, Text))
    for tool in request.tools:
        size += len(tool.name) + len(tool.description or "") + len(str(tool.parameters))
    return max(1, math.ceil(size / 4)) if size else 0


# --- the events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The provider has begun its answer (the first frame a client may get)."""

    id: str
    model: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """`index` counts tool calls only (0, 1, ...), whatever the provider counts."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    arguments: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning text, or (once the block is done) its signature, or a block whose
    content only its origin can read (`opaque`), tagged with that origin."""

    text: str = ""
    signature: str | None = None
    opaque: str | None = None
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Unread:
    """Output of a kind no format here carries (another choice's, a delta kind not
    read), `size` characters: never sent on, but counted against the stream's cap of
    output, so that a provider cannot stream past it in a kind we do not read."""

    size: int


@dataclass(frozen=True, slots=True)
class End:
    """The answer is complete. `finish_reason` is "stop", "length", "tool_calls" or
    "content_filter"; `native` is the provider's own word for it, kept for a client of
    the same format."""

    finish_reason: str
    usage: Usage
    native: str | None = None
    stop_sequence: str | None = None


Event = (
    Start | TextDelta | ToolCallStart | ToolCallDelta | ReasoningDelta | RefusalDelta | Unread | End
)
Delta = TextDelta | ToolCallDelta | ReasoningDelta | RefusalDelta  # what a stream is made of


# --- embeddings ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Embeddings:
    """An embeddings call: its inputs (texts, or texts as token ids) and the size of
    vector asked for (None: the model's own)."""

    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class Vectors:
    """An embeddings answer: a vector an input, in order, and the input's tokens."""

    model: str
    vectors: list[list[float]]
    input_tokens: int


# --- a whole answer ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    id: str
    model: str
    parts: tuple[Part, ...]
    finish_reason: str
    usage: Usage
    native: str | None = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, Text))


class Gatherer:
    """Events into the completion they add up to: runs of text, reasoning blocks (a
    signature or opaque content closes one), refusals, then the tool calls in order."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.parts: list[Part] = []
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._origin: str | None = None
        self._refusal: list[str] = []
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments...]
        self.end: End | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self._flush(text=False)
            self._text.append(event.text)
        elif isinstance(event, ReasoningDelta):
            self._flush(reasoning=False)
            self._reasoning.append(event.text)
            self._origin = event.origin or self._origin
            if event.signature is not None or event.opaque is not None:
                self.parts.append(
                    Reasoning(
                        "".join(self._reasoning),
                        signature=event.signature,
                        opaque=event.opaque,
                        origin=self._origin,
                    )
                )
                self._reasoning, self._origin = [], None
        elif isinstance(event, RefusalDelta):
            self._flush(refusal=False)
            self._refusal.append(event.text)
        elif isinstance(event, ToolCallStart):
            self._flush()
            self._calls[event.index] = [event.id, event.name]
        elif isinstance(event, ToolCallDelta):
            self._calls.setdefault(event.index, ["", ""]).append(event.arguments)
        elif isinstance(event, Start):
            self.id, self.model = event.id, event.model
        elif isinstance(event, End):
            self.end = event

    def _flush(self, *, text: bool = True, reasoning: bool = True, refusal: bool = True) -> None:
        if reasoning and (self._reasoning or self._origin):
            self.parts.append(Reasoning("".join(self._reasoning), origin=self._origin))
            self._reasoning, self._origin = [], None
        if text and self._text:
            self.parts.append(Text("".join(self._text)))
            self._text = []
        if refusal and self._refusal:
            self.parts.append(Refusal("".join(self._refusal)))
            self._refusal = []

    def completion(self) -> Completion:
        if self.end is None:
            raise ValueError("the events ended before the answer did")
        self._flush()
        for _, (call_id, name, *arguments) in sorted(self._calls.items()):
            self.parts.append(ToolCall(call_id, name, "".join(arguments) or "{}"))
        return Completion(
            id=self.id,
            model=self.model,
            parts=tuple(self.parts),
            finish_reason=self.end.finish_reason,
            usage=self.end.usage,
            native=self.end.native,
        )


async def gather(events: AsyncIterator[Event]) -> Completion:
    gatherer = Gatherer()
    async for event in events:
        gatherer.add(event)
    return gatherer.completion()


def events_of(completion: Completion) -> Iterable[Event]:
    """A completion as the events that would have streamed it."""
    yield Start(completion.id, completion.model)
    calls = 0
    for part in completion.parts:
        if isinstance(part, Text):
            yield TextDelta(part.text)
        elif isinstance(part, Reasoning):
            if part.text:
                yield ReasoningDelta(part.text, origin=part.origin)
            if part.signature is not None or part.opaque is not None:
                yield ReasoningDelta(
                    signature=part.signature, opaque=part.opaque, origin=part.origin
                )
        elif isinstance(part, Refusal):
            yield RefusalDelta(part.text)
        elif isinstance(part, ToolCall):
            yield ToolCallStart(calls, part.id, part.name)
            yield ToolCallDelta(calls, part.arguments)
            calls += 1
    yield End(completion.finish_reason, completion.usage, completion.native)
