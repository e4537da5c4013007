"""What every route shares: the app's `Service`, the caller, body parsing, the model
choice, accounting, and giving up on a provider call when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import BaseModel, BeforeValidator, ValidationError
from sse_starlette.sse import AppStatus
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import llm
from auth import AUTH, ApiKey, KeyRing
from config import Settings
from errors import ApiError
from metrics import Metrics
from quotas import RESERVATION, Hold
from ratelimit import Limiter
from requestlog import CALL
from timers import CoarseTimers
from usage import PriceTable, Usage

T = TypeVar("T")
BodyT = TypeVar("BodyT", bound=BaseModel)


def integral(value: Any) -> Any:
    """JSON Schema counts 80.0 as an integer; strict pydantic would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(integral)]


class Inflight:
    """A cap on provider calls in flight: past it a request is refused at once with
    503, rather than queued without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.count >= self.limit:
            raise ApiError(
                503,
                "overloaded",
                f"{self.limit} provider calls are in flight; try again shortly",
                headers={"Retry-After": "1"},
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


class Drainable(Protocol):
    def drain(self) -> None: ...


class Draining:
    """Server shutdown, as the open streams learn of it. sse-starlette hooks uvicorn's
    signal handler to set `AppStatus.should_exit`; one task per app looks at it four
    times a second while streams are open, and tells each stream to start its grace."""

    POLL_S = 0.25

    def __init__(self) -> None:
        self._streams: set[Drainable] = set()
        self._poller: asyncio.Task[None] | None = None

    @staticmethod
    def shutting_down() -> bool:
        return AppStatus.should_exit

    def add(self, stream: Drainable) -> None:
        self._streams.add(stream)
        if self.shutting_down():
            stream.drain()
        elif self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def discard(self, stream: Drainable) -> None:
        self._streams.discard(stream)

    async def _poll(self) -> None:
        while self._streams:
            if self.shutting_down():
                for stream in list(self._streams):
                    stream.drain()
                return
            await asyncio.sleep(self.POLL_S)


class QuotaStore(Protocol):
    def applies(self, key: ApiKey) -> bool: ...

    async def reserve(self, key: ApiKey, tokens: int, cost: float) -> Hold: ...


class UsageStore(Protocol):
    def record(self, key: str, model: str, usage: Usage, cost: float | None) -> None: ...

    async def report(self, key: str) -> dict[str, Any]: ...

    def all(self) -> dict[str, dict[str, Any]]: ...


class SharedStoreLike(Protocol):
    fail_open: bool

    @property
    def healthy(self) -> bool: ...

    async def aclose(self) -> None: ...


@dataclass
class Service:
    """What the routes share, kept in `app.state.service`."""

    settings: Settings
    provider: llm.Provider
    client: llm.SharedClient
    prices: PriceTable
    keys: KeyRing
    limiter: Limiter
    usage: UsageStore
    metrics: Metrics
    inflight: Inflight
    quotas: QuotaStore
    logger: logging.Logger
    store: SharedStoreLike | None = None  # the Redis shared by replicas, if any
    ready: bool = True
    draining: Draining = field(default_factory=Draining)
    timers: CoarseTimers = field(default_factory=CoarseTimers)


SERVICE = "text_tool.service"


def service(request: Request) -> Service:
    """The app's `Service`, looked up once a request: a route and its helpers ask for it
    half a dozen times, and `app.state` is an attribute lookup through Python code."""
    scope = request.scope
    svc: Service | None = scope.get(SERVICE)
    if svc is None:
        svc = scope[SERVICE] = request.app.state.service
    return svc


class Endpoint:
    """A route function as a plain ASGI app. Starlette's adapter for functions wraps
    every call in one more exception-handling layer (a closure and a `send` wrapper a
    request), which the app's own ExceptionMiddleware already is."""

    def __init__(self, func: Callable[[Request], Awaitable[Response]]) -> None:
        self.func = func

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.func(Request(scope, receive, send))
        await response(scope, receive, send)


def route(path: str, func: Callable[[Request], Awaitable[Response]], method: str) -> Route:
    return Route(path, Endpoint(func), methods=[method], name=func.__name__)


def caller(request: Request) -> ApiKey | None:
    key: ApiKey | None = request.scope.get(AUTH)
    return key


# --- request bodies ------------------------------------------------------------------


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is over {limit} bytes")


async def read_body(request: Request, limit: int, timeout_s: float, timers: CoarseTimers) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, so a huge
    upload is never held in memory (a chunked one included), and with 408 when it takes
    longer than `timeout_s`, so a client trickling bytes cannot hold a worker."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    # receive() itself rather than Request.stream(): an async generator costs a
    # registration with the loop and more frames, for what is one message most times.
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    try:
        with timers.timeout(timeout_s):
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


async def parse_body(request: Request, model: type[BodyT]) -> BodyT:
    """The JSON body as `model`: 415, 413, 400 or 422 in the contract's shape otherwise."""
    if not _is_json(request.headers.get("content-type", "")):
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        )
    svc = service(request)
    settings = svc.settings
    raw = await read_body(request, settings.max_body_bytes, settings.body_timeout_s, svc.timers)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_body(exc) from None


# A body of 20,000 bad items would otherwise be answered with 20,000 errors (4 MB).
MAX_LISTED_ERRORS = 20


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


# --- models -------------------------------------------------------------------------


def allowed_models(settings: Settings, key: ApiKey | None) -> tuple[str, ...]:
    """`LLM_MODELS`, narrowed by the key's own allowlist; the default model first."""
    if key is None or key.models is None:
        return settings.models
    return tuple(m for m in settings.models if m in key.models)


def choose_model(request: Request, asked: str | None) -> str:
    settings = service(request).settings
    allowed = allowed_models(settings, caller(request))
    if asked is None:
        # The default model, or the first this key may use.
        asked = settings.model if settings.model in allowed or not allowed else allowed[0]
    if asked not in allowed:
        raise ApiError(403, "model_not_allowed", f"model {asked!r} is not allowed for this key")
    return asked


# --- accounting -----------------------------------------------------------------------


def note(request: Request, **fields: object) -> None:
    """Add to what the access log line and the metrics say of this request."""
    call = request.scope.get(CALL)
    if call is not None:
        call.update(fields)


def since_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


async def reserve(request: Request, model: str, input_tokens: int, max_tokens: int) -> None:
    """Admit the call's worst case under the key's token limit and budget (429 when it
    does not fit), before any provider call; `account` settles it."""
    svc, key = service(request), caller(request)
    if key is None or not svc.quotas.applies(key):
        return
    price = svc.prices.price(model)
    cost = 0.0 if price is None else (input_tokens * price.input + max_tokens * price.output) / 1e6
    request.scope[RESERVATION] = await svc.quotas.reserve(key, input_tokens + max_tokens, cost)


def account(request: Request, model: str, usage: Usage, finish_reason: str) -> float | None:
    """Price the call, settle its reservation, add it to the caller's usage and note it
    for the access log."""
    svc = service(request)
    cost = svc.prices.cost(model, usage)
    reservation = request.scope.get(RESERVATION)
    if reservation is not None:
        reservation.settle(usage.input_tokens + usage.output_tokens, cost)
    key = caller(request)
    svc.usage.record(key.name if key else "anonymous", model, usage, cost)
    note(
        request,
        model=model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=cost,
        finish_reason=finish_reason,
    )
    return cost


def prompt_estimate(chat: llm.ChatRequest) -> int:
    return llm.estimate_tokens((chat.system or "") + "".join(m.content for m in chat.messages))


class StreamMeter:
    """A stream's accounting: settled with the provider's own counts when it ends or,
    when it is cut short (an error, or the client left), with what was sent, since
    the provider bills that too (about a token a chunk), and an estimate of the prompt."""

    def __init__(self, request: Request, model: str, prompt_tokens: Callable[[], int]) -> None:
        self.request = request
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.sent = 0
        self.settled = False
        self.started = time.perf_counter()

    def settle(self, model: str, usage: Usage, finish_reason: str) -> float | None:
        self.settled = True
        note(self.request, provider_ms=since_ms(self.started))
        return account(self.request, model, usage, finish_reason)

    def close(self) -> None:
        if not self.settled and self.sent:
            estimate = Usage(
                input_tokens=self.prompt_tokens(), output_tokens=self.sent, estimated=True
            )
            self.settle(self.model, estimate, "interrupted")


# --- client disconnects ---------------------------------------------------------------


# A client that leaves in the first tenth of a second of a call is noticed then: a
# shorter wait left a third of the calls of a busy server (answered in ~30 ms) each
# making a watcher task that had nothing to do.
WATCH_AFTER_S = 0.1


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def provider_call(
    request: Request, call: Callable[[], Awaitable[T]]
) -> tuple[bool, T | None]:
    """`call()`, holding a slot of MAX_INFLIGHT while it runs (503 when none is free),
    and dropped if the client leaves (see `unless_disconnected`)."""
    svc = service(request)
    with svc.inflight.slot():
        return await unless_disconnected(request, call(), svc.timers)


async def unless_disconnected(
    request: Request, awaitable: Awaitable[T], timers: CoarseTimers
) -> tuple[bool, T | None]:
    """Await a provider call, but drop it the moment the client goes away: nobody pays
    for tokens nobody reads. Returns (False, None) when the client left.

    The call runs in the request's own task; from WATCH_AFTER_S on (at the resolution
    of `timers`), one small task waits for the disconnect and cancels it. A call
    answered sooner never needs that task, and making it was a few percent of a fast
    request's CPU time in the benchmark's profile."""
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    left = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal left
        await _disconnected(request.receive)
        left = True
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.get_running_loop().create_task(watch())

    timer = timers.call_later(WATCH_AFTER_S, start_watching)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        # Ours only if no one else asked to cancel this task meanwhile (as in asyncio.timeout).
        if left and task.uncancel() <= cancelling:
            return False, None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
    if left:
        task.uncancel()  # the call ended as the client left, and swallowed our cancel
    return True, result
