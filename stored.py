"""The state the newest clients lean on, kept by text-tool whatever the provider: the
Responses API's stored responses and conversations, and Anthropic's message threads.

With `store` true (the default, as in OpenAI's API) a response and the input it was
given are kept in the ledger's database (store.py), owned by the calling key; a later
call names it in `previous_response_id` and gets its history back: every earlier turn's
input and output, rebuilt from the store and sent, whole, to whichever provider serves
this turn (a provider always gets `store: false`: no provider holds our state). A
response stored by OpenAI could not be continued on Anthropic after a failover; one
stored here can. A conversation (OpenAI's Conversations API) is a list of items a call
names in `conversation`: they come before its input, and its input and output are added
to them once it is answered.

A message thread (Anthropic's `thread: {"type": "create"}`, then `{"type": "continue",
"previous_message_id": ...}` with only the new messages) is kept the same way: each
turn's new messages and reply, under the reply's id; a turn that continues one gets
the thread's system, tools and every earlier message back, and the provider, whatever
it is, the whole conversation without `thread`.

Everything is its key's: any other id, a guessed one or one of another key, is the same
404. Ids are random, never counters.

The gateway calls a `State`'s `expand` before it decodes a body, and its `Keeper`'s
`answer` or `frames` with what it answers; the rest here is the routes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

import jsonio
from admission import caller
from dialects import bad
from dialects.anthropic_messages import Snapshot
from errors import ApiError
from jsonio import JSONResponse
from store import Ledger

# The most turns a history is rebuilt from (each a stored response); a longer chain is
# a client's loop, and its context would be far past any model's.
MAX_TURNS = 1_000
# What a rebuilt history may hold, as a multiple of MAX_BODY_BYTES: past any model's
# context (1 MB of text is about 250,000 tokens), and the bound on what a call holds.
HISTORY_BODIES = 16
MAX_ADDED = 20  # the items one request adds to a conversation, as OpenAI's API allows
T = TypeVar("T")
Reader = Callable[[Request, type[BaseModel]], Awaitable[tuple[dict[str, Any], Any]]]

_FINAL = (b"event: response.completed\n", b"event: response.incomplete\n")
# The events that carry the whole response object (its id among it).
_WHOLE = (*_FINAL, b"event: response.created\n", b"event: response.in_progress\n",
          b"event: response.queued\n", b"event: response.failed\n")  # fmt: skip
_PREFIXES = {"message": "msg_", "function_call_output": "fco_", "custom_tool_call_output": "ctco_"}
_ROLES = ("user", "assistant", "system", "developer")


class Keeper(Protocol):
    """One call whose answer is kept: it sees the answer before the client does."""

    async def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        """A whole answer, kept, as the client is to see it."""
        ...

    def frames(self, frames: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """A stream's frames, kept at its end, as the client is to see them."""
        ...


class State(Protocol):
    """A kind of state a dialect keeps (`Dialect.keeps`)."""

    async def expand(
        self, request: Request, data: dict[str, Any]
    ) -> tuple[dict[str, Any], Keeper | None]:
        """The body with the history it names (`data` itself when it names none), and
        what to keep of the call, if anything."""
        ...


def new_id(prefix: str, size: int = 12) -> str:
    """A random id (never a counter: another key cannot guess one from its own)."""
    return prefix + os.urandom(size).hex()


def owner_of(request: Request) -> str:
    key = caller(request)
    return key.name if key is not None else "anonymous"


def missing(what: str, ident: str, *, param: str | None = None, status: int = 404) -> ApiError:
    """OpenAI's words for an id it does not have; the same for another key's."""
    return ApiError(
        status,
        "not_found" if status == 404 else "invalid_request",
        f"{what} with id '{ident[:100]}' not found.",
        param=param,
    )


def as_items(value: Any, where: str = "input") -> list[dict[str, Any]]:
    """A body's input (a string is one user message) as the items OpenAI lists back:
    each with an id, messages with a list of parts and a status. A client's own ids
    are kept."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for i, given in enumerate(value):
        if not isinstance(given, dict):
            raise ApiError(400, "invalid_request", f"{where}.{i}: an item is an object",
                           param=f"{where}.{i}")  # fmt: skip
        item = dict(given)
        kind = item.setdefault("type", "message" if "role" in item else None)
        if kind == "message":
            role, content = item.get("role"), item.get("content")
            if role not in _ROLES or not isinstance(content, str | list):
                raise ApiError(
                    400, "invalid_request",
                    f"{where}.{i}: a message has a role (user, assistant, system or developer) "
                    "and content", param=f"{where}.{i}",
                )  # fmt: skip
            if isinstance(content, str):
                part = "output_text" if role == "assistant" else "input_text"
                extra: dict[str, Any] = (
                    {"annotations": [], "logprobs": []} if role == "assistant" else {}
                )
                item["content"] = [{"type": part, "text": content, **extra}]
            item.setdefault("status", "completed")
        elif not isinstance(kind, str):
            raise ApiError(400, "invalid_request", f"{where}.{i}: an item needs a type",
                           param=f"{where}.{i}")  # fmt: skip
        if not isinstance(item.get("id"), str):
            item["id"] = new_id(_PREFIXES.get(kind, "item_"))
        items.append(item)
    return items


def replayable(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _listing(request: Request) -> tuple[int, str]:
    """`limit` (1-100, 20) and `order` (asc, or desc by default) of a list route."""
    params = request.query_params
    text = params.get("limit", "20")
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100:
        raise ApiError(400, "invalid_request", "limit: must be 1 to 100", param="limit")
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "invalid_request", "order: must be asc or desc", param="order")
    return int(text), order


def _page(items: Sequence[dict[str, Any]], request: Request) -> dict[str, Any]:
    """A page of `items` (oldest first), as OpenAI's lists: `limit`, `order`, `after`
    and `before` an item's id; `first_id`, `last_id`, `has_more`."""
    limit, order = _listing(request)
    ordered = list(items) if order == "asc" else list(reversed(items))
    after, before = request.query_params.get("after"), request.query_params.get("before")
    for cursor, mark in (("after", after), ("before", before)):
        if mark:
            at = next((i for i, item in enumerate(ordered) if item.get("id") == mark), None)
            if at is None:
                raise ApiError(
                    400, "invalid_request", f"{cursor}: no item {mark[:100]!r}", param=cursor
                )
            ordered = ordered[at + 1 :] if cursor == "after" else ordered[:at]
    page = ordered[-limit:] if before and not after else ordered[:limit]
    return _list(page, has_more=len(page) < len(ordered))


def _list(page: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": page,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
        "has_more": has_more,
    }


class _Store:
    """What is kept in the ledger's database, reached from its reader threads."""

    def __init__(self, ledger: Ledger, *, max_bytes: int, logger: logging.Logger) -> None:
        self.ledger = ledger
        self.mark = ledger.db.mark
        self.max_bytes = max_bytes  # the most a rebuilt history holds, as stored text
        self.logger = logger

    async def run(self, work: Callable[[Any], T]) -> T:
        """`work` on a connection of the ledger's database, in one of its reader threads;
        a database that fails is the contract's 503, never a traceback to the client."""
        try:
            return await self.ledger.reading(lambda: self.ledger.with_connection(work))
        except ApiError:
            raise
        except Exception as exc:
            self.logger.error(
                "the stored state could not be read or written",
                extra={"event": "state_failed", "error": type(exc).__name__},
            )
            raise ApiError(
                503, "store_unavailable", "The stored state cannot be reached; try again"
            ) from None

    def too_long(self, param: str) -> ApiError:
        return ApiError(
            400,
            "invalid_request",
            f"{param}: the conversation holds over {self.max_bytes // 1_000_000} MB, past "
            "what one call sends; start a new one with the input that matters",
            param=param,
        )


class Keeping:
    """One call whose answer is kept: stored as a response (`store`), added to a
    conversation, or both."""

    def __init__(
        self,
        state: Responses,
        owner: str,
        items: list[dict[str, Any]],
        *,
        store: bool,
        previous: str | None,
        conversation: str | None,
    ) -> None:
        self.state = state
        self.owner = owner
        self.items = items  # this call's input, each with its id
        self.store = store
        self.previous = previous
        self.conversation = conversation
        # Its id is ours, random, whatever the provider named it: a server that numbers
        # its responses, or names them all alike, cannot make two stored ones collide.
        self.id = new_id("resp_", 24)

    async def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        """A whole answer, kept when it completed, shown as kept; `store: false` if the
        database would not take it."""
        shown = self._shown(response)
        if shown.get("status") in ("completed", "incomplete"):
            if not await self.state.save(self, shown):
                shown["store"] = False
        return shown

    def _shown(self, response: dict[str, Any]) -> dict[str, Any]:
        shown = {**response, "id": self.id, "store": self.store,
                 "previous_response_id": self.previous}  # fmt: skip
        if self.conversation is not None:
            shown["conversation"] = {"id": self.conversation}
        return shown

    async def frames(self, frames: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """A stream's frames as they go, each that carries the response under our id,
        the last one's response kept before that frame is sent, so that a client that
        names it the moment it has it finds it."""
        try:
            async for frame in frames:
                if frame.startswith(_WHOLE):
                    head, _, data = frame.partition(b"\ndata: ")
                    event = jsonio.loads(data)
                    if isinstance(event, dict) and isinstance(event.get("response"), dict):
                        response = event["response"]
                        event["response"] = (
                            await self.answer(response)
                            if frame.startswith(_FINAL)
                            else self._shown(response)
                        )
                        frame = head + b"\ndata: " + jsonio.dumps(event) + b"\n\n"
                yield frame
        finally:
            await frames.aclose()


class Responses(_Store):
    """The stored responses of every key, and the calls that name a conversation."""

    def __init__(
        self, ledger: Ledger, *, max_bytes: int, logger: logging.Logger | None = None
    ) -> None:
        super().__init__(ledger, max_bytes=max_bytes, logger=logger or logging.getLogger())
        self.conversations = Conversations(ledger, max_bytes=max_bytes, logger=self.logger)

    async def expand(
        self, request: Request, data: dict[str, Any]
    ) -> tuple[dict[str, Any], Keeping | None]:
        """The body with its history (the turns `previous_response_id` names, or the
        items of its `conversation`) before its input, `store` taken out (a provider
        gets `false`); and what to keep of the call, if anything."""
        owner = owner_of(request)
        if any(k in data for k in ("store", "previous_response_id", "conversation")):
            data = dict(data)  # a new body, read again as it goes on
        store = data.pop("store", None) is not False
        previous = data.pop("previous_response_id", None)
        conversation = _conversation_id(data.pop("conversation", None))
        if previous is not None and conversation is not None:
            raise ApiError(400, "invalid_request", "conversation: cannot be used with "
                           "previous_response_id", param="conversation")  # fmt: skip
        items = as_items(data["input"])
        history: list[dict[str, Any]] | None = None
        if previous is not None:
            history = await self.history(owner, str(previous))
        elif conversation is not None:
            history = await self.conversations.history(owner, conversation)
        if history is not None:
            data["input"] = replayable(history + items)
        if not store and conversation is None:
            return data, None
        keeping = Keeping(self, owner, items, store=store, previous=previous,
                          conversation=conversation)  # fmt: skip
        return data, keeping

    # --- the database (each in a reader thread of the ledger) --------------------------

    async def save(self, call: Keeping, response: dict[str, Any]) -> bool:
        """Keep an answer (as a response, in its conversation) in one transaction; False
        (logged) if it could not be: the call was answered, and is not failed for it."""
        m = self.mark
        sql = (
            "INSERT INTO responses (id, key, created_at, previous_id, input, response) "
            f"VALUES ({m}, {m}, {m}, {m}, {m}, {m})"
        )
        values = (call.id, call.owner, time.time(), call.previous,
                  jsonio.dumps(call.items).decode(), jsonio.dumps(response).decode())  # fmt: skip
        added = call.items + [
            item if isinstance(item.get("id"), str) else {**item, "id": new_id("item_")}
            for item in _output(response)
        ]

        def work(conn: Any) -> None:
            with self.ledger.transaction(conn):
                if call.store:
                    conn.execute(sql, values)
                if call.conversation is not None:
                    self.conversations.append(conn, call.owner, call.conversation, added)

        try:
            await self.run(work)
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
                raise self.too_long("previous_response_id")
            turns.append((jsonio.loads(items), jsonio.loads(response)))
            at = previous
        turns.reverse()
        return turns

    async def history(self, owner: str, response_id: str) -> list[dict[str, Any]]:
        """Every item of the conversation up to and including `response_id`'s answer."""
        turns = await self.run(lambda conn: self._chain(conn, owner, response_id))
        if not turns:
            raise missing("Previous response", response_id, param="previous_response_id",
                          status=400)  # fmt: skip
        items: list[dict[str, Any]] = []
        for given, response in turns:
            items += given
            items += _output(response)
        return items

    # --- the routes --------------------------------------------------------------------

    async def get(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        owner = owner_of(request)
        m = self.mark
        sql = f"SELECT response FROM responses WHERE id = {m} AND key = {m}"
        found = await self.run(lambda conn: conn.execute(sql, (response_id, owner)).fetchone())
        if found is None:
            raise missing("Response", response_id)
        return Response(found[0], media_type="application/json")  # as it was stored

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        values = (response_id, owner_of(request))
        sql = f"DELETE FROM responses WHERE id = {self.mark} AND key = {self.mark}"
        if not await self.run(lambda conn: self.ledger.execute(conn, sql, values)):
            raise missing("Response", response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def input_items(self, request: Request) -> Response:
        """The items the response was made from: its history, then its own input."""
        response_id = request.path_params["response_id"]
        owner = owner_of(request)
        _listing(request)  # a bad parameter is a 400 before the database is asked
        turns = await self.run(lambda conn: self._chain(conn, owner, response_id))
        if not turns:
            raise missing("Response", response_id)
        items: list[dict[str, Any]] = []
        for i, (given, response) in enumerate(turns):
            items += given
            if i < len(turns) - 1:  # earlier answers are this one's input
                items += _output(response)
        return JSONResponse(_page(items, request))


def _conversation_id(value: Any) -> str | None:
    """`conversation` of a Responses body: an id, or {"id": ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_request", "conversation: an id, or an object with its id",
                       param="conversation")  # fmt: skip
    return value


Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


class ConversationBody(BaseModel):
    """POST /v1/conversations."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: Annotated[list[dict[str, Any]], Field(max_length=MAX_ADDED)] | None = None
    metadata: Metadata | None = None


class ConversationUpdate(BaseModel):
    """POST /v1/conversations/{id}: its metadata, replaced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    metadata: Metadata | None


class ItemsBody(BaseModel):
    """POST /v1/conversations/{id}/items."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_ADDED)]


class Conversations(_Store):
    """OpenAI's Conversations API: a key's conversations and their items, in order."""

    read: Reader | None = None  # the gateway's body reader, set when the routes are served

    # --- the database -------------------------------------------------------------------

    def _owned(self, conn: Any, owner: str, conversation: str) -> tuple[Any, ...]:
        """The conversation's row (id, created_at, metadata), or its 404."""
        m = self.mark
        found = conn.execute(
            f"SELECT id, created_at, metadata FROM conversations WHERE id = {m} AND key = {m}",
            (conversation, owner),
        ).fetchone()
        if found is None:
            raise missing("Conversation", conversation)
        return tuple(found)

    def append(self, conn: Any, owner: str, conversation: str, items: list[dict[str, Any]]) -> None:
        """Items after the conversation's last, inside the caller's transaction; the
        conversation's row is updated first, so that two writers (two replicas on
        PostgreSQL) take turns, and its use counts for its retention."""
        m = self.mark
        touched = conn.execute(
            f"UPDATE conversations SET used_at = {m} WHERE id = {m} AND key = {m}",
            (time.time(), conversation, owner),
        )
        if not touched.rowcount:
            raise missing("Conversation", conversation)
        last = conn.execute(
            f"SELECT MAX(position) FROM conversation_items WHERE conversation_id = {m}",
            (conversation,),
        ).fetchone()[0]
        start = int(last or 0) + 1
        conn.cursor().executemany(
            "INSERT INTO conversation_items (conversation_id, position, id, item) "
            f"VALUES ({m}, {m}, {m}, {m})",
            [(conversation, start + i, item["id"], jsonio.dumps(item).decode())
             for i, item in enumerate(items)],
        )  # fmt: skip

    def _items(self, conn: Any, owner: str, conversation: str, param: str) -> list[dict[str, Any]]:
        self._owned(conn, owner, conversation)
        rows = conn.execute(
            f"SELECT item FROM conversation_items WHERE conversation_id = {self.mark} "
            "ORDER BY position",
            (conversation,),
        )
        items, size = [], 0
        for (text,) in rows:
            size += len(text)
            if size > self.max_bytes:
                raise self.too_long(param)
            items.append(jsonio.loads(text))
        return items

    async def history(self, owner: str, conversation: str) -> list[dict[str, Any]]:
        """Every item of a conversation, oldest first, for a call that names it."""
        try:
            return await self.run(
                lambda conn: self._items(conn, owner, conversation, "conversation")
            )
        except ApiError as exc:
            if exc.status == 404:
                exc.param = "conversation"
            raise

    # --- the routes --------------------------------------------------------------------

    def _shown(self, row: tuple[Any, ...]) -> dict[str, Any]:
        conversation, created, metadata = row
        return {"id": conversation, "object": "conversation", "created_at": int(created),
                "metadata": jsonio.loads(metadata)}  # fmt: skip

    async def _body(self, request: Request, schema: type[BaseModel]) -> Any:
        assert self.read is not None
        return (await self.read(request, schema))[1]

    async def create(self, request: Request) -> Response:
        body: ConversationBody = await self._body(request, ConversationBody)
        owner, now = owner_of(request), time.time()
        items = as_items(body.items or [], "items")
        row = (new_id("conv_", 24), now, jsonio.dumps(body.metadata or {}).decode())
        m = self.mark

        def work(conn: Any) -> None:
            with self.ledger.transaction(conn):
                conn.execute(
                    "INSERT INTO conversations (id, key, created_at, used_at, metadata) "
                    f"VALUES ({m}, {m}, {m}, {m}, {m})",
                    (row[0], owner, now, now, row[2]),
                )
                if items:
                    self.append(conn, owner, row[0], items)

        await self.run(work)
        return JSONResponse(self._shown(row))

    async def get(self, request: Request) -> Response:
        conversation, owner = request.path_params["conversation_id"], owner_of(request)
        row = await self.run(lambda conn: self._owned(conn, owner, conversation))
        return JSONResponse(self._shown(row))

    async def update(self, request: Request) -> Response:
        body: ConversationUpdate = await self._body(request, ConversationUpdate)
        conversation, owner = request.path_params["conversation_id"], owner_of(request)
        m = self.mark
        sql = f"UPDATE conversations SET metadata = {m} WHERE id = {m} AND key = {m}"
        values = (jsonio.dumps(body.metadata or {}).decode(), conversation, owner)

        def work(conn: Any) -> tuple[Any, ...]:
            self.ledger.execute(conn, sql, values)
            return self._owned(conn, owner, conversation)

        return JSONResponse(self._shown(await self.run(work)))

    async def delete(self, request: Request) -> Response:
        conversation, owner = request.path_params["conversation_id"], owner_of(request)
        m = self.mark

        def work(conn: Any) -> None:
            with self.ledger.transaction(conn):
                gone = conn.execute(
                    f"DELETE FROM conversations WHERE id = {m} AND key = {m}", (conversation, owner)
                )
                if not gone.rowcount:
                    raise missing("Conversation", conversation)
                conn.execute(
                    f"DELETE FROM conversation_items WHERE conversation_id = {m}", (conversation,)
                )

        await self.run(work)
        return JSONResponse({"id": conversation, "object": "conversation.deleted", "deleted": True})

    async def list_items(self, request: Request) -> Response:
        conversation, owner = request.path_params["conversation_id"], owner_of(request)
        _listing(request)
        items = await self.run(lambda conn: self._items(conn, owner, conversation, "after"))
        return JSONResponse(_page(items, request))

    async def add_items(self, request: Request) -> Response:
        body: ItemsBody = await self._body(request, ItemsBody)
        conversation, owner = request.path_params["conversation_id"], owner_of(request)
        items = as_items(body.items, "items")

        def work(conn: Any) -> None:
            with self.ledger.transaction(conn):
                self.append(conn, owner, conversation, items)

        await self.run(work)
        return JSONResponse(_list(items, has_more=False))

    def _item_row(self, conn: Any, owner: str, conversation: str, item: str) -> Any:
        self._owned(conn, owner, conversation)
        m = self.mark
        found = conn.execute(
            f"SELECT item, position FROM conversation_items WHERE conversation_id = {m} "
            f"AND id = {m} ORDER BY position LIMIT 1",
            (conversation, item),
        ).fetchone()
        if found is None:
            raise missing("Item", item)
        return found

    async def get_item(self, request: Request) -> Response:
        conversation, owner = request.path_params["conversation_id"], owner_of(request)
        item = request.path_params["item_id"]
        found = await self.run(lambda conn: self._item_row(conn, owner, conversation, item))
        return Response(found[0], media_type="application/json")

    async def delete_item(self, request: Request) -> Response:
        """An item out of the conversation; the answer is the conversation, as OpenAI's."""
        conversation, owner = request.path_params["conversation_id"], owner_of(request)
        item = request.path_params["item_id"]
        m = self.mark

        def work(conn: Any) -> tuple[Any, ...]:
            with self.ledger.transaction(conn):
                position = self._item_row(conn, owner, conversation, item)[1]
                conn.execute(
                    "DELETE FROM conversation_items WHERE conversation_id = "
                    f"{m} AND position = {m}",
                    (conversation, position),
                )
                return self._owned(conn, owner, conversation)

        return JSONResponse(self._shown(await self.run(work)))


# --- Anthropic's message threads ------------------------------------------------------

# What a thread keeps from the turn that creates it: a turn that continues it leaves
# them out and gets them back (Anthropic's API answers the same).
THREAD_FIELDS = ("system", "tools")


def _thread(value: Any) -> tuple[str, str | None]:
    """`thread` of a Messages body: ("create", None) or ("continue", its message id)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "create" and set(value) == {"type"}:
        return "create", None
    previous = value.get("previous_message_id") if isinstance(value, dict) else None
    if kind == "continue" and set(value) == {"type", "previous_message_id"}:
        if isinstance(previous, str) and 0 < len(previous) <= 200:
            return "continue", previous
    raise bad("thread", '{"type": "create"}, or {"type": "continue", "previous_message_id": ...}')


def thread_not_found(message_id: str, why: str = "") -> ApiError:
    """Anthropic's 404 for a thread it cannot continue, which its SDKs recover from by
    sending the whole conversation again, creating a new thread."""
    return ApiError(
        404,
        "not_found",
        f"No thread was found for previous_message_id '{message_id[:100]}'{why}; send the "
        'whole conversation again with thread: {"type": "create"}.',
        param="thread.previous_message_id",
        details={"error_code": "thread_not_found"},
    )


class ThreadTurn:
    """One turn of a message thread: its new messages and, once answered, its reply,
    kept under an id of ours (random, whatever the provider named the message), the one
    the client continues from."""

    def __init__(
        self,
        threads: Threads,
        owner: str,
        thread_id: str,
        messages: list[Any],
        *,
        previous: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.threads = threads
        self.owner = owner
        self.thread_id = thread_id
        self.messages = messages
        self.previous = previous  # None: the turn that creates the thread...
        self.fields = fields  # ...with the fields the thread keeps
        self.id = new_id("msg_", 12)

    async def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        shown = {**response, "id": self.id}
        content = shown.get("content")
        if isinstance(content, list):
            await self.threads.save(self, {"role": "assistant", "content": content})
        return shown

    async def frames(self, frames: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """The frames as they go, the message under our id; the reply, put back together
        from them, kept before `message_stop` is sent, so that a client that continues
        the moment it has it finds it. A stream that breaks keeps nothing (the SDKs
        send the turn again)."""
        snapshot = Snapshot()
        bound = self.threads.max_bytes
        try:
            async for frame in frames:
                head, _, data = frame.partition(b"\ndata: ")
                if head == b"event: message_start":
                    event = jsonio.loads(data)
                    if isinstance(event, dict) and isinstance(event.get("message"), dict):
                        event["message"]["id"] = self.id
                        frame = head + b"\ndata: " + jsonio.dumps(event) + b"\n\n"
                elif head.startswith(b"event: content_block") and snapshot.size <= bound:
                    event = jsonio.loads(data)
                    if isinstance(event, dict):
                        snapshot.feed(event)
                elif head == b"event: message_stop":
                    if snapshot.size <= bound:
                        await self.threads.save(self, snapshot.reply())
                    else:
                        self.threads.logger.warning(
                            "a thread's reply past the history bound was not kept",
                            extra={"event": "thread_not_kept", "size": snapshot.size},
                        )
                yield frame
        finally:
            await frames.aclose()


class Threads(_Store):
    """Anthropic's message threads, kept whatever the provider: a thread (the fields it
    keeps) and its turns (each's new messages and reply), owned by the key that made it."""

    async def expand(
        self, request: Request, data: dict[str, Any]
    ) -> tuple[dict[str, Any], Keeper | None]:
        """A body with `thread` as the provider is to get it: without `thread`, and, for
        a turn that continues one, with the thread's fields and every earlier message;
        `data` itself for a body without one."""
        if data.get("thread") is None:
            return data, None
        kind, previous = _thread(data["thread"])
        owner = owner_of(request)
        data = {k: v for k, v in data.items() if k != "thread"}
        messages = list(data.get("messages") or ())
        if previous is None:
            fields = {k: data[k] for k in THREAD_FIELDS if data.get(k) is not None}
            return data, ThreadTurn(self, owner, new_id("thread_", 12), messages, fields=fields)
        found = await self.run(lambda conn: self._chain(conn, owner, previous))
        if found is None:
            raise thread_not_found(previous)
        thread_id, fields, history = found
        changed = [k for k in THREAD_FIELDS if data.get(k) is not None and data[k] != fields.get(k)]
        if changed:
            raise ApiError(
                400,
                "invalid_request",
                f"{' and '.join(changed)}: differs from what the thread was created with; "
                'leave it out, or send the whole conversation with thread: {"type": "create"}',
                param=changed[0],
                details={"error_code": "thread_fingerprint_mismatch"},
            )
        data.update(fields)
        data["messages"] = history + messages
        return data, ThreadTurn(self, owner, thread_id, messages, previous=previous)

    # --- the database (each in a reader thread of the ledger) --------------------------

    def _chain(
        self, conn: Any, owner: str, message_id: str
    ) -> tuple[str, dict[str, Any], list[Any]] | None:
        """(thread id, its fields, every message up to and including `message_id`'s
        reply), or None: no such message of this key's. The thread's turns are read in
        one query (a thread of thousands of turns is not thousands of round trips), up
        to the history bound."""
        m = self.mark
        found = conn.execute(
            "SELECT t.id, t.fields FROM thread_messages s JOIN threads t ON t.id = s.thread_id "
            f"WHERE s.id = {m} AND t.key = {m}",
            (message_id, owner),
        ).fetchone()
        if found is None:
            return None
        thread_id, fields = found
        rows = conn.execute(
            f"SELECT id, previous_id, messages, reply FROM thread_messages WHERE thread_id = {m}",
            (thread_id,),
        )
        turns: dict[str, tuple[str | None, str, str]] = {}
        size = len(fields)
        for ident, previous, messages, reply in rows:
            size += len(messages) + len(reply)
            if size > self.max_bytes:
                raise self.too_long("thread")
            turns[ident] = (previous, messages, reply)
        chain = []
        at: str | None = message_id
        while at is not None:
            turn = turns.pop(at, None)  # popped: a loop in the rows ends here
            if turn is None:
                return None
            chain.append(turn)
            at = turn[0]
        history: list[Any] = []
        for _, messages, reply in reversed(chain):
            history += jsonio.loads(messages)
            history.append(jsonio.loads(reply))
        return thread_id, jsonio.loads(fields), history

    async def save(self, turn: ThreadTurn, reply: dict[str, Any]) -> None:
        """Keep a turn (and, for the first, its thread) in one transaction. One that
        cannot be kept is logged and the call answered: the next turn finds no thread
        (a 404 `thread_not_found`), and the SDKs send the whole conversation again."""
        m, now = self.mark, time.time()
        row = (turn.id, turn.thread_id, now, turn.previous,
               jsonio.dumps(turn.messages).decode(), jsonio.dumps(reply).decode())  # fmt: skip

        def work(conn: Any) -> None:
            with self.ledger.transaction(conn):
                if turn.fields is not None:
                    conn.execute(
                        "INSERT INTO threads (id, key, created_at, used_at, fields) "
                        f"VALUES ({m}, {m}, {m}, {m}, {m})",
                        (turn.thread_id, turn.owner, now, now, jsonio.dumps(turn.fields).decode()),
                    )
                elif not conn.execute(
                    f"UPDATE threads SET used_at = {m} WHERE id = {m} AND key = {m}",
                    (now, turn.thread_id, turn.owner),
                ).rowcount:
                    return  # deleted meanwhile (its retention): nothing to add to
                conn.execute(
                    "INSERT INTO thread_messages (id, thread_id, created_at, previous_id, "
                    f"messages, reply) VALUES ({m}, {m}, {m}, {m}, {m}, {m})",
                    row,
                )

        try:
            await self.run(work)
        except ApiError:
            pass  # logged


class Unthreaded:
    """Threads when nothing is kept (STORE_STATE=false or LEDGER_URL=off): refused as
    Anthropic's API refuses what it cannot thread, in the errors its SDKs recover from
    (their tool runner goes on without a thread, sending the whole conversation)."""

    _WHY = " (this service keeps no threads: STORE_STATE=false or LEDGER_URL=off)"

    async def expand(
        self, request: Request, data: dict[str, Any]
    ) -> tuple[dict[str, Any], Keeper | None]:
        if data.get("thread") is None:
            return data, None
        kind, previous = _thread(data["thread"])
        if previous is not None:
            raise thread_not_found(previous, self._WHY)
        raise ApiError(
            400,
            "invalid_request",
            f"thread: not supported{self._WHY}; send the whole conversation without it.",
            param="thread",
            details={"error_code": "thread_unsupported_request"},
        )


def routes(responses: Responses | None, read: Reader) -> list[tuple[str, Any, str]]:
    """The routes of the stored state: (path, function, method). With nothing stored
    (STORE_STATE=false or LEDGER_URL=off), the same routes answer a 404 (a 400 to
    create) that says why, as a client of OpenAI's API recovers from."""
    if responses is None:
        r: Any = _Unkept()
        c: Any = r
    else:
        r, c = responses, responses.conversations
        c.read = read
    conversation, item = "/v1/conversations/{conversation_id}", "/items/{item_id}"
    return [
        ("/v1/responses/{response_id}", r.get, "GET"),
        ("/v1/responses/{response_id}", r.delete, "DELETE"),
        ("/v1/responses/{response_id}/input_items", r.input_items, "GET"),
        ("/v1/conversations", c.create, "POST"),
        (conversation, c.get, "GET"),
        (conversation, c.update, "POST"),
        (conversation, c.delete, "DELETE"),
        (conversation + "/items", c.list_items, "GET"),
        (conversation + "/items", c.add_items, "POST"),
        (conversation + item, c.get_item, "GET"),
        (conversation + item, c.delete_item, "DELETE"),
    ]


class _Unkept:
    """Every route of the stored state when nothing is stored."""

    _WHY = "(This service stores nothing: STORE_STATE=false or LEDGER_URL=off.)"

    async def get(self, request: Request) -> Response:
        params = request.path_params
        what, ident = (
            ("Response", params["response_id"]) if "response_id" in params
            else ("Conversation", params["conversation_id"])
        )  # fmt: skip
        raise ApiError(404, "not_found", f"{what} with id '{ident[:100]}' not found. {self._WHY}")

    async def create(self, request: Request) -> Response:
        raise ApiError(400, "invalid_request", f"Conversations are not kept. {self._WHY}")

    delete = input_items = update = list_items = add_items = get_item = delete_item = get
