"""GET /openapi.json, an OpenAPI 3.1 document built from the pydantic models, and
GET /docs, a Swagger UI page for it that loads nothing from any other host.

Swagger UI 5 (the first to read OpenAPI 3.1) comes from the optional `docs` extra
(swagger-ui-py, about 25 MB installed); only its bundle and stylesheet are served.
Without the extra, /docs says how to get it.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from errors import ApiError
from jsonio import JSONResponse
from stored import ConversationBody, ConversationUpdate, ItemsBody


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorObject(BaseModel):
    type: str
    message: str
    request_id: str
    errors: list[ErrorDetail] | None = None
    code: str | None = Field(None, description="Under /v1: the same as type, for OpenAI SDKs")
    param: str | None = Field(None, description="Under /v1: the first invalid field")


class Error(BaseModel):
    error: ErrorObject


class AnthropicErrorObject(BaseModel):
    type: str
    message: str
    details: dict[str, Any] | None = Field(
        None,
        description='What the SDKs branch on: {"error_code": ...} (thread_not_found, '
        "thread_unsupported_request, thread_fingerprint_mismatch)",
    )


class AnthropicError(BaseModel):
    """The error shape of the Messages routes, Anthropic's."""

    type: str = Field(description="always error")
    error: AnthropicErrorObject
    request_id: str


class Health(BaseModel):
    status: str


class Totals(BaseModel):
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


class UsageReport(Totals):
    key: str
    by_model: dict[str, Totals]


class ModelEntry(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str
    data: list[ModelEntry]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_ERRORS = {
    "400": "Body not JSON or not UTF-8 (invalid_json), not the schema on a /v1 route "
    "(invalid_request, with the fields), or refused by the provider",
    "401": "Key missing or unknown (invalid_api_key)",
    "403": "Model not allowed for this key (model_not_allowed)",
    "404": "No such model (model_not_found), or no such stored response, conversation or "
    "message thread for this key, or the store is off (not_found; a thread's with "
    "error.details.error_code thread_not_found)",
    "413": "Body over MAX_BODY_BYTES (body_too_large)",
    "415": "Not application/json (unsupported_media_type)",
    "422": "Schema violation (invalid_request), with the fields (a 400 on the /v1 routes, "
    "as OpenAI's and Anthropic's APIs answer)",
    "429": "Over the key's request, token or concurrency limit or budget, or the provider's "
    "limit (rate_limit_exceeded, concurrency_limit_exceeded, budget_exceeded); see Retry-After",
    "500": "Internal error, logged with the request id",
    "502": "Provider error or unreadable provider answer (upstream_error)",
    "504": "Provider too slow (upstream_timeout)",
    "503": "The stored state cannot be reached (store_unavailable)",
}


def _inline(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}  # fmt: skip


_PAGING = [
    _query("limit", "1 to 100, default 20", {"type": "integer", "minimum": 1, "maximum": 100}),
    _query("order", "asc or desc (default)", {"enum": ["asc", "desc"]}),
    _query("after", "an item id: the items after it"),
    _query("before", "an item id: the items before it"),
]
_LIST = {
    "type": "object",
    "required": ["object", "data", "first_id", "last_id", "has_more"],
    "properties": {"object": {"const": "list"},
                   "data": {"type": "array", "items": {"type": "object"}},
                   "has_more": {"type": "boolean"}},
}  # fmt: skip
_CONVERSATION = {
    "type": "object",
    "required": ["id", "object", "created_at", "metadata"],
    "properties": {"id": {"type": "string"}, "object": {"const": "conversation"},
                   "created_at": {"type": "integer"}, "metadata": {"type": "object"}},
}  # fmt: skip


def _linked(operation: dict[str, Any], param: str, *targets: str) -> dict[str, Any]:
    """`operation` with OpenAPI links: the id it answers is `param` of each target (what
    a client does next, and what lets a fuzzer reach them with real ids)."""
    operation["responses"]["200"]["links"] = {
        target: {"operationId": target, "parameters": {param: "$response.body#/id"}}
        for target in targets
    }
    return operation


def _deleted(kind: str) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "deleted"],
            "properties": {"id": {"type": "string"}, "object": {"const": kind},
                           "deleted": {"const": True}}}  # fmt: skip


def _state_op(
    summary: str,
    operation: str,
    parameters: list[dict[str, Any]],
    body: str | None,
    answer: dict[str, Any],
    *statuses: str,
) -> dict[str, Any]:
    """An operation of the stored state (stored.py): OpenAI's objects, its key's only."""
    op: dict[str, Any] = {
        "tags": ["OpenAI-compatible"], "summary": summary, "operationId": operation,
        "security": _SECURITY, "parameters": parameters,
        "responses": {"200": _inline(summary, answer),
                      **_errors(*sorted({"401", "404", "429", "503", *statuses}))},
    }  # fmt: skip
    if body is not None:
        op["requestBody"] = _body(body)
        op["responses"].update(_errors("400", "413", "415"))
    return op


def _errors(*statuses: str, shape: str = "Error") -> dict[str, Any]:
    return {status: _json(shape, _ERRORS[status]) for status in statuses}


_CALL_ERRORS = ("400", "401", "403", "404", "413", "415", "422", "429", "500", "502", "504")
# OpenAI and Anthropic answer a schema violation with 400, and so do the /v1 routes here.
_V1_ERRORS = tuple(status for status in _CALL_ERRORS if status != "422")
_SECURITY: list[dict[str, list[str]]] = [{"ApiKeyHeader": []}, {"Bearer": []}]


# What /v1/responses streams: Open Responses' events, and OpenAI's for freeform tools.
RESPONSES_EVENTS = (
    "response.created", "response.in_progress", "response.output_item.added",
    "response.output_item.done", "response.content_part.added", "response.content_part.done",
    "response.output_text.delta", "response.output_text.done", "response.refusal.delta",
    "response.refusal.done", "response.reasoning_summary_part.added",
    "response.reasoning_summary_part.done", "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.done", "response.function_call_arguments.delta",
    "response.function_call_arguments.done", "response.custom_tool_call_input.delta",
    "response.custom_tool_call_input.done", "response.completed", "response.incomplete",
    "response.failed",
)  # fmt: skip


def _sse(events: list[str], *data_schemas: dict[str, Any]) -> dict[str, Any]:
    """Each event: its name, and data that is one of these JSON values, an error body
    (`event: error`) or `[DONE]`."""
    data = {"anyOf": [*data_schemas, _ref("Error")]}
    return {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "event": {"enum": [*events, "error"]},
                    "data": {
                        "anyOf": [
                            {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": data,
                            },
                            {"const": "[DONE]", "description": "the last event"},
                        ]
                    },
                },
            }
        }
    }


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


# Routes of the table that are not operations of the API: the document and its page.
# The pages, their assets, and what only the dashboard's page reads.
UNDOCUMENTED = frozenset(
    {"/openapi.json", "/docs", "/docs/{name}", "/dashboard", "/dashboard/app.js",
     "/dashboard/app.css", "/dashboard/data"}
)  # fmt: skip


def served(paths: dict[str, Any], table: list[tuple[str, str]]) -> dict[str, Any]:
    """The documented operations of the routes the app serves, (path, method) from its
    route table: a route served but not documented here stops the start, and one
    documented but not served is left out, so the two cannot drift."""
    documented: dict[str, Any] = {}
    for path, method in table:
        if path in UNDOCUMENTED:
            continue
        shown = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)  # {model_id:path} -> {model_id}
        operation = paths.get(shown, {}).get(method.lower())
        if operation is None:
            raise RuntimeError(f"openapi.py documents no {method} {path}, which is served")
        documented.setdefault(shown, {})[method.lower()] = operation
    return documented


def build_document(
    body_models: list[type[BaseModel]], table: list[tuple[str, str]], root_path: str = ""
) -> dict[str, Any]:
    """The OpenAPI document of the routes in `table` ((path, method), the app's route
    table); `body_models` are the routes' request and response models (CompleteBody,
    CompleteResponse, StreamText, StreamUsage, ChatCompletionBody), named by their class."""
    models: list[type[BaseModel]] = [
        *body_models,
        ConversationBody,
        ConversationUpdate,
        ItemsBody,
        Error,
        AnthropicError,
        Health,
        UsageReport,
        ModelList,
    ]
    _, schemas = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    complete = {
        "tags": ["text-tool"],
        "security": _SECURITY,
        "requestBody": _body("CompleteBody"),
    }
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "tags": ["operations"],
                "summary": "Liveness",
                "operationId": "health",
                "responses": {"200": _json("Health", "The process runs")},
            }
        },
        "/ready": {
            "get": {
                "tags": ["operations"],
                "summary": "Readiness",
                "operationId": "ready",
                "responses": {
                    "200": _json("Health", "Able to serve"),
                    "503": _json("Error", "Starting or shutting down (not_ready)"),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["operations"],
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/complete": {
            "post": {
                **complete,
                "summary": "One completion",
                "operationId": "complete",
                "responses": {
                    "200": _json("CompleteResponse", "The completion"),
                    **_errors(*_CALL_ERRORS),
                },
            }
        },
        "/stream": {
            "post": {
                **complete,
                "summary": "One completion as Server-Sent Events",
                "operationId": "stream",
                "responses": {
                    "200": {
                        "description": 'data: {"text": ...} events, an event: usage, '
                        "then data: [DONE]",
                        "content": _sse(
                            ["message", "usage"], _ref("StreamText"), _ref("StreamUsage")
                        ),
                    },
                    **_errors(*_CALL_ERRORS),
                },
            }
        },
        "/usage": {
            "get": {
                "tags": ["text-tool"],
                "summary": "The calling key's usage: since start, or from the ledger",
                "description": "Without parameters: totals since this process started. "
                "With any of from, to, group_by or key: sums from the ledger, which "
                "outlives restarts, as JSON or (Accept: text/csv) CSV.",
                "operationId": "usage",
                "security": _SECURITY,
                "parameters": [
                    _query(
                        "from",
                        "ISO 8601 date or time (UTC unless it says); default 30 days before to",
                    ),
                    _query("to", "ISO 8601 date or time; default now"),
                    _query(
                        "group_by", "comma-separated: key, model, day, hour, deployment, session"
                    ),
                    _query("key", "an admin key: this key's calls (default every key's)"),
                ],  # fmt: skip
                "responses": {
                    "200": {
                        "description": "Totals and by model (no parameters), or the "
                        "ledger's rows and total",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/UsageReport"},
                                        {"type": "object", "required": ["rows", "total"]},
                                    ]
                                }
                            },
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },  # fmt: skip
                    **_errors("400", "401", "403", "429"),
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "tags": ["OpenAI-compatible"],
                "summary": "OpenAI chat completions, streaming and not",
                "operationId": "chatCompletions",
                "security": _SECURITY,
                "requestBody": _body("ChatCompletionBody"),
                "responses": {
                    "200": {
                        "description": "A chat.completion object, or with stream: true "
                        "chat.completion.chunk events and data: [DONE]",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            **_sse(["message"], {"type": "object"}),
                        },
                    },
                    **_errors(*_V1_ERRORS),
                },
            }
        },
        "/v1/responses": {
            "post": {
                "tags": ["OpenAI-compatible"],
                "summary": "OpenAI's Responses API, stored or not, streaming and not",
                "operationId": "responses",
                "security": _SECURITY,
                "requestBody": _body("ResponsesBody"),
                "responses": {
                    "200": {
                        "description": "A response object, or with stream: true its event "
                        "sequence, response.created to response.completed (no [DONE])",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            **_sse(list(RESPONSES_EVENTS), {"type": "object"}),
                        },
                        "links": {  # a stored response (store: true, the default)
                            op: {
                                "operationId": op,
                                "parameters": {"response_id": "$response.body#/id"},
                            }
                            for op in ("getResponse", "deleteResponse", "listInputItems")
                        },  # fmt: skip
                    },
                    **_errors(*_V1_ERRORS),
                },
            }
        },
        "/v1/responses/{response_id}": {
            "get": _state_op(
                "A response this key stored (store: true, the default)",
                "getResponse",
                [_path("response_id")],
                None,
                {"type": "object"},
            ),
            "delete": _state_op(
                "Delete a response this key stored: gone from the database",
                "deleteResponse",
                [_path("response_id")],
                None,
                _deleted("response"),
            ),
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _state_op(
                "The items a stored response was made from, its history first",
                "listInputItems",
                [_path("response_id"), *_PAGING],
                None,
                _LIST,
                "400",
            ),
        },
        "/v1/conversations": {
            "post": _linked(
                _state_op(
                    "Create a conversation, with up to 20 items",
                    "createConversation",
                    [],
                    "ConversationBody",
                    _CONVERSATION,
                    "400",
                ),
                "conversation_id",
                "getConversation",
                "updateConversation",
                "deleteConversation",
                "listConversationItems",
                "addConversationItems",
            ),  # fmt: skip
        },
        "/v1/conversations/{conversation_id}": {
            "get": _state_op(
                "A conversation of this key",
                "getConversation",
                [_path("conversation_id")],
                None,
                _CONVERSATION,
            ),
            "post": _state_op(
                "Replace a conversation's metadata",
                "updateConversation",
                [_path("conversation_id")],
                "ConversationUpdate",
                _CONVERSATION,
            ),
            "delete": _state_op(
                "Delete a conversation and its items",
                "deleteConversation",
                [_path("conversation_id")],
                None,
                _deleted("conversation.deleted"),
            ),
        },
        "/v1/conversations/{conversation_id}/items": {
            "get": _state_op(
                "A conversation's items, paginated",
                "listConversationItems",
                [_path("conversation_id"), *_PAGING],
                None,
                _LIST,
                "400",
            ),
            "post": _state_op(
                "Add up to 20 items to a conversation",
                "addConversationItems",
                [_path("conversation_id")],
                "ItemsBody",
                _LIST,
                "400",
            ),
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "get": _state_op(
                "One item of a conversation",
                "getConversationItem",
                [_path("conversation_id"), _path("item_id")],
                None,
                {"type": "object", "required": ["id", "type"]},
            ),
            "delete": _state_op(
                "Delete an item; the answer is the conversation",
                "deleteConversationItem",
                [_path("conversation_id"), _path("item_id")],
                None,
                _CONVERSATION,
            ),
        },
        "/v1/embeddings": {
            "post": {
                "tags": ["OpenAI-compatible"],
                "summary": "OpenAI embeddings (echo: deterministic unit vectors)",
                "operationId": "embeddings",
                "security": _SECURITY,
                "requestBody": _body("EmbeddingsBody"),
                "responses": {
                    "200": {
                        "description": "A list of embedding objects, with usage",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(*_V1_ERRORS),
                },
            }
        },
        "/v1/messages": {
            "post": {
                "tags": ["Anthropic-compatible"],
                "summary": "Anthropic messages, streaming and not (also with ?beta=true)",
                "operationId": "messages",
                "security": _SECURITY,
                "requestBody": _body("MessagesBody"),
                "responses": {
                    "200": {
                        "description": "A message object, or with stream: true Anthropic's "
                        "event sequence, message_start to message_stop",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            **_sse(
                                [
                                    "message_start",
                                    "content_block_start",
                                    "content_block_delta",
                                    "content_block_stop",
                                    "message_delta",
                                    "message_stop",
                                    "ping",
                                ],
                                {"type": "object"},
                            ),  # fmt: skip
                        },
                    },
                    **_errors(*_V1_ERRORS, shape="AnthropicError"),
                },
            }
        },
        "/v1/messages/count_tokens": {
            "post": {
                "tags": ["Anthropic-compatible"],
                "summary": "The input tokens of a messages body: the provider's count or an "
                "estimate, never 0",
                "operationId": "countTokens",
                "security": _SECURITY,
                "requestBody": _body("CountTokensBody"),
                "responses": {
                    "200": {
                        "description": "{input_tokens}",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(
                        "400", "401", "403", "404", "413", "415", "429", shape="AnthropicError"
                    ),
                },  # fmt: skip
            }
        },
        "/v1/models": {
            "get": {
                "tags": ["OpenAI-compatible", "Anthropic-compatible"],
                "summary": "The models this key may use (Anthropic's shape with anthropic-version)",
                "operationId": "listModels",
                "security": _SECURITY,
                "responses": {
                    "200": _json("ModelList", "OpenAI's list shape"),
                    **_errors("401", "429"),
                },
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "tags": ["OpenAI-compatible", "Anthropic-compatible"],
                "summary": "One model this key may use",
                "operationId": "getModel",
                "security": _SECURITY,
                "parameters": [
                    {
                        "name": "model_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],  # fmt: skip
                "responses": {
                    "200": {
                        "description": "The model",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors("401", "429"),
                    "404": _json("Error", "Not a model this key may use (model_not_found)"),
                },  # fmt: skip
            }
        },
        "/": {
            "get": {
                "tags": ["operations"],
                "summary": "The service answers (what a client probing its base URL gets)",
                "operationId": "root",
                "responses": {
                    "200": {
                        "description": "ok",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },  # fmt: skip
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "text-tool",
            "version": "0.1.0",
            "description": "An LLM provider behind a validated, metered HTTP API.",
        },
        "servers": [{"url": root_path or "/"}],
        "paths": served(paths, table),
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


# --- /docs ---------------------------------------------------------------------------------

_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>text-tool API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true
});
</script>
</body>
</html>
"""

_MISSING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>text-tool API</title></head>
<body>
<h1>text-tool API</h1>
<p>This page needs Swagger UI, from the optional <code>docs</code> extra:
<code>uv sync --extra docs</code> (or <code>pip install swagger-ui-py</code>).</p>
<p>The API document itself is at <a href="openapi.json">openapi.json</a>.</p>
</body></html>
"""


@functools.cache
def swagger_static() -> Path | None:
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or spec.origin is None:
        return None
    static = Path(spec.origin).parent / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def _page_base(request: Request) -> str:
    """Relative links must resolve beside /docs, also under a mount prefix."""
    return str(request.scope.get("root_path", "")) + "/"


async def docs(request: Request) -> Response:
    page = _PAGE if swagger_static() is not None else _MISSING
    return HTMLResponse(page.replace("<head>", f'<head>\n<base href="{_page_base(request)}">', 1))


async def docs_asset(request: Request) -> Response:
    name = request.path_params["name"]
    static = swagger_static()
    if static is None or name not in _ASSETS:
        raise ApiError(404, "not_found", "no such route")
    return FileResponse(static / name, media_type=_ASSETS[name])


RouteFunction = Callable[[Request], Awaitable[Response]]


def routes(
    body_models: list[type[BaseModel]], table: list[tuple[str, str]]
) -> list[tuple[str, RouteFunction, str]]:
    """(path, function, method) of each route here, for the route table; `table` is the
    rest of it, (path, method), which the document describes."""
    documents: dict[str, dict[str, Any]] = {}

    async def openapi(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        if root not in documents:
            documents[root] = build_document(body_models, table, root)
        return JSONResponse(documents[root])

    return [
        ("/openapi.json", openapi, "GET"),
        ("/docs", docs, "GET"),
        ("/docs/{name}", docs_asset, "GET"),
    ]
