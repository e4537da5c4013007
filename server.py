"""The HTTP service: `create_app()` puts the stages together (middleware order, route
table, error handlers, lifespan); every model route is one line of the table, its
client format (a dialect) and its operation, served by gateway.py.

Run it with `python server.py` (or the `text-tool` script), which starts uvicorn with
what the service needs (`main`); embed it with `Mount("/llm", app=create_app())`.
`server:app` is made from the environment when first asked for, so importing this
module for `create_app` changes nothing in the host's process.

A request meets, in this order: protocol.py (the connection), requestlog.py,
redaction.py, CORS (with CORS_ORIGINS), auth.py, ratelimit.py (the window, then the
key's slots for calls in flight), tracing.py (with traces on), the router, then
gateway.py: a dialect decodes the body, admission.py admits it, deployments.py picks
the provider, llm.py calls it, the dialect encodes the answer (sse.py streams it), and
the ticket of admission.py accounts for it on the way back.

Departures from Starlette's and uvicorn's ordinary use, each for a measured reason
(bench/README.md, "Why the departures"):
- `Endpoint` runs a route function as a plain ASGI app, rather than Starlette's
  function adapter, which wraps every call in one more exception-handling layer that
  the app's own ExceptionMiddleware already is;
- `tune_gc` sets the garbage collector's thresholds for a server that owns its process;
- `python server.py` runs uvicorn with our own protocol class (protocol.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

import admission
import dashboard
import openapi
import sse
import stored
from admission import Admission, Inflight, QuotaStore, UsageStore, caller
from auth import AuthMiddleware, KeyRing
from config import Settings, SettingsError
from deployments import Deployments, make_deployments
from dialects import (
    Dialect,
    anthropic_messages,
    openai_chat,
    openai_embeddings,
    openai_responses,
    ours,
)
from errors import (
    ApiError,
    ProviderError,
    api_error_response,
    error_response,
    provider_api_error,
    relative_path,
    shape_of,
)
from gateway import Gateway
from jsonio import JSONResponse
from logs import get_logger
from metrics import Metrics
from openapi import RouteFunction
from quotas import Quotas
from ratelimit import (
    ConcurrencyMiddleware,
    Limiter,
    MemoryLimiter,
    MemorySlots,
    RateLimitMiddleware,
    Slots,
    StoreBusy,
    StoreUnavailable,
    store_error_response,
)
from redaction import RedactionMiddleware, Redactor
from redis_store import RedisLimiter, RedisQuotas, RedisSlots, RedisUsage, SharedStore
from requestlog import CALL, RequestContextMiddleware
from store import Ledger, StoreError
from store import backend as ledger_backend
from upstream import SharedClient
from usage import PriceTable, UsageBook

if TYPE_CHECKING:
    import httpx


class Endpoint:
    """The route functions of one path, by method, as a plain ASGI app. Starlette's
    adapter for functions wraps every call in one more exception-handling layer (a
    closure and a `send` wrapper a request), which the app's own ExceptionMiddleware
    already is; and one route for all of a path's methods makes a 405 list them all."""

    def __init__(self, funcs: dict[str, RouteFunction]) -> None:
        self.funcs = funcs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        func = self.funcs.get(method) or self.funcs["GET"]  # HEAD: GET's, as Starlette does
        response = await func(Request(scope, receive, send))
        await response(scope, receive, send)


def routes_of(table: list[tuple[str, RouteFunction, str]]) -> list[Route]:
    """One route a path, in the order the table first names it."""
    by_path: dict[str, dict[str, RouteFunction]] = {}
    for path, func, method in table:
        by_path.setdefault(path, {})[method] = func
    return [
        Route(path, Endpoint(funcs), methods=list(funcs), name=next(iter(funcs.values())).__name__)
        for path, funcs in by_path.items()
    ]


# --- the routes of the service itself -----------------------------------------------


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def root(request: Request) -> Response:
    """What a client that probes the base URL first (Claude Code sends `HEAD /`) gets."""
    return JSONResponse({"service": "text-tool", "status": "ok"})


def _anthropic_shape(request: Request) -> bool:
    """An Anthropic SDK's call (it always sends `anthropic-version`), as the error
    shape was chosen for the request."""
    return shape_of(request.scope) == "anthropic"


def _deployments(request: Request) -> Deployments:
    deployments: Deployments = request.app.state.deployments
    return deployments


async def list_models(request: Request) -> Response:
    """The models this caller may use: in Anthropic's shape when the request carries
    `anthropic-version` (its SDKs always send it), else in OpenAI's."""
    models = admission.of(request).allowed_models(caller(request))
    if _anthropic_shape(request):
        return JSONResponse(anthropic_messages.model_list(models))
    return JSONResponse(openai_chat.model_list(models, _deployments(request).name))


async def get_model(request: Request) -> Response:
    model = request.path_params["model_id"]
    if model not in admission.of(request).allowed_models(caller(request)):
        raise ApiError(404, "model_not_found", f"The model {model[:200]!r} does not exist")
    if _anthropic_shape(request):
        return JSONResponse(anthropic_messages.model_object(model))
    return JSONResponse(openai_chat.model_object(model, _deployments(request).name))


async def ready(request: Request) -> Response:
    state = request.app.state
    if not state.ready or Drain.active or sse.Draining.shutting_down():
        return error_response(request.scope, 503, "not_ready", "the service is shutting down")
    store: SharedStore | None = state.store
    shown = "memory"
    if store is not None:
        shown = "redis" if store.healthy else "redis unreachable"
        if not store.healthy and not store.fail_open:
            return error_response(
                request.scope, 503, "store_unavailable", "the rate-limit store is unreachable"
            )
    keys: KeyRing = state.keys
    loaded = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(keys.loaded_at))
    answer: dict[str, Any] = {
        "status": "ready",
        "rate_limit_store": shown,
        "keys_loaded_at": loaded,
    }
    if keys.failing is not None:  # still serving the keys loaded before
        answer["keys_reload_failed"] = keys.failing
    answer["deployments"] = _deployments(request).states()
    return JSONResponse(answer)


async def usage(request: Request) -> Response:
    """Since this process started, from memory; with a range, a grouping or a key, from
    the ledger (dashboard.py)."""
    if dashboard.asks_the_ledger(request):
        return await dashboard.ledger_usage(request, request.app.state.ledger)
    key = caller(request)
    return JSONResponse(await admission.of(request).usage.report(key.name if key else "anonymous"))


async def metrics(request: Request) -> Response:
    collected: Metrics = request.app.state.metrics
    return collected.response()


# --- errors ---------------------------------------------------------------------------------


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return api_error_response(request.scope, exc)


async def on_provider_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProviderError)
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
    settings: Settings | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    tracer_provider: Any = None,
) -> Starlette:
    """The service as an ASGI app. `settings` default to the environment; `transport`
    replaces the network under the shared httpx client (tests use it); `tracer_provider`
    (an OpenTelemetry SDK one) takes the spans instead of OTEL_EXPORTER_OTLP_ENDPOINT's."""
    settings = settings if settings is not None else Settings.from_env()
    logger = get_logger(settings.log_format)
    client = SharedClient(settings, transport)
    keys = KeyRing.from_settings(settings, logger)
    ledger = _ledger(settings, logger)
    limiter, slots, quotas, usage_store, store = _stores(settings, logger, ledger)
    upstream = settings.upstream_names.values()  # what answers name as their model
    metrics_ = Metrics(models=[*settings.models, *upstream], keys=keys.names())
    metrics_.keys_loaded.set_function(lambda: keys.loaded_at)
    keys.on_reload.append(lambda ring: metrics_.name_keys(ring.names()))
    if store is not None:
        metrics_.store_up.set_function(lambda: 1.0 if store.healthy else 0.0)
    open_calls: dict[str, int] = {}  # each key's calls in flight (the dashboard's)
    if ledger is not None:
        metrics_.ledger_waiting.set_function(lambda: ledger.waiting)
        metrics_.ledger_dropped.set_function(lambda: ledger.dropped)
        # What this process's memory decides (with Redis, while it is away) starts from
        # the books: a restart forgives no budget.
        local = quotas.local if isinstance(quotas, RedisQuotas) else quotas
        assert isinstance(local, Quotas)
        local.restore(*ledger.books(time.time()))
    deployments = make_deployments(settings, client)
    metrics_.deployments = deployments.states
    tracing_, own_tracer = _tracing(settings, tracer_provider)
    _announce(settings, keys, ledger, logger)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owns_process = getattr(app.state, "owns_process", False)
        if owns_process:
            tune_gc()
            tune_logging()
            survive_sighup(logger, keys.reread)
            Drain.on_sigterm(settings.shutdown_drain_s, logger)
        app.state.ready = True
        try:
            yield
        finally:
            if owns_process:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            app.state.ready = False
            await client.aclose()
            if own_tracer is not None:  # what is still batched goes out (not the host's)
                await asyncio.to_thread(own_tracer.shutdown)
            if isinstance(slots, RedisSlots):
                await slots.aclose()
            if store is not None:
                await store.aclose()
            if ledger is not None:  # every row of the calls answered
                await asyncio.to_thread(ledger.close)
            logger.info("usage totals", extra={"event": "usage_totals", "keys": usage_store.all()})

    admitting = Admission(
        settings=settings,
        prices=_prices(settings),
        quotas=quotas,
        usage=usage_store,
        inflight=Inflight(settings.max_inflight),
    )
    streams = sse.Streams(
        ping_s=settings.ping_interval_s,
        grace_s=settings.shutdown_grace_s,
        open_streams=metrics_.open_streams,
    )
    # What the stateful APIs keep lives beside the ledger, unless STORE_STATE is off.
    bound = stored.HISTORY_BODIES * settings.max_body_bytes
    state: stored.Responses | None = None
    states: dict[str, stored.State] = {"threads": stored.Unthreaded()}
    if ledger is not None and settings.store_state:
        state = stored.Responses(ledger, max_bytes=bound, logger=logger)
        states = {
            "responses": state,
            "threads": stored.Threads(ledger, max_bytes=bound, logger=logger),
        }
    serving = Gateway(admission=admitting, deployments=deployments, streams=streams, states=states)
    # The router tries routes in order: the provider calls come first, each one line:
    # its client format and its operation, on the one serving path.
    api: list[tuple[str, RouteFunction, str]] = [
        *[(path, serving.route(dialect, op), "POST") for path, dialect, op in MODEL_ROUTES],
        ("/v1/messages/count_tokens", serving.count_tokens, "POST"),
        *stored.routes(state, serving.read),
        ("/v1/models", list_models, "GET"),
        ("/v1/models/{model_id:path}", get_model, "GET"),
        ("/", root, "GET"),
        ("/health", health, "GET"),
        ("/ready", ready, "GET"),
        ("/usage", usage, "GET"),
        ("/dashboard", dashboard.page, "GET"),
        ("/dashboard/app.js", dashboard.page, "GET"),
        ("/dashboard/app.css", dashboard.page, "GET"),
        ("/dashboard/data", dashboard.data, "GET"),
        ("/metrics", metrics, "GET"),
    ]
    table = [
        *api,
        *openapi.routes(
            [
                ours.CompleteBody,
                ours.CompleteResponse,
                ours.StreamText,
                ours.StreamUsage,
                openai_chat.ChatCompletionBody,
                openai_responses.ResponsesBody,
                openai_embeddings.EmbeddingsBody,
                anthropic_messages.MessagesBody,
                anthropic_messages.CountTokensBody,
            ],
            [(path, method) for path, _, method in api],
        ),
    ]
    routes = routes_of(table)
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                RequestContextMiddleware,
                logger=logger,
                metrics=metrics_,
                known_paths=frozenset(path for path, _, _ in table),
                shapes=ERROR_SHAPES,
                record=ledger.record if ledger is not None else None,
            ),
            Middleware(RedactionMiddleware, redactor=Redactor(provider_keys(settings))),
            Middleware(DrainMiddleware),
            *_cors(settings),
            Middleware(AuthMiddleware, keys=keys),
            Middleware(
                RateLimitMiddleware,
                limiter=limiter,
                default_rate=settings.rate_limit,
                allowances={"/v1/messages/count_tokens": 10},
            ),
            # After the window: a request it refuses never holds a slot, even briefly.
            Middleware(
                ConcurrencyMiddleware,
                slots=slots,
                default_limit=settings.key_max_concurrent,
                paths=frozenset([*PROVIDER_CALLS, "/v1/messages/count_tokens"]),
                open_calls=open_calls,
            ),
            *tracing_,
        ],
        exception_handlers={
            ApiError: on_api_error,
            ProviderError: on_provider_error,
            HTTPException: on_http_exception,
            StoreUnavailable: on_store_error,
            StoreBusy: on_store_error,
        },
        lifespan=lifespan,
    )
    # What the service's own routes (/ready, /usage, /v1/models) read of the app.
    app.state.settings = settings
    app.state.admission = admitting
    app.state.deployments = deployments
    app.state.streams = streams
    app.state.metrics = metrics_
    app.state.keys = keys
    app.state.store = store
    app.state.ledger = ledger
    app.state.open_calls = open_calls
    app.state.ready = True  # a mounted app gets no lifespan: it is ready when made
    return app


# The model routes: each a client format (its dialect) and an operation.
MODEL_ROUTES: list[tuple[str, Dialect, str]] = [
    ("/complete", ours.COMPLETE, "chat"),
    ("/stream", ours.STREAM, "chat"),
    ("/v1/chat/completions", openai_chat.DIALECT, "chat"),
    ("/v1/responses", openai_responses.DIALECT, "chat"),
    ("/v1/embeddings", openai_embeddings.DIALECT, "embeddings"),
    ("/v1/messages", anthropic_messages.DIALECT, "chat"),
]

# The routes that hold a provider call open, and the GenAI operation each is: what
# counts against a key's max_concurrent, and what a trace's span is made for
# (counting tokens is quick, and has its own allowance).
PROVIDER_CALLS = {path: op for path, _, op in MODEL_ROUTES}

# The error shape each route's clients read: its dialect's.
ERROR_SHAPES = {
    **{path: dialect.errors for path, dialect, _ in MODEL_ROUTES},
    "/v1/messages/count_tokens": anthropic_messages.DIALECT.errors,
}

# What a page may read of an answer beside its body.
EXPOSED = ["X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
           "Retry-After"]  # fmt: skip


def provider_keys(settings: Settings) -> list[str]:
    """Every provider key the process holds: none of them may reach a client."""
    keys = [settings.openai_api_key, settings.anthropic_api_key]
    return keys + [spec.api_key for spec in settings.deployments]


def _cors(settings: Settings) -> list[Middleware]:
    """Starlette's CORS middleware for CORS_ORIGINS, outside the keys: a browser's
    preflight carries no key, and an answer refused for its key still needs the
    headers for the page to read why."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=EXPOSED,
            max_age=600,
        )
    ]


def _tracing(settings: Settings, provider: Any) -> tuple[list[Middleware], Any]:
    """A span for each call (tracing.py), innermost: only what was admitted is a call;
    and the tracer provider made here, if one was, which the app shuts down. OpenTelemetry
    is imported only here, when traces are asked for."""
    if provider is None and not settings.otel_endpoint:
        return [], None
    import tracing

    own = tracing.tracer_provider(settings) if provider is None else None
    middleware = Middleware(
        tracing.TracingMiddleware,
        provider=own or provider,
        capture_content=settings.otel_capture_content,
        operations=PROVIDER_CALLS,
    )
    return [middleware], own


def _stores(
    settings: Settings, logger: logging.Logger, ledger: Ledger | None
) -> tuple[Limiter, Slots, QuotaStore, UsageStore, SharedStore | None]:
    """Limits, slots, quotas and usage in this process's memory, or shared through Redis
    (refilled from the ledger when found empty)."""
    limiter, quotas = MemoryLimiter(), Quotas(default_token_limit=settings.token_limit)
    slots, usage_book = MemorySlots(), UsageBook()
    if settings.rate_limit_store == "memory":
        return limiter, slots, quotas, usage_book, None
    store = SharedStore(
        settings.rate_limit_store,
        fail_open=settings.rate_limit_store_fail == "open",
        logger=logger,
        timeout_s=settings.rate_limit_store_timeout_s,
    )
    return (
        RedisLimiter(store, limiter),
        RedisSlots(store, slots, lease_s=settings.concurrency_lease_s),
        RedisQuotas(store, quotas, books=None if ledger is None else ledger.read_books),
        RedisUsage(store, usage_book),
        store,
    )


def _ledger(settings: Settings, logger: logging.Logger) -> Ledger | None:
    """The ledger LEDGER_URL names, its schema upgraded and its writer started; None when
    it is off. One line naming LEDGER_URL when it cannot be opened."""
    if settings.ledger_url == "off":
        return None
    try:
        ledger = Ledger(
            ledger_backend(settings.ledger_url),
            logger=logger,
            retention_days=settings.ledger_retention_days,
            state_retention_days=settings.store_retention_days,
        )
        ledger.open()
    except StoreError as exc:
        raise SettingsError(f"LEDGER_URL: {exc}") from None
    return ledger


def _prices(settings: Settings) -> PriceTable:
    try:
        return PriceTable.from_file(settings.prices_file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SettingsError(f"PRICES_FILE: cannot use {settings.prices_file}: {exc}") from None


def _announce(
    settings: Settings, keys: KeyRing, ledger: Ledger | None, logger: logging.Logger
) -> None:
    fields = {
        "event": "start",
        "provider": settings.provider,
        "models": list(settings.models),
        "keys": len(keys),
        "rate_limit": str(settings.rate_limit),
        "ledger": "off" if ledger is None else f"{ledger.db.name} {ledger.db.where}",
    }
    if settings.deployments:
        fields["deployments"] = [spec.name for spec in settings.deployments]
    if not len(keys):
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


# --- the process, when it is ours ---------------------------------------------------------


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a server that owns its process.

    A departure from Python's defaults, measured under load (bench/README.md): with the
    default thresholds collections run every few hundred allocations, full ones walk
    every object imported at start, and with thousands of calls in flight the middle
    generation walks every live request. Objects made at start are frozen out of
    collections; young collections run every 20,000 allocations and older ones every
    50 of those, by when most of a request's objects have been freed by reference
    counting.
    Only for the app served as `server:app`: one that mounts `create_app()` keeps
    its own settings."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


def survive_sighup(logger: logging.Logger, reload: Callable[[], object]) -> None:
    """SIGHUP's default is to end the process at once, streams cut with no final event
    and no usage totals written; a closed terminal or a careless `kill -HUP` sends it.
    Here it reloads the keys file, as daemons do, and the service goes on."""

    def hangup() -> None:
        logger.warning("SIGHUP received; the service goes on", extra={"event": "sighup"})
        reload()  # which logs how it went

    # Not where signals cannot be handled (another thread's loop, or Windows).
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)


class Drain:
    """SIGTERM's first SHUTDOWN_DRAIN_S: /ready answers 503 and so does any new request
    (`not_ready`, Retry-After) while the process still accepts connections, so that a
    load balancer stops sending before the socket closes (else the connections still in
    the listen backlog are reset); then uvicorn's own shutdown, with the streams' grace.
    Process-wide, as the signal is."""

    active = False

    @classmethod
    def on_sigterm(cls, drain_s: float, logger: logging.Logger) -> None:
        """Put the drain before the SIGTERM handler uvicorn installed; a second SIGTERM
        (or SIGINT) goes to uvicorn at once."""
        previous = signal.getsignal(signal.SIGTERM)
        if drain_s <= 0 or not callable(previous):
            return
        loop = asyncio.get_running_loop()

        def handler(sig: int, frame: Any) -> None:
            if cls.active:
                previous(sig, frame)
                return
            cls.active = True
            logger.warning(
                f"SIGTERM: draining for {drain_s:g} s before shutting down",
                extra={"event": "draining", "drain_s": drain_s},
            )
            loop.call_soon_threadsafe(loop.call_later, drain_s, previous, sig, None)

        with contextlib.suppress(ValueError):  # not the main thread: no signals here
            signal.signal(signal.SIGTERM, handler)


class DrainMiddleware:
    """During the drain, every request but /health (the process is alive) gets 503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if Drain.active and scope["type"] == "http" and relative_path(scope) != "/health":
            response = error_response(
                scope, 503, "not_ready", "the service is shutting down; retry",
                headers={"Retry-After": "1"},
            )  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


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


_served: Starlette | None = None

# uvicorn's own graceful timeout is this much longer than SHUTDOWN_GRACE_S: the streams
# end themselves (with their error event and usage) before uvicorn would cut them.
SHUTDOWN_MARGIN_S = 5.0


def uvicorn_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """What every documented way of running the service needs of uvicorn: our bounded
    protocol (request heads; HTTP/1.0 framing), no access log of uvicorn's (ours is
    the one), and a graceful shutdown that outlasts the streams' own."""
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "http": "protocol:BoundedHttpTools",
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_s + SHUTDOWN_MARGIN_S,
        "proxy_headers": args.proxy_headers,
        "log_level": args.log_level,
        "backlog": args.backlog,
    }
    if args.workers != 1:
        options["workers"] = args.workers
    if args.forwarded_allow_ips is not None:
        options["forwarded_allow_ips"] = args.forwarded_allow_ips
    if args.root_path:
        options["root_path"] = args.root_path
    if args.uds:
        options["uds"] = args.uds
    return options


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="text-tool",
        description="Run text-tool (settings from the environment and .env; see README).",
    )
    cli.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    cli.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    cli.add_argument("--uds", help="a Unix socket to bind instead of host and port")
    cli.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    cli.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trust X-Forwarded-For from --forwarded-allow-ips (uvicorn's default: 127.0.0.1)",
    )
    cli.add_argument("--forwarded-allow-ips", help="addresses of trusted proxies, or '*'")
    cli.add_argument("--root-path", default="", help="the path prefix a proxy serves it under")
    cli.add_argument("--log-level", default="info", help="uvicorn's own log level")
    cli.add_argument("--backlog", type=int, default=2048, help="the listen queue's length")
    return cli


def main(argv: list[str] | None = None) -> None:
    """`python server.py` and the `text-tool` console script: the settings checked first
    (one line naming a bad one, exit 2), then uvicorn with what `uvicorn_options` says."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"text-tool: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    import uvicorn

    uvicorn.run("server:app", **uvicorn_options(args, settings))


def __getattr__(name: str) -> Any:
    """`server.app`, made from the environment on first use (PEP 562): what
    `uvicorn server:app` asks for."""
    global _served
    if name != "app":
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    if _served is None:
        _served = _app_from_environment()
    return _served


if __name__ == "__main__":
    main()
