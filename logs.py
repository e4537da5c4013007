"""Log lines: one JSON object each (or `key=value` text with LOG_FORMAT=text, for a
human at a terminal). A line written while a request is served carries its id."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

LOGGER_NAME = "text_tool"
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

current_request_id: ContextVar[str | None] = ContextVar("text_tool_request_id", default=None)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    line: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "msg": record.getMessage(),
    }
    rid = current_request_id.get()
    if rid is not None:
        line["request_id"] = rid
    for key, value in vars(record).items():
        if key not in _RESERVED and not key.startswith("_"):
            line[key] = value
    return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _fields(record)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _fields(record)
        head = f"{line.pop('time')} {line.pop('level'):<7} {line.pop('msg')}"
        text = " ".join([head, *(f"{k}={v}" for k, v in line.items() if v is not None)])
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def get_logger(log_format: str = "json") -> logging.Logger:
    """The service's logger; given a handler on stderr unless logging is set up already."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TextFormatter() if log_format == "text" else JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
