"""Log lines: one JSON object each (or `key=value` text with LOG_FORMAT=text, for a
human at a terminal). A line written while a request is served carries its id."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

import jsonio

LOGGER_NAME = "text_tool"
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

current_request_id: ContextVar[str | None] = ContextVar("text_tool_request_id", default=None)


_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC to the millisecond; the formatted second is reused, since a busy
    server writes many lines within one."""
    global _second
    whole, cached = int(created), _second  # one read: a thread may replace it meanwhile
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{int((created - whole) * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    line: dict[str, Any] = {
        "time": _timestamp(record.created),
        "level": record.levelname.lower(),
        "msg": record.getMessage(),
    }
    rid = current_request_id.get()
    if rid is not None:
        line["request_id"] = rid
    line.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and k[0] != "_"})
    return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _fields(record)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return jsonio.dumps(line, fallback=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _fields(record)
        head = f"{line.pop('time')} {line.pop('level'):<7} {line.pop('msg')}"
        text = " ".join([head, *(f"{k}={v}" for k, v in line.items() if v is not None)])
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class TurnBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines of one turn of the event loop in one go. Under load several
    requests end in each turn, and each access line's own write and flush was a system
    call. Lines from outside a running loop (start-up, exit, another thread) are written
    at once, after any still pending; logging's exit hook flushes what is left."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.queue_line(line)

    def queue_line(self, line: str) -> None:
        """Write a formatted `line` with the others of this loop turn."""
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(line)
            if len(self._pending) > 1:
                return  # a flush is scheduled already
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                lines, self._pending = self._pending, []
                try:
                    self.stream.write("\n".join(lines) + "\n")
                except Exception:
                    pass  # as logging does: a broken log stream must not break a request
            super().flush()


def _sole_json_handler(logger: logging.Logger) -> TurnBatchingHandler | None:
    """The handler `get_logger` installs, when it is the only place a line can go."""
    if len(logger.handlers) != 1 or logger.propagate or logger.filters:
        return None
    handler = logger.handlers[0]
    if (
        type(handler) is not TurnBatchingHandler
        or type(handler.formatter) is not JsonFormatter
        or handler.filters
        or handler.level > logging.INFO
    ):
        return None
    return handler


def info_fields(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """`logger.info(msg, extra=fields)`, for the access line of every request. When the
    line can only go to the JSON handler `get_logger` installs, it is made here without
    a LogRecord: making, handling and formatting one was ~25 us, a twelfth of a request's
    CPU time, for the same line. Otherwise (a host's own logging set-up) it goes through
    logging as any other line."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_json_handler(logger)
    if handler is None:
        # makeRecord, not info(): no search of the stack for the caller.
        record = logger.makeRecord(logger.name, logging.INFO, "", 0, msg, (), None, extra=fields)
        logger.handle(record)
        return
    line: dict[str, Any] = {"time": _timestamp(time.time()), "level": "info", "msg": msg}
    rid = current_request_id.get()
    if rid is not None:
        line["request_id"] = rid
    line.update(fields)
    handler.queue_line(jsonio.dumps(line, fallback=str).decode())


def get_logger(log_format: str = "json") -> logging.Logger:
    """The service's logger; given a handler on stderr unless logging is set up already."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = TurnBatchingHandler(sys.stderr)
        handler.setFormatter(TextFormatter() if log_format == "text" else JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
