"""Stored responses: the Responses API's state, kept by text-tool whatever the provider.

With `store` true (the default, as in OpenAI's API) a response and the input it was
given are kept in the ledger's database (store.py), owned by the calling key; a later
call names it in `previous_response_id` and gets its history back: every earlier turn's
input and output, rebuilt from the store and sent, whole, to whichever provider serves
this turn (a provider always gets `store: false`: no provider holds our state). A
response stored by OpenAI could not be continued on Anthropic after a failover; one
stored here can. `GET` and `DELETE /v1/responses/{id}` and `GET .../input_items` read
and remove them, for the key that stored them only: any other id, a guessed one, or one
of another key, is the same 404.

The gateway calls `expand` before it decodes a body, and `Keeping.answer` or
`Keeping.frames` with what it answers; the rest here is the three routes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

import jsonio
from admission import caller
from errors import ApiError
from jsonio import JSONResponse
from store import Ledger

# The most turns a history is rebuilt from (each a stored response); a longer chain is
# a client's loop, and its context would be far past any model's.
MAX_TURNS = 1_000
# What a rebuilt history may hold, as a multiple of MAX_BODY_BYTES: past any model's
# context (1 MB of text is about 250,000 tokens), and the bound on what a call holds.
HISTORY_BODIES = 16
T = TypeVar("T")
_FINAL = (b"event: response.completed\n", b"event: response.incomplete\n")
# The events that carry the whole response object (its id among it).
_WHOLE = (*_FINAL, b"event: response.created\n", b"event: response.in_progress\n",
          b"event: response.queued\n", b"event: response.failed\n")  # fmt: skip
_PREFIXES = {"message": "msg_", "function_call_output": "fco_", "custom_tool_call_output": "ctco_"}


def new_item_id(prefix: str, size: int = 12) -> str:
    """A random id (never a counter: another key cannot guess one from its own)."""
    return prefix + os.urandom(size).hex()


def _owner(request: Request) -> str:
    key = caller(request)
    return key.name if key is not None else "anonymous"


def _not_found(response_id: str, param: str | None = None) -> ApiError:
    """OpenAI's words for an id it does not have; the same for another key's."""
    shown = response_id[:100]
    if param is not None:
        return ApiError(
            400, "invalid_request", f"Previous response with id '{shown}' not found.", param=param
        )
    return ApiError(404, "not_found", f"Response with id '{shown}' not found.")


def as_items(value: Any) -> list[dict[str, Any]]:
    """A body's `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]  # fmt: skip
    return [dict(item) for item in value if isinstance(item, dict)]


def replayable(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored items as a provider that stores nothing takes them back: without the ids
    of items it never kept (OpenAI refuses those with `store: false`), and without
    reasoning that carries nothing but its id."""
    out = []
    for item in items:
        if item.get("type") == "reasoning" and not item.get("encrypted_content"):
            continue
        out.append({k: v for k, v in item.items() if k != "id"})
    return out


def _output(response: Any) -> list[dict[str, Any]]:
    output = response.get("output") if isinstance(response, dict) else None
    return [item for item in output or () if isinstance(item, dict)]


class Keeping:
    """One call that is to be stored: what it was given, and its answer once it is."""

    def __init__(
        self, state: Responses, owner: str, previous: str | None, items: list[dict[str, Any]]
    ) -> None:
        self.state = state
        self.owner = owner
        self.previous = previous
        # Its id is ours, random, whatever the provider named it: a server that numbers
        # its responses, or names them all alike, cannot make two stored ones collide.
        self.id = new_item_id("resp_", 24)
        # Each item gets an id, as OpenAI gives every input item one (input_items shows it).
        self.items = [
            item if "id" in item else {"id": new_item_id(_PREFIXES.get(
                str(item.get("type", "message")), "item_")), **item}
            for item in items
        ]  # fmt: skip

    async def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        """A whole answer: stored (when it completed), and shown as stored; as not
        stored (`store: false`) if the database would not take it."""
        shown = self._shown(response)
        if shown.get("status") in ("completed", "incomplete"):
            if not await self.state.save(self.owner, self.previous, self.items, shown):
                shown["store"] = False
        return shown

    def _shown(self, response: dict[str, Any]) -> dict[str, Any]:
        return {**response, "id": self.id, "store": True, "previous_response_id": self.previous}

    async def frames(self, frames: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """A stream's frames as they go, each that carries the response under our id,
        the last one's response stored before that frame is sent, so that a client that
        names it the moment it has it finds it."""
        try:
            async for frame in frames:
                if frame.startswith(_WHOLE):
                    head, _, data = frame.partition(b"\ndata: ")
                    event = jsonio.loads(data)
                    if isinstance(event, dict) and isinstance(event.get("response"), dict):
                        final = frame.startswith(_FINAL)
                        response = event["response"]
                        event["response"] = (
                            await self.answer(response) if final else self._shown(response)
                        )
                        frame = head + b"\ndata: " + jsonio.dumps(event) + b"\n\n"
                yield frame
        finally:
            await frames.aclose()


class Responses:
    """The stored responses of every key, in the ledger's database."""

    def __init__(
        self, ledger: Ledger, *, max_bytes: int, logger: logging.Logger | None = None
    ) -> None:
        self.ledger = ledger
        self.mark = ledger.db.mark
        self.max_bytes = max_bytes  # the most a rebuilt history holds, as stored text
        self.logger = logger or logging.getLogger("text_tool")

    async def _run(self, work: Callable[[Any], T]) -> T:
        """`work` on a connection of the ledger's database, in one of its reader threads;
        a database that fails is the contract's 503, never a traceback to the client."""
        try:
            return await self.ledger.reading(lambda: self.ledger.with_connection(work))
        except ApiError:
            raise
        except Exception as exc:
            self.logger.error(
                "the stored responses could not be read or written",
                extra={"event": "state_failed", "error": type(exc).__name__},
            )
            raise ApiError(
                503, "store_unavailable", "The stored responses cannot be reached; try again"
            ) from None

    async def expand(
        self, request: Request, data: dict[str, Any]
    ) -> tuple[dict[str, Any], Keeping | None]:
        """The body with its history: `previous_response_id` replaced by every earlier
        turn's items before this one's, `store` taken out (a provider gets `false`); and
        what to keep of the call, unless it asked for `store: false`."""
        owner = _owner(request)
        data = dict(data)
        keep = data.pop("store", None) is not False
        previous = data.pop("previous_response_id", None)
        items = as_items(data["input"])
        if previous is not None:
            history = await self.history(owner, str(previous), "previous_response_id")
            data["input"] = replayable(history) + items
        return data, Keeping(self, owner, previous, items) if keep else None

    # --- the database (each in a reader thread of the ledger) --------------------------

    async def save(
        self,
        owner: str,
        previous: str | None,
        items: list[dict[str, Any]],
        response: dict[str, Any],
    ) -> bool:
        """Keep a response; False (logged) if it could not be kept: the call was
        answered, and is not failed for its storage."""
        m = self.mark
        sql = (
            "INSERT INTO responses (id, key, created_at, previous_id, input, response) "
            f"VALUES ({m}, {m}, {m}, {m}, {m}, {m})"
        )
        values = (str(response["id"]), owner, time.time(), previous,
                  jsonio.dumps(items).decode(), jsonio.dumps(response).decode())  # fmt: skip
        try:
            await self._run(lambda conn: self.ledger.execute(conn, sql, values))
        except ApiError:  # logged
            return False
        return True

    def _chain(self, conn: Any, owner: str, response_id: str) -> list[tuple[list[Any], Any]]:
        """(input items, response) of `response_id` and each response before it, oldest
        first; empty when the first is not this key's. A chain whose stored text is past
        `max_bytes` is a 400: it would not fit a model, nor this process's memory."""
        m = self.mark
        sql = f"SELECT previous_id, input, response FROM responses WHERE id = {m} AND key = {m}"
        turns: list[tuple[list[Any], Any]] = []
        at: str | None = response_id
        size = 0
        while at is not None and len(turns) < MAX_TURNS:
            found = conn.execute(sql, (at, owner)).fetchone()
            if found is None:
                if not turns:
                    return []
                break  # an earlier turn deleted or expired: the history starts after it
            previous, items, response = found
            size += len(items) + len(response)
            if size > self.max_bytes:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"previous_response_id: the conversation holds over "
                    f"{self.max_bytes // 1_000_000} MB, past what one call sends; start "
                    "a new one with the input that matters",
                    param="previous_response_id",
                )
            turns.append((jsonio.loads(items), jsonio.loads(response)))
            at = previous
        turns.reverse()
        return turns

    async def history(self, owner: str, response_id: str, param: str) -> list[dict[str, Any]]:
        """Every item of the conversation up to and including `response_id`'s answer."""
        turns = await self._run(lambda conn: self._chain(conn, owner, response_id))
        if not turns:
            raise _not_found(response_id, param)
        items: list[dict[str, Any]] = []
        for given, response in turns:
            items += given
            items += _output(response)
        return items

    # --- the routes --------------------------------------------------------------------

    async def get(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        owner = _owner(request)
        m = self.mark
        sql = f"SELECT response FROM responses WHERE id = {m} AND key = {m}"
        found = await self._run(lambda conn: conn.execute(sql, (response_id, owner)).fetchone())
        if found is None:
            raise _not_found(response_id)
        return Response(found[0], media_type="application/json")  # as it was stored

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        owner = _owner(request)
        m = self.mark
        sql = f"DELETE FROM responses WHERE id = {m} AND key = {m}"
        values = (response_id, owner)
        gone = await self._run(lambda conn: self.ledger.execute(conn, sql, values))
        if not gone:
            raise _not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def input_items(self, request: Request) -> Response:
        """The items the response was made from (its history, then its own input), as
        OpenAI lists them: `limit` (1-100, 20), `order` (desc by default), `after`,
        `before`."""
        response_id = request.path_params["response_id"]
        owner = _owner(request)
        params = request.query_params
        limit_text = params.get("limit", "20")
        if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= 100:
            raise ApiError(400, "invalid_request", "limit: must be 1 to 100", param="limit")
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "invalid_request", "order: must be asc or desc", param="order")
        turns = await self._run(lambda conn: self._chain(conn, owner, response_id))
        if not turns:
            raise _not_found(response_id)
        items: list[dict[str, Any]] = []
        for i, (given, response) in enumerate(turns):
            items += given
            if i < len(turns) - 1:  # earlier answers are this one's input
                items += _output(response)
        if order == "desc":
            items.reverse()
        for cursor, step in (("after", 1), ("before", -1)):
            mark = params.get(cursor)
            if mark:
                at = next((i for i, item in enumerate(items) if item.get("id") == mark), None)
                if at is None:
                    raise ApiError(
                        400, "invalid_request", f"{cursor}: no item {mark[:100]!r}", param=cursor
                    )
                items = items[at + 1 :] if step == 1 else items[:at]
        page = items[: int(limit_text)] if not params.get("before") else items[-int(limit_text) :]
        return JSONResponse({
            "object": "list",
            "data": page,
            "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None,
            "has_more": len(page) < len(items),
        })  # fmt: skip


class Unkept:
    """The three routes when nothing is stored (STORE_STATE=false or LEDGER_URL=off):
    every id is the 404 a client of OpenAI's API knows, saying why."""

    @staticmethod
    async def get(request: Request) -> Response:
        raise ApiError(
            404,
            "not_found",
            f"Response with id '{request.path_params['response_id'][:100]}' not found. "
            "(This service stores no responses: STORE_STATE=false or LEDGER_URL=off.)",
        )

    delete = input_items = get
