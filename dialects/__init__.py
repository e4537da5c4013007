"""One module per wire format, each both ways: decoding and encoding requests, whole
answers and stream events, to and from `chat`. A route speaks its client's format;
a provider speaks its own; when the two are the same, the body passes through.

Translators only: pure data work, no Starlette, no admission, no network. Each client
format describes itself to the serving path (gateway.py) as one `Dialect`: its body's
schema, its decoder and encoders, and, when a provider speaks it too, its
`Passthrough` hooks (what of an answer passed through the accounting reads, and where
a stream passed through is cut).

What every format shares is here: the dialect's description, SSE framing, reading a
provider's JSON, the 400 for a field, and the decoded request with what of it no other
format carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator

import chat
import jsonio
from errors import ApiError, ProviderError
from usage import Usage

# --- SSE framing ------------------------------------------------------------------------

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def frame(data: Mapping[str, Any], event: str | None = None) -> bytes:
    """One SSE event whose data is one line of JSON: newlines in text stay escaped."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + jsonio.dumps(data) + b"\n\n"


def reframed(text: str, event: str | None = None) -> bytes:
    """A provider's event data as one line (a multi-line event or a bare CR would
    reach the client's parser as broken JSON), as it came when it is one already."""
    if "\n" in text or "\r" in text:
        return frame(jsonio.loads(text), event)
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + text.encode() + b"\n\n"


class Encoder(Protocol):
    """`chat` events as a client format's frames."""

    ping: bytes  # what is sent while the stream is idle

    def frames(self, event: chat.Event) -> Iterable[bytes]:
        """The frames of any event but the end."""
        ...

    def last(self, end: chat.End, model: str, cost: float | None) -> Iterable[bytes]:
        """The frames that end the stream."""
        ...

    def error(self, error: ApiError, request_id: str) -> bytes:
        """The frame that tells the client the stream broke."""
        ...


# --- what a format tells the serving path -------------------------------------------------


def integral(value: Any) -> Any:
    """JSON Schema counts 80.0 as an integer; strict pydantic would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(integral)]


class Accounted(NamedTuple):
    """What the accounting reads of an answer passed through: its model, its usage
    (None: not reported), its finish reason, and its text (for an estimate)."""

    model: str | None
    usage: Usage | None
    finish: str
    text: str = ""


class Step(NamedTuple):
    """One event of a stream passed through, read: the frame for the client (None:
    nothing), the deltas it carries as `chat` reads them, and the sizes of what else it
    carries (other choices, kinds of delta `chat` has no word for), all counted against
    the cap; whether it was the answer's last (`last`) or the provider's own error,
    relayed (`failed`); and frames of ours to send before it (`lead`: an event the
    provider left out that the client's SDK needs)."""

    frame: bytes | None
    deltas: list[chat.Delta]
    last: bool = False
    failed: bool = False
    more: tuple[int, ...] = ()
    lead: tuple[bytes, ...] = ()


def text_size(value: Any, skip: frozenset[str] = frozenset()) -> int:
    """The characters of the strings in a JSON value (but under the keys in `skip`):
    what a delta of a kind `chat` does not read carries, for the output cap."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_size(v, skip) for k, v in value.items() if k not in skip)
    if isinstance(value, list):
        return sum(text_size(v, skip) for v in value)
    return 0


class Relay(Protocol):
    """A stream passed through, read event by event for the accounting."""

    @property
    def model(self) -> str:
        """The model, as the provider's events name it."""
        ...

    @property
    def encoder(self) -> Encoder:
        """For pings, and for an error of ours inside the stream."""
        ...

    def read(self, event: str, data: str) -> Step: ...

    def cut(self, sent: int) -> list[bytes]:
        """The frames that end a stream stopped at its cap after `sent` deltas (or a
        ProviderError)."""
        ...

    def end(self) -> Accounted | None:
        """After the provider's last event; None if the answer was not complete."""
        ...

    def tail(self) -> list[bytes]:
        """The frames after the accounting (Chat's `[DONE]`)."""
        ...


@dataclass(frozen=True, kw_only=True)
class Passthrough:
    """How a body of this format goes to a provider that speaks it: `prepare` edits it
    (the model is set already), `accounted` reads a whole answer, `relay` a stream;
    `headers` are the client's headers passed on, `query` the parameters of its query
    string that are (no others: one could choose what the provider does),
    `own` the beta flags of what this service does itself (taken out of the headers
    passed on), `scale` how many times the answer-size bound its answers may be."""

    prepare: Callable[[dict[str, Any]], None]
    accounted: Callable[[dict[str, Any]], Accounted]
    # For answers big by nature: what the accounting needs, read from the raw bytes
    # (None: it could not, and the answer is parsed whole); the bytes then go as they came.
    raw: Callable[[bytes], Accounted | None] | None = None
    # the body as it goes, as validated, and as decoded
    relay: Callable[[dict[str, Any], Any, chat.Request], Relay] | None = None
    headers: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    own: tuple[str, ...] = ()
    scale: int = 1
    verbatim: bool = False  # the provider's refusals go back as they came


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """A client format as the serving path uses it. `errors` names the error shape its
    clients read ("ours", "openai", "anthropic"); `decode` reads a validated body into
    `chat`; `answer` and `encoder` write a whole answer and a stream, `streams` says
    which a body asks for; `fallback`: whether a fallback provider may serve it. A body
    `decode` could not read (`Decoded.refused`) may still pass through, to a provider
    that reads it itself."""

    wire: str
    errors: str
    body: type[BaseModel]
    decode: Callable[[Any, str, str | None], Decoded]
    answer: Callable[[Any, Any, chat.Request, float | None], dict[str, Any]]
    encoder: Callable[[Any, chat.Request], Encoder] | None = None
    passthrough: Passthrough | None = None
    fallback: bool = True
    streams: Callable[[Any], bool] = lambda body: bool(getattr(body, "stream", False))
    # The state its answers are kept in and continued from (stored.py), by name.
    keeps: str | None = None


def nothing(data: dict[str, Any]) -> None:
    """`Passthrough.prepare` for a body that goes as it came."""


def bad(param: str, message: str) -> ApiError:
    """The 400 for one field of a client's body, named in `param`."""
    return ApiError(400, "invalid_request", f"{param}: {message}", param=param)


class Decoded:
    """A client's body read into `chat`, and what of it no other format can carry:
    `lost`, (field, what it asks for), each a 400 unless the body passes through; or
    `refused`, the error that kept the body from being read at all. `embeddings`: what
    an embeddings body asks, for a provider that makes them itself."""

    def __init__(
        self,
        request: chat.Request,
        lost: list[tuple[str, str]],
        refused: ApiError | None = None,
        embeddings: chat.Embeddings | None = None,
    ) -> None:
        self.request = request
        self.lost = lost
        self.refused = refused
        self.embeddings = embeddings

    def as_is(self, wire: str) -> str | None:
        """`wire` when the body can only pass through (it has what no other format
        carries, or could not be read at all): for `llm.serve`'s choice."""
        return wire if self.refused is not None or self.lost else None

    def refusal(self, provider: str) -> ApiError | None:
        if self.refused is not None:
            return self.refused
        if not self.lost:
            return None
        param, what = self.lost[0]
        return bad(param, f"{what} cannot be translated for the {provider} provider")

    def translated(self, provider: str, model: str) -> chat.Request:
        """The request for `provider` (and `model`, a fallback's) through the hub, or
        the 400 if it cannot be."""
        refusal = self.refusal(provider)
        if refusal is not None:
            raise refusal
        return chat.with_model(self.request, model)


def own_api(origin: str, *hosts: str) -> bool:
    """Whether a provider is the vendor's own API (one of `hosts`, or a subdomain of one
    given with a leading dot), not a server that speaks its protocol (llama.cpp's, vLLM,
    a proxy), which may not honour every field; `origin` is the provider's name and base
    URL, empty for the standard form."""
    if not origin:
        return True
    host = urlsplit(origin.partition(":")[2]).hostname or ""
    return any(host == h or (h.startswith(".") and host.endswith(h)) for h in hosts)


def json_object(data: str | bytes) -> dict[str, Any]:
    """A provider's JSON object, or the ProviderError for one that is not."""
    try:
        value = jsonio.loads(data)
    except ValueError:
        raise ProviderError("the provider sent an answer that is not JSON") from None
    if not isinstance(value, dict):
        raise ProviderError("the provider sent an answer that is not a JSON object")
    return value


def integer(value: Any) -> int:
    """A count as a provider sent it; anything but an integer counts 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def error_message(data: Any) -> str:
    """The human message inside an OpenAI or Anthropic error body, if there is one."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return ""
