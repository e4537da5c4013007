"""Server-Sent Events in: a provider's `text/event-stream`, parsed as the HTML spec
says, in linear time and bounded memory whatever the provider sends.

A line is held until its newline comes, as pieces (never copied again on each read),
and no event may grow past `max_bytes`: a provider that never sends a newline, or
one endless `data:` line, is an error once it passes the bound, not memory without
end. A provider that trickles bytes without ever finishing an event is timed out
after `idle_s`, which a per-read timeout alone would never do.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable


class StreamTooLarge(Exception):
    """An event (or one line of it) passed the bound."""


class StreamStalled(Exception):
    """Bytes kept coming, but no event (nor comment) was finished for `idle_s`."""


async def sse_events(
    chunks: AsyncIterator[bytes],
    *,
    max_bytes: int,
    idle_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each event of a text/event-stream.

    Lines end with LF or CRLF. A bare CR inside a line is kept (the spec would end
    the line there): it can only stand as whitespace between JSON tokens, and
    splitting on it would break JSON that arrived whole. A comment line counts as
    progress for `idle_s`, as servers send them as keep-alives while a model thinks.
    """
    event = ""
    data: list[str] = []
    size = 0  # bytes of the event's finished lines
    pieces: list[bytes] = []  # the unfinished line
    held = 0  # bytes in `pieces`
    last = clock()
    progressed = False
    async for chunk in chunks:
        start = 0
        end = chunk.find(b"\n")
        while end >= 0:
            if pieces:
                pieces.append(chunk[start:end])
                raw = b"".join(pieces)
                pieces, held = [], 0
            else:
                raw = chunk[start:end]
            start = end + 1
            end = chunk.find(b"\n", start)
            if raw.startswith(b"data:"):  # nearly every line: no decoding of the rest
                value = raw[6:] if raw.startswith(b"data: ") else raw[5:]
                data.append(value.rstrip(b"\r").decode("utf-8", "replace"))
                size += len(raw)
                if size > max_bytes:
                    raise StreamTooLarge(f"an event of the stream is over {max_bytes} bytes")
                continue
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data:
                    yield event or "message", data[0] if len(data) == 1 else "\n".join(data)
                    progressed = True
                event, data, size = "", [], 0
                continue
            if line.startswith(":"):
                progressed = True
                continue
            size += len(raw)
            name, _, value_text = line.partition(":")
            if name == "event":
                event = value_text[1:] if value_text.startswith(" ") else value_text
            elif name == "data":  # "data" alone: an empty line of data
                data.append(value_text)
        if start < len(chunk):
            pieces.append(chunk[start:] if start else chunk)
            held += len(chunk) - start
        if size + held > max_bytes:
            raise StreamTooLarge(f"an event of the stream is over {max_bytes} bytes")
        now = clock()
        if progressed:
            last, progressed = now, False
        elif now - last > idle_s:
            raise StreamStalled(f"the stream finished no event for {idle_s:g} s")
    if pieces:
        name, _, text = b"".join(pieces).rstrip(b"\r").decode("utf-8", "replace").partition(":")
        if name == "data":
            data.append(text[1:] if text.startswith(" ") else text)
    if data:
        yield event or "message", "\n".join(data)
