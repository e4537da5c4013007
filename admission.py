"""Admission: what a request must pass between the router and the provider, and the
accounting on its way back up.

Down: the body is read (bounded in bytes and time) and validated, the model chosen
(403 if the key may not use it), the call's worst case reserved under the key's token
limit and budget (429), and a slot of MAX_INFLIGHT taken (503). What comes out is a
`Ticket`, which goes down with the call and back up: when the call ends it settles
the reservation with the provider's counts, adds the call to the key's usage, and
notes it for the access line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

import chat
from auth import AUTH, ApiKey
from config import Settings
from errors import ApiError
from quotas import RESERVATION, Hold
from requestlog import CALL
from usage import PriceTable, Usage, undated

T = TypeVar("T")
BodyT = TypeVar("BodyT", bound=BaseModel)

# A body of 20,000 bad items would otherwise be answered with 20,000 errors (4 MB).
MAX_LISTED_ERRORS = 20
# What a request without max_tokens may get (OpenAI then means the model's maximum).
UNSET_MAX_TOKENS = 131_072


class QuotaStore(Protocol):
    def applies(self, key: ApiKey) -> bool: ...

    async def reserve(self, key: ApiKey, tokens: int, cost: float) -> Hold: ...


class UsageStore(Protocol):
    def record(self, key: str, model: str, usage: Usage, cost: float | None) -> None: ...

    async def report(self, key: str) -> dict[str, Any]: ...

    def all(self) -> dict[str, dict[str, Any]]: ...


class Inflight:
    """A cap on provider calls in flight: past it a request is refused at once with
    503, rather than queued without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def take(self) -> None:
        """A slot, or 503 at once; `give` it back when the call ends."""
        if self.count >= self.limit:
            raise ApiError(
                503,
                "overloaded",
                f"{self.limit} provider calls are in flight; try again shortly",
                headers={"Retry-After": "1"},
            )
        self.count += 1

    def give(self) -> None:
        self.count -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.give()


def caller(request: Request) -> ApiKey | None:
    key: ApiKey | None = request.scope.get(AUTH)
    return key


def note(request: Request, **fields: object) -> None:
    """Add to what the access line and the metrics say of this request."""
    call = request.scope.get(CALL)
    if call is not None:
        call.update(fields)


def since_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is over {limit} bytes")


def invalid_body(exc: ValidationError) -> ApiError:
    """The 400 (not JSON) or 422 (not the schema) for a body pydantic refused; the
    list of problems is cut at MAX_LISTED_ERRORS, and the message says how many."""
    problems = exc.errors(include_url=False, include_input=False)
    for p in problems:
        if p["type"] == "json_invalid":
            # "number out of range at line 1 column 4329", "EOF while parsing...": what is
            # wrong, and where (a 5,000-digit integer is valid JSON that no parser takes).
            detail = str((p.get("ctx") or {}).get("error") or "")
            message = "the body is not valid JSON (UTF-8)" + (f": {detail}" if detail else "")
            return ApiError(400, "invalid_json", message)
    errors = [
        {"field": ".".join(str(part) for part in p["loc"]) or "body", "message": p["msg"]}
        for p in problems[:MAX_LISTED_ERRORS]
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    if len(problems) > 5:
        summary += f"; and {len(problems) - 5} more"
    return ApiError(422, "invalid_request", summary, errors=errors)


@dataclass
class Admission:
    """What admission needs, made once by `create_app`, in `app.state.admission`."""

    settings: Settings
    prices: PriceTable
    quotas: QuotaStore
    usage: UsageStore
    inflight: Inflight

    # --- the body -------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes MAX_BODY_BYTES, so a
        huge upload is never held in memory (a chunked one included), and with 408 when
        it takes longer than BODY_TIMEOUT_S, so a client trickling bytes cannot hold a
        worker. 415 unless it is JSON."""
        if not _is_json(request.headers.get("content-type", "")):
            raise ApiError(
                415,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            )
        limit, timeout_s = self.settings.max_body_bytes, self.settings.body_timeout_s
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        # receive() itself rather than Request.stream(): an async generator costs a
        # registration with the loop and more frames, for what is one message most times.
        receive = request.receive
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        raise ClientDisconnect()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise ApiError(
                408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s"
            ) from None
        return b"".join(chunks)

    async def parse(self, request: Request, model: type[BodyT]) -> BodyT:
        """The JSON body as `model`: 415, 413, 408, 400 or 422 in the contract's shape."""
        return self.validate(await self.read_body(request), model)

    @staticmethod
    def validate(raw: bytes, model: type[BodyT]) -> BodyT:
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise invalid_body(exc) from None

    # --- the model, the reservation, the slot ---------------------------------------

    def allowed_models(self, key: ApiKey | None) -> tuple[str, ...]:
        """`LLM_MODELS`, narrowed by the key's own allowlist; the default model first."""
        models = self.settings.models
        if key is None or key.models is None:
            return models
        return tuple(m for m in models if m in key.models)

    def choose_model(self, request: Request, asked: str | None) -> str:
        allowed = self.allowed_models(caller(request))
        if asked is None:
            # The default model, or the first this key may use.
            default = self.settings.model
            asked = default if default in allowed or not allowed else allowed[0]
        if asked not in allowed:
            if asked not in self.settings.models:  # as OpenAI and Anthropic answer: 404
                raise ApiError(
                    404,
                    "model_not_found",
                    f"The model {asked[:200]!r} does not exist",
                    param="model",
                )
            raise ApiError(403, "model_not_allowed", f"model {asked!r} is not allowed for this key")
        return asked

    async def admit(self, request: Request, call: chat.Request) -> Ticket:
        """Reserve the call's worst case, its input estimate plus its max tokens, under
        the key's token limit and budget (429 when it does not fit), before any
        provider call."""
        key = caller(request)
        ticket = Ticket(self, request, call)
        note(request, call=call)  # for a trace's span (tracing.py); never logged as a whole
        if key is not None and self.quotas.applies(key):
            input_tokens = chat.input_estimate(call)
            most = (call.max_tokens or UNSET_MAX_TOKENS) * call.choices  # every answer's
            price = self.prices.price(call.model) or self.prices.price(
                self.settings.upstream_names.get(call.model, call.model)
            )
            cost = (
                0.0 if price is None else (input_tokens * price.input + most * price.output) / 1e6
            )
            request.scope[RESERVATION] = await self.quotas.reserve(key, input_tokens + most, cost)
        return ticket

    async def call(self, request: Request, awaitable: Awaitable[T]) -> T:
        """A provider call, holding a slot of MAX_INFLIGHT while it runs (503 when none is
        free), and dropped if the client leaves (`ClientDisconnect`)."""
        with self.inflight.slot():
            return await unless_disconnected(request.receive, awaitable)


def of(request: Request) -> Admission:
    admission: Admission = request.app.state.admission
    return admission


class OutputCap:
    """A stream that runs on past its request's `max_tokens` is stopped, not relayed
    until the client leaves. Every delta a provider streams carries a token or more,
    and hardly any token is over 32 characters, so an honest stream stays under both
    counts; an endless one passes one of them and ends as `length`."""

    __slots__ = ("chars", "deltas", "max_chars", "max_deltas")

    def __init__(self, max_tokens: int | None, choices: int = 1) -> None:
        tokens = (max_tokens or UNSET_MAX_TOKENS) * choices
        self.max_deltas = 2 * tokens + 64
        self.max_chars = 32 * tokens + 1024
        self.deltas = 0
        self.chars = 0

    def admits(self, size: int) -> bool:
        """Count a delta of `size` characters, unless it would take the stream past the
        cap: then False (and the stream is to stop)."""
        if self.deltas >= self.max_deltas or self.chars + size > self.max_chars:
            return False
        self.deltas += 1
        self.chars += size
        return True


class Ticket:
    """One admitted call, down and back. It settles once: with the provider's counts
    when the call ends, or (`close`, for a stream cut short by an error or by the
    client leaving) with what was sent, since the provider bills that too (about a
    token a delta), and the input estimate."""

    def __init__(self, admission: Admission, request: Request, call: chat.Request) -> None:
        self.admission = admission
        self.request = request
        self.model = call.model
        self.call = call
        self.cap = OutputCap(call.max_tokens, call.choices)
        self.sent = 0  # deltas relayed so far
        self.settled = False
        # The model asked of the deployment serving the call (its upstream name): what
        # the call is priced as, whatever model the answer claims to be.
        self.upstream: str | None = None
        # The provider has the prompt: it answered, or the client left while it worked.
        self.accepted = False
        self.started = time.perf_counter()
        # The answer's text, only for a trace that records content.
        self.text: list[str] | None = [] if admission.settings.otel_capture_content else None

    def counts(self, delta: chat.Delta) -> bool:
        """Count a delta about to be relayed; False once the stream is past its cap."""
        size = len(delta.arguments) if isinstance(delta, chat.ToolCallDelta) else len(delta.text)
        if not self.passes(size):
            return False
        if self.text is not None and isinstance(delta, chat.TextDelta):
            self.text.append(delta.text)
        return True

    def passes(self, size: int) -> bool:
        """Count a delta of `size` characters (one `chat` has no word for, too: another
        choice's, a kind it does not read); False once the stream is past its cap, which
        is logged."""
        if not self.cap.admits(size):
            logging.getLogger("text_tool").warning(
                "the provider streamed past max_tokens; stream stopped",
                extra={"event": "max_tokens_enforced", "model": self.model, "deltas": self.sent},
            )
            return False
        self.sent += 1
        return True

    def settle(self, model: str, usage: Usage, finish_reason: str) -> float | None:
        """Price the call, settle its reservation, add it to the caller's usage and note
        it for the access line. The cost, or None when the model's price is unknown."""
        if self.settled:
            return None
        self.settled = True
        admission, request = self.admission, self.request
        # Priced as what was asked of the deployment (an answer naming a cheaper model
        # is not billed as one), else as the answer's model, else the caller's name.
        asked = self.upstream or model
        cost = None
        for name in dict.fromkeys((asked, model, self.model)):
            cost = admission.prices.cost(name, usage)
            if cost is not None:
                break
        if model != asked and undated(model) != undated(asked):  # a snapshot is the same model
            note(request, upstream_model=asked)
        reservation = request.scope.get(RESERVATION)
        if reservation is not None:
            reservation.settle(usage.input_tokens + usage.output_tokens, cost)
        key = caller(request)
        admission.usage.record(key.name if key else "anonymous", model, usage, cost)
        note(
            request,
            model=model,
            upstream=asked,
            usage=usage,  # the whole counts, for the ledger's row
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=cost,
            finish_reason=finish_reason,
            provider_ms=since_ms(self.started),
        )
        if self.text:  # none from an answer passed through whole
            note(request, output_text="".join(self.text))
        return cost

    def finish(self, completion: chat.Completion) -> float | None:
        """`settle` for a whole answer."""
        if self.text is not None:
            self.text.append(completion.text)
        return self.settle(completion.model, completion.usage, completion.finish_reason)

    def close(self) -> None:
        """A call cut short (an error, the client leaving): settled with what was sent
        and the prompt, which the provider bills once it has accepted the call; a call
        it never accepted costs nothing."""
        if not self.settled and (self.sent or self.accepted):
            self.settle(self.model, self.estimate(self.sent), "interrupted")

    def left(self) -> None:
        """The client left before the answer began: the provider has the prompt."""
        self.accepted = True
        self.close()

    def estimate(self, output_tokens: int) -> Usage:
        """Counts for a provider that reported none: the input estimated, the output as
        counted (about a token a delta)."""
        return Usage(
            input_tokens=chat.input_estimate(self.call),
            output_tokens=output_tokens,
            estimated=True,
        )


# --- the client leaving ------------------------------------------------------------------

# A client that leaves in the first tenth of a second of a call is noticed then: with a
# shorter wait, many calls of a busy server each made a watcher task that had nothing
# to do (bench/README.md).
WATCH_AFTER_S = 0.1


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await a provider call, but drop it the moment the client goes away (raising
    `ClientDisconnect`): nobody pays for tokens nobody reads.

    The call runs in the request's own task; from WATCH_AFTER_S on, one small task
    waits for the disconnect and cancels it. A call answered sooner never needs that
    task, and making it was a few percent of a fast request's CPU time in the
    benchmark's profile."""
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    left = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal left
        await _disconnected(receive)
        left = True
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.get_running_loop().create_task(watch())

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, start_watching)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        # Ours only if no one else asked to cancel this task meanwhile (as in asyncio.timeout).
        if left and task.uncancel() <= cancelling:
            raise ClientDisconnect() from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
    if left:
        task.uncancel()  # the call ended as the client left, and swallowed our cancel
    return result
