"""The log handler: lines of one event-loop turn go out in one write, none is lost,
and lines from outside a loop go out at once, in order."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from logs import JsonFormatter, TurnBatchingHandler


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
