"""The HTTP service: `create_app()`, the core routes and the error handlers.

Run it with `uvicorn server:app`; embed it with `Mount("/llm", app=create_app())`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import llm
import openai_compat
import openapi
from auth import AuthMiddleware, KeyRing
from config import Settings, SettingsError
from errors import ApiError, api_error_response, error_response, provider_api_error, request_id
from jsonio import JSONResponse
from logs import get_logger
from metrics import Metrics, metrics_route
from quotas import Quotas
from ratelimit import (
    Limiter,
    MemoryLimiter,
    RateLimitMiddleware,
    StoreBusy,
    StoreUnavailable,
    store_error_response,
)
from redis_store import RedisLimiter, RedisQuotas, RedisUsage, SharedStore
from requestlog import CALL, RequestContextMiddleware
from service import (
    Inflight,
    JsonInt,
    QuotaStore,
    Service,
    StreamMeter,
    UsageStore,
    account,
    caller,
    choose_model,
    note,
    parse_body,
    prompt_estimate,
    provider_call,
    reserve,
    route,
    service,
    since_ms,
)
from streaming import DONE, open_sse, sse_frame
from usage import PriceTable, UsageBook

if TYPE_CHECKING:
    import httpx


class CompleteBody(BaseModel):
    """The body of POST /complete and POST /stream."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=20000)
    max_tokens: JsonInt = Field(512, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    model: str | None = Field(None, min_length=1, max_length=200)
    system: str | None = Field(None, max_length=20000)


class StreamText(BaseModel):
    """One `data:` event of POST /stream."""

    text: str


class StreamUsage(BaseModel):
    """The `event: usage` of POST /stream."""

    id: str
    model: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


class CompleteResponse(BaseModel):
    id: str
    text: str
    model: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


async def chat_request(request: Request, body: CompleteBody) -> llm.ChatRequest:
    chat = llm.ChatRequest(
        model=choose_model(request, body.model),
        messages=(llm.Message("user", body.prompt),),
        system=body.system,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        request_id=request_id(request.scope),
    )
    await reserve(request, chat.model, prompt_estimate(chat), chat.max_tokens)
    return chat


# --- routes ---------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    svc = service(request)
    if not svc.ready or svc.draining.shutting_down():
        return error_response(request.scope, 503, "not_ready", "the service is shutting down")
    store = "memory"
    if svc.store is not None:
        store = "redis" if svc.store.healthy else "redis unreachable"
        if not svc.store.healthy and not svc.store.fail_open:
            return error_response(
                request.scope, 503, "store_unavailable", "the rate-limit store is unreachable"
            )
    return JSONResponse({"status": "ready", "rate_limit_store": store})


async def usage(request: Request) -> Response:
    key = caller(request)
    return JSONResponse(await service(request).usage.report(key.name if key else "anonymous"))


async def complete(request: Request) -> Response:
    chat = await chat_request(request, await parse_body(request, CompleteBody))
    started = time.perf_counter()
    stayed, result = await provider_call(request, lambda: service(request).provider.complete(chat))
    if not stayed or result is None:
        return Response(status_code=499)
    note(request, provider_ms=since_ms(started))
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


async def stream(request: Request) -> Response:
    chat = await chat_request(request, await parse_body(request, CompleteBody))
    return await open_sse(request, _frames(request, chat))


async def _frames(request: Request, chat: llm.ChatRequest) -> AsyncGenerator[bytes, None]:
    events = service(request).provider.stream(chat)
    meter = StreamMeter(request, chat.model, lambda: prompt_estimate(chat))
    try:
        async for item in events:
            if isinstance(item, llm.StreamEnd):
                cost = meter.settle(item.model, item.usage, item.finish_reason)
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
                yield DONE
                return
            yield sse_frame({"text": item})
            meter.sent += 1
    finally:
        await events.aclose()
        meter.close()


# --- errors ---------------------------------------------------------------------------------


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return api_error_response(request.scope, exc)


async def on_provider_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, llm.ProviderError)
    error = provider_api_error(exc)
    request.scope[CALL]["error"] = error.type
    return api_error_response(request.scope, error)


async def on_store_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreUnavailable | StoreBusy)
    return store_error_response(request.scope, exc)


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
    logger = get_logger(settings.log_format)
    client = llm.SharedClient(settings, transport)
    keys = KeyRing.from_settings(settings)
    limiter, quotas, usage_store, store = _stores(settings, logger)
    svc = Service(
        settings=settings,
        provider=llm.make_provider(settings, client),
        client=client,
        prices=_prices(settings),
        keys=keys,
        limiter=limiter,
        store=store,
        usage=usage_store,
        metrics=Metrics(models=settings.models, keys=keys.names()),
        inflight=Inflight(settings.max_inflight),
        quotas=quotas,
        logger=logger,
    )
    if store is not None:
        svc.metrics.store_up.set_function(lambda: 1.0 if store.healthy else 0.0)
    _announce(svc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owns_process = getattr(app.state, "owns_process", False)
        if owns_process:
            tune_gc()
            tune_logging()
            survive_sighup(logger)
        svc.ready = True
        try:
            yield
        finally:
            if owns_process:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            svc.ready = False
            await client.aclose()
            if store is not None:
                await store.aclose()
            logger.info("usage totals", extra={"event": "usage_totals", "keys": svc.usage.all()})

    # The router tries routes in order: the provider calls come first.
    routes = [
        route("/complete", complete, "POST"),
        route("/stream", stream, "POST"),
        *openai_compat.routes,
        route("/health", health, "GET"),
        route("/ready", ready, "GET"),
        route("/usage", usage, "GET"),
        route("/metrics", metrics_route, "GET"),
        *openapi.routes(
            [
                CompleteBody,
                CompleteResponse,
                StreamText,
                StreamUsage,
                openai_compat.ChatCompletionBody,
            ]
        ),
    ]
    known_paths = frozenset(r.path for r in routes if isinstance(r, Route))
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                RequestContextMiddleware,
                logger=logger,
                metrics=svc.metrics,
                known_paths=known_paths,
            ),
            Middleware(AuthMiddleware, keys=svc.keys),
            Middleware(RateLimitMiddleware, limiter=svc.limiter, default_rate=settings.rate_limit),
        ],
        exception_handlers={
            ApiError: on_api_error,
            llm.ProviderError: on_provider_error,
            HTTPException: on_http_exception,
            StoreUnavailable: on_store_error,
            StoreBusy: on_store_error,
        },
        lifespan=lifespan,
    )
    app.state.service = svc
    return app


def _stores(
    settings: Settings, logger: logging.Logger
) -> tuple[Limiter, QuotaStore, UsageStore, SharedStore | None]:
    """Limits, quotas and usage in this process's memory, or shared through Redis."""
    limiter, quotas = MemoryLimiter(), Quotas(default_token_limit=settings.token_limit)
    usage_book = UsageBook()
    if settings.rate_limit_store == "memory":
        return limiter, quotas, usage_book, None
    store = SharedStore(
        settings.rate_limit_store,
        fail_open=settings.rate_limit_store_fail == "open",
        logger=logger,
    )
    return (
        RedisLimiter(store, limiter),
        RedisQuotas(store, quotas),
        RedisUsage(store, usage_book),
        store,
    )


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
        why = "no provider key is set" if settings.provider_was_defaulted else "LLM_PROVIDER=echo"
        logger.warning(
            f"{why}, so the provider is echo: answers repeat the prompt; set "
            "OPENAI_API_KEY or ANTHROPIC_API_KEY (or LLM_PROVIDER) for a real model",
            extra=fields,
        )
    else:
        logger.info("text-tool ready", extra=fields)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a server that owns its process.

    Measured under load (bench/README.md): with Python's default thresholds a collection
    ran about every 700 allocations, and each full one walked every object imported at
    start, together about a sixth of the CPU time of a request. Objects made at start
    are frozen out of collections. With 2,000 calls in flight for a second each, every
    object of a request outlives a young collection, and collections of the middle
    generation (every 20 young ones) walked all of them: 15% of the CPU time. Young
    collections now run every 20,000 allocations and older ones every 50 of those,
    by when most of a request's objects have been freed by reference counting.
    Only for the app served as `server:app`: one that mounts `create_app()` keeps
    its own settings."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


def survive_sighup(logger: logging.Logger) -> None:
    """SIGHUP's default is to end the process at once, streams cut with no final event
    and no usage totals written; a closed terminal or a careless `kill -HUP` sends it.
    Here it is logged, and the service goes on."""

    def hangup() -> None:
        logger.warning("SIGHUP received; the service goes on", extra={"event": "sighup"})

    # Not where signals cannot be handled (another thread's loop, or Windows).
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)


def tune_logging() -> None:
    """Log records skip the thread and process names, which no line of ours shows
    (logging's documented switches for this)."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _app_from_environment() -> Starlette:
    # Served by uvicorn: our access log is the one source of truth, uvicorn's is off.
    logging.getLogger("uvicorn.access").disabled = True
    try:
        app = create_app()
    except SettingsError as exc:
        print(f"text-tool: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # Its lifespan tunes the process, which it owns when served; an app that imports
    # this module but serves its own create_app() does not run it.
    app.state.owns_process = True
    return app


app = _app_from_environment()
