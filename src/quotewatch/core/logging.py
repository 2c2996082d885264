"""Structured logging under the ``quotewatch`` logger namespace.

Library code gets its logger with ``logging.getLogger(__name__)`` (every module lives under
``quotewatch.``) and never configures logging; the entry point calls :func:`configure_logging`
once. Context goes in ``extra={...}``: the JSON format emits it as fields, the text format
appends it as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

ROOT_LOGGER = "quotewatch"
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:  # not a topic record: log extras
    return {key: value for key, value in vars(record).items() if key not in _RESERVED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service and the extra fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {  # not a topic record: a log line
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "service": self._service,
            "message": record.getMessage(),
        }
        payload.update(_extras(record))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def _control_escapes() -> dict[int, str]:
    table = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    table.update({code: f"\\u{code:04x}" for code in (0x2028, 0x2029)})  # line and paragraph separators
    return table


_ESCAPES = _control_escapes()


def escape_control(text: str) -> str:
    """``text`` with control characters (C0, DEL, C1, U+2028/9) written as ``\\n``, ``\\x1b``, ``\\u2028``...

    What a text log line shows of a value we did not write (an exchange's error message, a
    record's reason): it can neither end the line, so forge the next one, nor send escape
    sequences to a terminal.
    """
    return text if text.isprintable() else text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people: one record, one line.

    The message and the extra values are escaped (:func:`escape_control`); a traceback or stack
    follows on lines of its own, each prefixed with ``  | `` so none of them reads as a record.
    """

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extras = _extras(record)
        if extras:
            text += " " + " ".join(
                f"{escape_control(str(key))}={escape_control(str(value))}" for key, value in extras.items()
            )
        details = []
        if record.exc_info:
            details.append(self.formatException(record.exc_info))
        elif record.exc_text:
            details.append(record.exc_text)
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        for detail in details:
            text += "".join(f"\n  | {escape_control(line)}" for line in detail.splitlines())
        return text


def configure_logging(service: str, level: str = "INFO", fmt: str = "text") -> None:
    """Configure the ``quotewatch`` logger tree once, for the process entry point."""
    formatter: logging.Formatter = JsonFormatter(service) if fmt == "json" else TextFormatter(service)
    formatter.converter = __import__("time").gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger(ROOT_LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
