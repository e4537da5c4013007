"""The HTTP service: `create_app()`, the route functions and the error handlers.

Run it with `uvicorn server:app`; embed it with `Mount("/llm", app=create_app())`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_json
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

import llm
from auth import AUTH, ApiKey, AuthMiddleware, KeyRing
from config import Settings, SettingsError
from errors import ApiError, api_error_response, error_body, error_response, request_id
from logs import get_logger
from ratelimit import Limiter, MemoryLimiter, RateLimitMiddleware
from requestlog import CALL, RequestContextMiddleware
from usage import PriceTable, Usage, UsageBook

T = TypeVar("T")
BodyT = TypeVar("BodyT", bound=BaseModel)


class CompleteBody(BaseModel):
    """The body of POST /complete and POST /stream."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=20000)
    max_tokens: int = Field(512, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    model: str | None = Field(None, min_length=1, max_length=200)
    system: str | None = Field(None, max_length=20000)


@dataclass
class Service:
    """What the routes share, kept in `app.state.service`."""

    settings: Settings
    provider: llm.Provider
    client: llm.SharedClient
    prices: PriceTable
    keys: KeyRing
    limiter: Limiter
    usage: UsageBook
    logger: logging.Logger
    ready: bool = True


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


# --- request bodies ------------------------------------------------------------------


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, so a huge
    upload is never held in memory (a chunked one included)."""
    too_large = ApiError(413, "body_too_large", f"request body is over {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[BodyT], limit: int) -> BodyT:
    if not _is_json(request.headers.get("content-type", "")):
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        )
    raw = await read_body(request, limit)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(400, "invalid_json", "the body is not valid JSON (UTF-8)") from None
        errors = [
            {"field": ".".join(str(part) for part in p["loc"]) or "body", "message": p["msg"]}
            for p in problems
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise ApiError(422, "invalid_request", summary, errors=errors) from None


def caller(request: Request) -> ApiKey | None:
    key: ApiKey | None = request.scope.get(AUTH)
    return key


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


def chat_request(request: Request, body: CompleteBody) -> llm.ChatRequest:
    model = choose_model(request, body.model)
    return llm.ChatRequest(
        model=model,
        messages=(llm.Message("user", body.prompt),),
        system=body.system,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        request_id=request_id(request.scope),
    )


# --- client disconnects ----------------------------------------------------------------


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
    """Await a provider call, but drop it the moment the client goes away: nobody pays
    for tokens nobody reads. Returns (False, None) when the client left."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        return False, None
    return True, work.result()


# --- accounting ---------------------------------------------------------------------------


def account(request: Request, model: str, usage: Usage, finish_reason: str) -> float | None:
    """Price the call, add it to the caller's usage and note it for the access log."""
    svc = service(request)
    cost = svc.prices.cost(model, usage)
    key = caller(request)
    svc.usage.record(key.name if key else "anonymous", model, usage, cost)
    call = request.scope.get(CALL)
    if call is not None:
        call.update(
            model=model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=cost,
            finish_reason=finish_reason,
        )
    return cost


# --- routes ---------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    if not service(request).ready:
        return error_response(request.scope, 503, "not_ready", "the service is shutting down")
    return JSONResponse({"status": "ready"})


async def usage(request: Request) -> Response:
    key = caller(request)
    return JSONResponse(service(request).usage.report(key.name if key else "anonymous"))


async def complete(request: Request) -> Response:
    svc = service(request)
    body = await parse_body(request, CompleteBody, svc.settings.max_body_bytes)
    chat = chat_request(request, body)
    stayed, result = await unless_disconnected(request, svc.provider.complete(chat))
    if not stayed or result is None:
        return Response(status_code=499)
    cost = account(request, result.model, result.usage, result.finish_reason)
    return JSONResponse(
        {
            "id": result.id,
            "text": result.text,
            "model": result.model,
            "finish_reason": result.finish_reason,
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "cost_usd": cost,
        }
    )


_DONE = b"data: [DONE]\n\n"


def sse_frame(data: Mapping[str, Any], event: str | None = None) -> bytes:
    """One SSE event whose data is one line of JSON: newlines in text stay escaped."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + to_json(data) + b"\n\n"


async def stream(request: Request) -> Response:
    svc = service(request)
    body = await parse_body(request, CompleteBody, svc.settings.max_body_bytes)
    chat = chat_request(request, body)
    events = svc.provider.stream(chat)
    # Wait for the first token before answering, so that a provider failing up to
    # then gets a real HTTP error instead of a 200 stream with an error inside.
    stayed, first = await unless_disconnected(request, anext(events))
    if not stayed or first is None:
        await events.aclose()
        return Response(status_code=499)
    return EventSourceResponse(
        _sse_body(request, chat, first, events),
        headers={"Cache-Control": "no-cache"},
        ping=svc.settings.ping_interval_s,
        ping_message_factory=lambda: ServerSentEvent(comment="ping"),
        sep="\n",
    )


async def _sse_body(
    request: Request,
    chat: llm.ChatRequest,
    first: str | llm.StreamEnd,
    events: AsyncGenerator[str | llm.StreamEnd, None],
) -> AsyncIterator[bytes]:
    item = first
    sent = 0
    ended = False
    try:
        while True:
            if isinstance(item, llm.StreamEnd):
                ended = True
                cost = account(request, item.model, item.usage, item.finish_reason)
                yield sse_frame(
                    {
                        "id": item.id,
                        "model": item.model,
                        "finish_reason": item.finish_reason,
                        "input_tokens": item.usage.input_tokens,
                        "output_tokens": item.usage.output_tokens,
                        "cost_usd": cost,
                    },
                    event="usage",
                )
                yield _DONE
                return
            yield sse_frame({"text": item})
            sent += 1
            item = await anext(events)
    except llm.ProviderError as exc:
        error = provider_api_error(exc)
        request.scope[CALL]["error"] = error.type
        yield sse_frame(error_body(error.type, error.message, request_id(request.scope)), "error")
    finally:
        await events.aclose()
        if not ended:
            # Cut short (an error, or the client left): the provider billed what it
            # sent, about a token a chunk, so the caller's usage counts that.
            prompt = (chat.system or "") + "".join(m.content for m in chat.messages)
            estimate = Usage(
                input_tokens=llm.estimate_tokens(prompt), output_tokens=sent, estimated=True
            )
            account(request, chat.model, estimate, "interrupted")


# --- errors ---------------------------------------------------------------------------------


def provider_api_error(exc: llm.ProviderError) -> ApiError:
    """The one place where provider failures become HTTP answers."""
    if isinstance(exc, llm.ProviderTimeout):
        return ApiError(504, "upstream_timeout", str(exc))
    if isinstance(exc, llm.ProviderRateLimited):
        retry = max(1, int(-(-(exc.retry_after_s or 1) // 1)))
        return ApiError(429, "rate_limit_exceeded", str(exc), headers={"Retry-After": str(retry)})
    if isinstance(exc, llm.ProviderBadRequest):
        return ApiError(400, "invalid_request", str(exc))
    return ApiError(502, "upstream_error", str(exc))


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return api_error_response(request.scope, exc)


async def on_provider_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, llm.ProviderError)
    error = provider_api_error(exc)
    request.scope[CALL]["error"] = error.type
    return api_error_response(request.scope, error)


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
    message = {404: "no such route", 405: f"{request.method} is not allowed here"}.get(
        exc.status_code, str(exc.detail)
    )
    return error_response(request.scope, exc.status_code, type_, message, headers=exc.headers)


# --- the app ----------------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> Starlette:
    """The service as an ASGI app. `settings` default to the environment; `transport`
    replaces the network under the shared httpx client (tests use it)."""
    settings = settings if settings is not None else Settings.from_env()
    logger = get_logger()
    client = llm.SharedClient(settings, transport)
    svc = Service(
        settings=settings,
        provider=llm.make_provider(settings, client),
        client=client,
        prices=_prices(settings),
        keys=KeyRing.from_settings(settings),
        limiter=MemoryLimiter(),
        usage=UsageBook(),
        logger=logger,
    )
    _announce(svc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        svc.ready = True
        try:
            yield
        finally:
            svc.ready = False
            await client.aclose()
            logger.info("usage totals", extra={"event": "usage_totals", "keys": svc.usage.all()})

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/complete", complete, methods=["POST"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/usage", usage, methods=["GET"]),
        ],
        middleware=[
            Middleware(RequestContextMiddleware, logger=logger),
            Middleware(AuthMiddleware, keys=svc.keys),
            Middleware(RateLimitMiddleware, limiter=svc.limiter, default_rate=settings.rate_limit),
        ],
        exception_handlers={
            ApiError: on_api_error,
            llm.ProviderError: on_provider_error,
            HTTPException: on_http_exception,
        },
        lifespan=lifespan,
    )
    app.state.service = svc
    return app


def _prices(settings: Settings) -> PriceTable:
    try:
        return PriceTable.from_file(settings.prices_file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SettingsError(f"PRICES_FILE: cannot use {settings.prices_file}: {exc}") from None


def _announce(svc: Service) -> None:
    settings, logger = svc.settings, svc.logger
    fields = {
        "event": "start",
        "provider": settings.provider,
        "models": list(settings.models),
        "keys": len(svc.keys),
        "rate_limit": str(settings.rate_limit),
    }
    if not len(svc.keys):
        logger.warning(
            "no API keys configured (API_KEYS, API_KEYS_FILE): every protected route answers 401",
            extra={"event": "no_keys"},
        )
    if settings.provider == "echo":
        logger.warning(
            "LLM_PROVIDER is echo: answers repeat the prompt; set OPENAI_API_KEY or "
            "ANTHROPIC_API_KEY (or LLM_PROVIDER) for a real model",
            extra=fields,
        )
    else:
        logger.info("text-tool ready", extra=fields)


def _app_from_environment() -> Starlette:
    try:
        return create_app()
    except SettingsError as exc:
        print(f"text-tool: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = _app_from_environment()
