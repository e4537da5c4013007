"""The connection, before any of the app: uvicorn's httptools protocol with bounds on a
request's head, and the contract's JSON for what uvicorn answers itself.

A departure from uvicorn's own protocol, because httptools has no limit on header bytes
and uvicorn no header timeout: connections holding megabytes of unfinished headers
each, or sending a byte now and then, are held as long as they like. Served as
`python server.py` serves it (`--http protocol:BoundedHttpTools` to uvicorn),

a head (request line and headers) over MAX_HEADER_BYTES is answered 431 and the
connection closed, and one not finished within HEADER_TIMEOUT_S of its first byte (or
of the connection, for a connection that sends nothing) is answered 408, or just
closed. One timer a second per server looks at every connection, rather than one
timer a request. uvicorn's own "Invalid HTTP request" 400 gets the error shape too.
(The overrides are few on purpose: each is a Python call a request.)

An HTTP/1.0 client cannot read chunked encoding, which uvicorn uses for any answer
without a Content-Length (a stream): its answer is delimited by the connection's
close instead, as HTTP/1.0 does.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

import jsonio
from config import Settings, SettingsError

_STATUS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
LINGER_S = 2.0
_sweeps: dict[int, asyncio.TimerHandle] = {}  # by id() of the server's state: one a server


def _limits() -> tuple[int, float]:
    """MAX_HEADER_BYTES and HEADER_TIMEOUT_S, as the app's settings read them; a bad
    value stops the app's own start with one line, so here the defaults do."""
    try:
        settings = Settings.from_env()
    except SettingsError:
        settings = Settings()
    return settings.max_header_bytes, settings.header_timeout_s


class BoundedHttpTools(HttpToolsProtocol):
    limits: tuple[int, float] | None = None  # read once, by the first connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if BoundedHttpTools.limits is None:
            BoundedHttpTools.limits = _limits()
        self.max_head_bytes, self.head_timeout_s = BoundedHttpTools.limits
        self._head_since: float | None = None  # while a head is awaited or arriving
        self._head_bytes = 0  # bytes fed to the parser since the head began, at most
        self._feeding = 0  # bytes of the read being parsed
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_since = self.loop.time()
        if id(self.server_state) not in _sweeps:
            _sweep(self.server_state, self.loop, self.head_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._feeding = len(data)
        super().data_received(data)
        if self._head_since is not None and not self._refused:
            # Every byte fed while the head is unfinished belongs to it (or, for a
            # pipelined request, to the tail of the one before: a bound, not a count).
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, "headers_too_large", self._too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_since = self.loop.time()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_since = None
        if self._refused:
            return
        if self._head_bytes + self._feeding > self.max_head_bytes and self._head_size() > (
            self.max_head_bytes
        ):  # a head that came whole in a large read: measured, once
            self._refuse(431, "headers_too_large", self._too_large())
            return
        super().on_headers_complete()
        cycle = self.cycle  # none made for an upgrade (a WebSocket) uvicorn took on
        if self.scope["http_version"] == "1.0" and cycle is not None and cycle.scope is self.scope:
            _close_delimited(cycle)

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            self._refuse(400, "invalid_http", "the request is not valid HTTP/1.1")

    def head_overdue(self, now: float) -> bool:
        return self._head_since is not None and now - self._head_since > self.head_timeout_s

    def head_timed_out(self) -> None:
        if self._head_bytes or self.cycle is not None:
            message = f"the request's head did not arrive within {self.head_timeout_s:g} s"
            self._refuse(408, "request_timeout", message)
        else:
            self._refused = True  # a connection that never said anything: just close it
            self.transport.close()

    def _too_large(self) -> str:
        return f"the request's head is over {self.max_head_bytes} bytes"

    def _refuse(self, status: int, type_: str, message: str) -> None:
        """Answer in the contract's error shape, and close the connection."""
        self._refused = True
        self._head_since = None
        rid = os.urandom(16).hex()
        body = jsonio.dumps({"error": {"type": type_, "message": message, "request_id": rid}})
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _STATUS[status]),
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + rid.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        if not self.transport.is_closing():
            self.transport.write(b"".join(head) + body)
            # A lingering close: the answer, then our end shut, and what the client
            # still sends read and dropped for a moment. Closing with its bytes unread
            # would reset the connection, and the client might never see the answer.
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()


def _close_delimited(cycle: Any) -> None:
    """The cycle's answer without chunked encoding: its body as it comes, then the
    connection closed (uvicorn keeps no HTTP/1.0 connection alive)."""
    send = cycle.send

    async def send_unchunked(message: Any) -> None:
        if message["type"] == "http.response.start":
            framed = any(
                name.lower() in (b"content-length", b"transfer-encoding")
                for name, _ in message.get("headers", ())
            )
            if not framed and cycle.scope["method"] != "HEAD":
                cycle.chunked_encoding = False  # uvicorn adds no Transfer-Encoding then
                cycle.expected_content_length = 1 << 62  # and counts none down
                cycle.close_delimited = True
        elif getattr(cycle, "close_delimited", False) and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))  # the end
        await send(message)

    cycle.send = send_unchunked


def _sweep(state: ServerState, loop: asyncio.AbstractEventLoop, every_s: float) -> None:
    """Once a second while there are connections: time out the heads that are late."""
    now = loop.time()
    for connection in list(state.connections):
        if isinstance(connection, BoundedHttpTools) and connection.head_overdue(now):
            connection.head_timed_out()
    if state.connections:
        _sweeps[id(state)] = loop.call_later(min(1.0, every_s), _sweep, state, loop, every_s)
    else:
        _sweeps.pop(id(state), None)
