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


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            text += " " + " ".join(f"{key}={value}" for key, value in extras.items())
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
