"""The one serving path of every model route.

A route is a client format (a `Dialect` of dialects/) and an operation; whatever the
pair, a call goes the same way, once:

    read the body (bounded) and parse it once: the dict is what passes through
    validate it against the dialect's schema, choose the model (403)
    decode it into `chat` (400 for what no provider could take)
    admit it: reserve its worst case under the key's limits (429), get a ticket
    call the deployments of the model, one after another on failure (deployments.py):
        the provider speaks the client's format  -> the body passes through
        else                                      -> translated through `chat`
    respond: one JSON body, or SSE once the first frame is ready
    settle the ticket with the provider's counts (or an estimate); note the access line

Every rule on the way (the cap on a stream's output, the accounting of a stream the
client left, what of the client's headers go upstream, a provider's refusal returned
as it came) is here, the same for every route; the dialects only say how their format
reads and writes. Provider keys are masked on the way out by redaction.py, whatever
made the bytes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

import admission
import chat
import jsonio
import llm
from admission import Admission, Ticket, invalid_body, note, since_ms
from config import UPSTREAM_CHOICES
from deployments import Deployments
from dialects import Decoded, Dialect, Encoder, Passthrough, Relay, bad, integer, json_object
from dialects import anthropic_messages as messages_format
from errors import ApiError, ProviderError, request_id
from jsonio import JSONResponse
from llm import HttpProvider, Provider
from requestlog import CALL
from sse import EventStream, Streams
from stored import Keeper, State
from usage import Usage

# Headers naming the client's session, kept in the access line (Claude Code's).
SESSION_HEADERS = ("x-claude-code-session-id",)


@dataclass(frozen=True)
class Gateway:
    """What the serving path uses of the app, made once by `create_app`: nothing is
    looked up in `app.state` on the way."""

    admission: Admission
    deployments: Deployments
    streams: Streams
    # The state the dialects keep (stored.py), by the name a `Dialect.keeps` gives: none
    # for a kind the store does not keep, whose dialect refuses what would need it.
    states: Mapping[str, State] = dataclasses.field(default_factory=dict)

    def route(self, dialect: Dialect, op: str) -> Callable[[Request], Awaitable[Response]]:
        """The route function of `dialect` for `op` ("chat" or "embeddings")."""

        async def serve(request: Request) -> Response:
            return await self.serve(request, dialect, op)

        serve.__name__ = f"{dialect.wire}_{op}"
        return serve

    # --- down: read, validate, decode, admit ---------------------------------------

    async def read(self, request: Request, schema: type[BaseModel]) -> tuple[dict[str, Any], Any]:
        """The body parsed once (the dict passes through as it is) and validated."""
        raw = await self.admission.read_body(request)
        try:
            data = jsonio.loads(raw)
        except ValueError as exc:
            # "number out of range at line 1 column 4329", "EOF while parsing...": what is
            # wrong, and where (a 5,000-digit integer is valid JSON that no parser takes).
            message = f"the body is not valid JSON (UTF-8): {exc}"
            raise ApiError(400, "invalid_json", message) from None
        return data, validated(data, schema)

    async def serve(self, request: Request, dialect: Dialect, op: str) -> Response:
        gate = self.admission
        data, body = await self.read(request, dialect.body)
        keeping = None
        state = self.states.get(dialect.keeps) if dialect.keeps else None
        if state is not None:
            # The earlier turns it names, from the store, before anything reads it.
            expanded, keeping = await state.expand(request, data)
            if expanded is not data:  # read again, as it goes on
                data, body = expanded, validated(expanded, dialect.body)
        model = gate.choose_model(request, getattr(body, "model", None))
        rid = request_id(request.scope)
        decoded = dialect.decode(body, model, rid)
        if decoded.refused is not None:
            if not self.deployments.takes(model, dialect.wire):
                raise decoded.refused
            # Counted by its length: only a provider that reads it itself will.
            text = jsonio.dumps(data).decode()
            decoded = Decoded(
                chat.user_text(text, model=model, request_id=rid), [], decoded.refused
            )
        for name in SESSION_HEADERS:
            session = request.headers.get(name)
            if session:
                note(request, session=session[:128])
        ticket = await gate.admit(request, decoded.request)
        stream = dialect.streams(body)

        async def attempt(provider: Provider, upstream: str) -> Response:
            ticket.upstream = upstream
            relay = llm.passthrough(provider, dialect.wire)
            if relay is not None and dialect.passthrough is not None:
                sent = {**data, "model": upstream}
                return await self._passed_through(
                    request, ticket, relay, dialect, sent, body, stream, keeping
                )
            if op == "embeddings":
                assert decoded.embeddings is not None
                asked = decoded.embeddings
                vectors = await gate.call(
                    request, provider.embed(dataclasses.replace(asked, model=upstream))
                )
                usage = Usage(input_tokens=vectors.input_tokens)
                cost = ticket.settle(vectors.model, usage, "stop")
                return JSONResponse(dialect.answer(vectors, body, decoded.request, cost))
            translated = decoded.translated(provider.name, upstream)
            if translated.reasoning is not None and gate.prices.reasons(upstream) is False:
                # A model that does not reason refuses the setting (OpenAI's gpt-4.1 and
                # gpt-4o, Claude 3.5): it goes, named in the access line.
                translated = dataclasses.replace(
                    translated, reasoning=None, dropped=(*translated.dropped, "reasoning")
                )
            if translated.dropped:
                note(request, dropped=list(translated.dropped))
            if stream:
                assert dialect.encoder is not None
                encoder = dialect.encoder(body, translated)
                frames = _translated(ticket, provider.stream(translated), encoder)
                if keeping is not None:
                    frames = keeping.frames(frames)
                return await self._respond(request, ticket, frames, encoder)
            completion = await gate.call(request, provider.complete(translated))
            cost = ticket.finish(completion)
            answer = dialect.answer(completion, body, translated, cost)
            if keeping is not None:
                answer = await keeping.answer(answer)
            return JSONResponse(answer)

        try:
            return await self.deployments.run(
                model,
                attempt,
                fallback=dialect.fallback,
                noted=request.scope.get(CALL),
                as_is=decoded.as_is(dialect.wire),
            )
        except ClientDisconnect:
            ticket.left()  # billed the prompt, as the provider bills it
            raise
        except ProviderError as exc:
            # After every deployment was tried: the last one's own refusal, as it came,
            # for a format that returns them so.
            response = verbatim(exc, dialect)
            if response is None:
                raise
            return response

    # --- passed through ---------------------------------------------------------------

    async def _passed_through(
        self,
        request: Request,
        ticket: Ticket,
        provider: HttpProvider,
        dialect: Dialect,
        data: dict[str, Any],
        body: Any,
        stream: bool,
        keeping: Keeper | None = None,
    ) -> Response:
        """The client's body to a provider of its own format, the answer as it came but
        for what the accounting and the cap need (and, to be stored, shown as stored)."""
        hooks = dialect.passthrough
        assert hooks is not None
        for field in UPSTREAM_CHOICES:
            # Passed through, they would let a key reach models its allowlist and budget
            # do not cover: only to a deployment that lets them through (allow_fields).
            if field in data and field not in provider.allows:
                raise bad(
                    field, "chooses models or routes at the provider, which this service does"
                )
        hooks.prepare(data)
        rid = request_id(request.scope)
        headers = forwarded(request, hooks)
        query = forwarded_query(request, hooks)
        path = provider.paths[dialect.wire]
        if not stream or hooks.relay is None:
            call = provider.post_raw(data, rid, headers, path=path, query=query,
                                     scale=hooks.scale)  # fmt: skip
            raw = await self.admission.call(request, call)
            read = hooks.raw(raw) if hooks.raw is not None and keeping is None else None
            if read is not None:  # accounted without a parse: the bytes go as they came
                usage = read.usage or ticket.estimate(0)
                ticket.settle(read.model or str(data["model"]), usage, read.finish)
                return Response(raw, media_type="application/json")
            answer = json_object(raw)
            accounted = hooks.accounted(answer)
            usage = accounted.usage or ticket.estimate(chat.estimate_tokens(accounted.text))
            ticket.settle(accounted.model or str(data["model"]), usage, accounted.finish)
            if keeping is not None:
                answer = await keeping.answer(answer)
            return JSONResponse(answer)
        relay = hooks.relay(data, body, ticket.call)
        events = provider.open_stream(data, rid, headers, path=path, query=query)
        frames = _relayed(ticket, events, relay)
        if keeping is not None:
            frames = keeping.frames(frames)
        return await self._respond(request, ticket, frames, relay.encoder)

    # --- respond ----------------------------------------------------------------------

    async def _respond(
        self,
        request: Request,
        ticket: Ticket,
        frames: AsyncGenerator[bytes, None],
        encoder: Encoder,
    ) -> Response:
        """The stream of `frames`, answered once the first is ready: provider errors
        before it propagate as exceptions, for the HTTP error handlers (or the next
        deployment). It holds a slot of MAX_INFLIGHT from its first frame to its last,
        and is dropped if the client leaves meanwhile (`ClientDisconnect`)."""
        inflight = self.admission.inflight
        inflight.take()
        started = time.perf_counter()
        try:
            first = await admission.unless_disconnected(request.receive, anext(frames))
        except BaseException:
            inflight.give()
            await frames.aclose()
            raise
        ticket.accepted = True  # its first event: a stream cut from now on bills the prompt
        note(request, ttft_ms=since_ms(started))
        return EventStream(self.streams, request, first, frames, encoder, inflight.give)

    # --- count_tokens ---------------------------------------------------------------

    async def count_tokens(self, request: Request) -> Response:
        """Anthropic's own count when the provider speaks its format (and has the route:
        vLLM, Ollama and llama.cpp answer 404), else an estimate, four characters a
        token over system, messages and tools. Never a 404, never 0 (a 0 turns Claude
        Code's automatic compaction off); no reservation."""
        gate = self.admission
        dialect = messages_format.DIALECT
        hooks = dialect.passthrough
        assert hooks is not None
        data, body = await self.read(request, messages_format.CountTokensBody)
        model = gate.choose_model(request, body.model)
        rid = request_id(request.scope)

        async def attempt(provider: Provider, upstream: str) -> Response | None:
            """The provider's own count, or None: it has none (the estimate will do)."""
            relay = llm.passthrough(provider, dialect.wire)
            if relay is None:
                return None
            sent = {**data, "model": upstream}
            call = relay.post(sent, rid, forwarded(request, hooks), path=messages_format.COUNT_PATH,
                              query=forwarded_query(request, hooks))  # fmt: skip
            try:
                answer = await gate.call(request, call)
            except ProviderError as exc:
                if exc.answer is not None and exc.answer[0] == 404:
                    return None  # a server without the route
                raise
            return JSONResponse(answer) if integer(answer.get("input_tokens")) > 0 else None

        try:
            # Like any call: a deployment cooling down is passed over, a failing one
            # fails over to the next.
            counted = await self.deployments.run(model, attempt, noted=request.scope.get(CALL))
        except ProviderError as exc:
            response = verbatim(exc, dialect)
            if response is None:
                raise
            return response
        if counted is not None:
            return counted
        estimate = chat.input_estimate(messages_format.decode_request(body, model, None).request)
        return JSONResponse({"input_tokens": max(1, estimate)})


def validated(data: Any, schema: type[BaseModel]) -> Any:
    """The parsed body as `schema` (strict, as JSON is): 422 naming each field."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise invalid_body(exc) from None


def forwarded(request: Request, hooks: Passthrough) -> dict[str, str]:
    """What of the client's headers goes to a provider of its format: those the format
    names (Anthropic's version and beta flags), never its credentials."""
    headers = {}
    for name in hooks.headers:
        value = request.headers.get(name)
        if value and hooks.own:  # a beta flag of what is done here is not the provider's
            value = ",".join(
                flag for flag in value.split(",") if flag.strip() and flag.strip() not in hooks.own
            )
        if value:
            headers[name] = value
    return headers


def forwarded_query(request: Request, hooks: Passthrough) -> str | None:
    """What of the client's query string goes to a provider of its format: the
    parameters the format names (Anthropic's `beta`), nothing else."""
    if not hooks.query or not request.scope.get("query_string"):
        return None
    kept = [(k, v) for k, v in request.query_params.multi_items() if k in hooks.query]
    return urlencode(kept) if kept else None


def verbatim(exc: ProviderError, dialect: Dialect) -> Response | None:
    """A provider's own refusal in the client's format, its status and words as they
    were, but for our own key being refused, which is ours to say (a 502)."""
    hooks = dialect.passthrough
    if hooks is None or not hooks.verbatim:
        return None
    if exc.answer is None or exc.wire != dialect.wire or exc.answer[0] in (401, 403):
        return None
    status, raw = exc.answer
    return Response(raw, status_code=status, media_type="application/json")


# --- the two relays: translated, and passed through --------------------------------------


async def _translated(
    ticket: Ticket, events: AsyncGenerator[chat.Event, None], encoder: Encoder
) -> AsyncGenerator[bytes, None]:
    """A provider's events as a client's frames, accounted: the ticket settles at the
    end, or with what was sent when the stream is cut short, and a stream that runs
    past its max tokens is stopped here (its provider call closed) and ends as length."""
    model = ticket.model
    try:
        async for event in events:
            if isinstance(event, chat.Delta | chat.Unread):
                counted = (
                    ticket.passes(event.size)
                    if isinstance(event, chat.Unread)
                    else ticket.counts(event)
                )
                if not counted:
                    end = chat.End("length", ticket.estimate(ticket.sent))
                    cost = ticket.settle(model, end.usage, end.finish_reason)
                    for piece in encoder.last(end, model, cost):
                        yield piece
                    return
                if isinstance(event, chat.Unread):
                    continue  # no client format carries it
            elif isinstance(event, chat.End):
                cost = ticket.settle(model, event.usage, event.finish_reason)
                for piece in encoder.last(event, model, cost):
                    yield piece
                return
            elif isinstance(event, chat.Start):
                model = event.model or model
            for piece in encoder.frames(event):
                yield piece
    finally:
        await events.aclose()
        ticket.close()


async def _relayed(
    ticket: Ticket,
    stream: AbstractAsyncContextManager[AsyncIterator[tuple[str, str]]],
    relay: Relay,
) -> AsyncGenerator[bytes, None]:
    """A provider's events passed through: each read by the dialect's `Relay` (the
    frame for the client, the deltas it carries), counted against the cap (past it,
    the relay's own end), and settled with the provider's usage at the end, or an
    estimate of what was sent."""
    try:
        async with stream as events:
            async for name, text in events:
                step = relay.read(name, text)
                counted = all(ticket.counts(delta) for delta in step.deltas)
                if not counted or (step.more and not all(map(ticket.passes, step.more))):
                    for piece in relay.cut(ticket.sent):
                        yield piece
                    ticket.settle(relay.model, ticket.estimate(ticket.sent), "length")
                    for piece in relay.tail():
                        yield piece
                    return
                for piece in step.lead:
                    yield piece
                if step.frame is not None:
                    yield step.frame
                if step.failed:
                    return  # the provider's own error, relayed: the stream ends there
                if step.last:
                    break
        end = relay.end()
        if end is None:
            raise ProviderError("the provider's stream ended before the answer was complete")
        usage = end.usage or ticket.estimate(ticket.sent)
        ticket.settle(end.model or relay.model, usage, end.finish)
        for piece in relay.tail():
            yield piece
    finally:
        ticket.close()
