"""The log handler: lines of one event-loop turn go out in one write, none is lost,
and lines from outside a loop go out at once, in order; the access line's shortcut
past the LogRecord writes what logging would."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import pytest

from logs import (
    JsonFormatter,
    TextFormatter,
    TurnBatchingHandler,
    current_request_id,
    cut,
    info_fields,
)
from requestlog import Sampler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(stream: CountingStream) -> logging.Logger:
    handler = TurnBatchingHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger("text_tool.test")  # not registered: no other handler sees it
    logger.addHandler(handler)
    logger.propagate = False  # as get_logger sets it up
    return logger


def _messages(stream: CountingStream) -> list[str]:
    return [json.loads(line)["msg"] for line in stream.getvalue().splitlines()]


def test_lines_of_one_loop_turn_go_out_in_one_write() -> None:
    stream = CountingStream()
    logger = _logger(stream)

    async def serve() -> None:
        for n in range(3):
            logger.warning("line %d", n)
        assert stream.writes == 0  # still this turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert stream.writes == 1
        logger.warning("next turn")

    asyncio.run(serve())
    assert _messages(stream) == ["line 0", "line 1", "line 2", "next turn"]
    assert stream.writes == 2


def test_lines_from_outside_a_loop_go_out_at_once_and_in_order() -> None:
    stream = CountingStream()
    logger = _logger(stream)
    logger.warning("at start")
    assert _messages(stream) == ["at start"]

    async def serve() -> None:
        logger.warning("in the loop")
        await asyncio.to_thread(logger.warning, "from a thread")

    asyncio.run(serve())
    assert _messages(stream) == ["at start", "in the loop", "from a thread"]


def test_a_broken_stream_does_not_break_the_caller() -> None:
    class Broken(CountingStream):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    logger = _logger(Broken())
    logger.warning("lost, quietly")  # no exception reaches the request


def test_info_fields_writes_what_logging_would_with_or_without_a_record() -> None:
    """The access line skips the LogRecord when our JSON handler is the only one; with a
    host's filter on the logger it goes through logging: the same line either way."""
    fields = {"event": "access", "status": 200, "cost_usd": 1.5e-05, "model": None, "n": [1]}
    direct_stream, logged_stream = CountingStream(), CountingStream()
    direct, logged = _logger(direct_stream), _logger(logged_stream)
    logged.addFilter(lambda record: True)  # a host's filter: logging's own path
    records: list[str] = []
    make_record = logging.Logger.makeRecord

    def counted(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        records.append(self.name)
        return make_record(self, *args, **kwargs)

    token = current_request_id.set("rid-1")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(logging.Logger, "makeRecord", counted)
            info_fields(direct, "request", fields)
            assert records == []  # no LogRecord
            info_fields(logged, "request", fields)
            assert records == ["text_tool.test"]
    finally:
        current_request_id.reset(token)
    lines = [json.loads(s.getvalue()) for s in (direct_stream, logged_stream)]
    for line in lines:
        assert line.pop("time").endswith("Z")
    assert lines[0] == lines[1]
    assert list(lines[0]) == ["level", "msg", "request_id", *fields]


def test_info_fields_respects_the_level() -> None:
    stream = CountingStream()
    logger = _logger(stream)
    logger.setLevel(logging.WARNING)
    info_fields(logger, "request", {"event": "access"})
    assert stream.getvalue() == ""


def test_a_text_line_stays_one_line_whatever_its_fields_hold() -> None:
    stream = CountingStream()
    handler = TurnBatchingHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.Logger("text_tool.text")
    logger.addHandler(handler)
    forged = "/x\n2026-12-01T00:00:00.000Z info    request status=200\r\x1b[2J\x9b"
    logger.warning("request", extra={"path": forged, "client": "a b", "n": {"k": "v"}})
    try:
        raise ValueError("boom\nfake line")
    except ValueError:
        logger.exception("failed")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(
        r'path="/x\n2026-12-01T00:00:00.000Z info    request status=200\r\x1b[2J\x9b"'
        r' client="a b" n="{\"k\":\"v\"}"'
    )
    assert not any(c in stream.getvalue() for c in "\r\x1b\x9b")
    assert lines[1].split()[2] == "failed"
    assert all(line.startswith("    ") for line in lines[2:])  # the traceback, indented


def test_cut_marks_what_it_cut() -> None:
    assert cut("/short") == "/short"
    assert cut("/" + "a" * 999, 10) == "/aaaaaaaaa...[990 more]"


def test_the_sampler_logs_a_burst_per_address_then_says_how_many_it_skipped() -> None:
    now = [0.0]
    sampler = Sampler(burst=3, window_s=60, max_addresses=2, clock=lambda: now[0])
    assert [sampler.admit("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert sampler.admit("b") == 0
    now[0] = 61
    assert sampler.admit("a") == 2  # the two it did not log
    sampler.admit("c")  # a third address: the least recent one ("b") is forgotten
    assert len(sampler._seen) == 2 and "b" not in sampler._seen
