"""The SSE parser for providers' streams: the spec's framing however the bytes are
split, and bounds on what a provider can make it hold or how long it can stall it."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Iterable

import pytest

from sse import StreamStalled, StreamTooLarge, sse_events

pytestmark = pytest.mark.anyio

SSE_CASES = (
    b': a comment\r\nevent: usage\r\ndata: {"a": 1}\r\n\r\n'
    b"data:x\ndata\ndata:  two\n\n"
    b"event: ping\n\n"
    b"data: \xc3\xa9t\xc3\xa9\n\ndata: [DONE]"
)


async def reads(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def parse(pieces: Iterable[bytes], **bounds: float) -> list[tuple[str, str]]:
    options = {"max_bytes": 1 << 20, "idle_s": 60.0, **bounds}
    return [e async for e in sse_events(reads(pieces), **options)]  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1, 2, 7, len(SSE_CASES)])
async def test_sse_events_follow_the_spec_however_the_bytes_are_split(size: int) -> None:
    pieces = [SSE_CASES[start : start + size] for start in range(0, len(SSE_CASES), size)]
    assert await parse(pieces) == [
        ("usage", '{"a": 1}'),  # CRLF lines; the comment skipped
        ("message", "x\n\n two"),  # no space after the colon; "data" alone; one space taken
        ("message", "\u00e9t\u00e9"),  # an event with no data is no event; UTF-8 split across reads
        ("message", "[DONE]"),  # the last event needs no blank line
    ]


async def test_a_bare_cr_inside_a_data_line_is_kept_with_its_line() -> None:
    assert await parse([b'data: {"a": 1,\r"b": 2}\r\n\r\n']) == [("message", '{"a": 1,\r"b": 2}')]


async def test_a_line_that_never_ends_is_refused_once_past_the_bound() -> None:
    endless = (b"x" * 1000 for _ in range(10_000))  # 10 MB, no newline
    with pytest.raises(StreamTooLarge):
        await parse([b"data: ", *endless], max_bytes=1 << 20)


async def test_an_event_of_many_lines_is_bounded_as_a_whole() -> None:
    lines = (b"data: " + b"y" * 1000 + b"\n" for _ in range(2000))  # 2 MB, no blank line
    with pytest.raises(StreamTooLarge):
        await parse(lines, max_bytes=1 << 20)


async def test_a_long_line_in_small_pieces_is_parsed_in_linear_time() -> None:
    # 8 MB in 256-byte reads: joining the unfinished line again on every read (as the
    # parser once did) copies about a terabyte, which would never finish here.
    pieces = [b"data: "] + [b"z" * 256] * 32_768 + [b"\n\n"]
    events = await asyncio.wait_for(parse(pieces, max_bytes=16 << 20), timeout=30)
    assert len(events) == 1 and len(events[0][1]) == 8 << 20


async def test_one_huge_read_of_small_events_costs_the_parser_little_memory() -> None:
    chunk = b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n' * 200_000  # 10 MB
    tracemalloc.start()
    try:
        count = 0
        async for _ in sse_events(reads([chunk]), max_bytes=1 << 20, idle_s=60):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert peak < len(chunk) // 10  # a line at a time, not a list of every line


async def test_bytes_that_trickle_without_finishing_an_event_time_out() -> None:
    now = [0.0]

    async def trickle() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"
        for _ in range(100):
            now[0] += 0.5  # half a second a byte, each read well within a read timeout
            yield b"x"

    events = sse_events(trickle(), max_bytes=1 << 20, idle_s=5, clock=lambda: now[0])
    assert await anext(events) == ("message", "{}")
    with pytest.raises(StreamStalled):
        await anext(events)
    assert now[0] <= 6


async def test_comments_keep_a_quiet_stream_alive() -> None:
    now = [0.0]

    async def keepalive() -> AsyncIterator[bytes]:
        for _ in range(20):
            now[0] += 4
            yield b": still thinking\n"
        yield b"data: done\n\n"

    got = [
        e async for e in sse_events(keepalive(), max_bytes=1 << 20, idle_s=5, clock=lambda: now[0])
    ]
    assert got == [("message", "done")]
