"""Log lines: one JSON object each (or `key=value` text with LOG_FORMAT=text, for a
human at a terminal). A line written while a request is served carries its id."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

import jsonio

LOGGER_NAME = "text_tool"
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def cut(text: str, limit: int = 256) -> str:
    """A field a client chose (a path, a user agent), at most `limit` characters in a log
    line: anyone without a key could otherwise write 65 KB a line, thousands a second."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more]"


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


# Control characters (C0, DEL, C1) as escapes: a newline in a URL must not start a
# forged line, and an ESC must not reach the terminal that shows the log.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
_QUOTED = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f]')


def _logfmt(value: object) -> str:
    """A value as logfmt writes it: bare when it can be, else quoted and escaped."""
    text = value if isinstance(value, str) else jsonio.dumps(value, fallback=str).decode()
    if not text or _QUOTED.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').translate(_CONTROLS) + '"'
    return text


class TextFormatter(logging.Formatter):
    """`key=value` lines for a human at a terminal, one line a record whatever the
    values hold; a traceback follows on lines of its own, indented."""

    def format(self, record: logging.LogRecord) -> str:
        line = _fields(record)
        msg = str(line.pop("msg")).translate(_CONTROLS)
        head = f"{line.pop('time')} {line.pop('level'):<7} {msg}"
        text = " ".join([head, *(f"{k}={_logfmt(v)}" for k, v in line.items() if v is not None)])
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            text += "".join("\n    " + part.translate(_CONTROLS) for part in trace.splitlines())
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
    a LogRecord (a departure: making, handling and formatting one is a measurable share
    of a request's CPU time, bench/README.md). Otherwise (a host's own logging set-up)
    it goes through logging as any other line."""
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
