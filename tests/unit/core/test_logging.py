"""Text logs: one record, one line, whatever the text of a value we did not write.

Before: an exchange ``error`` frame with a newline in its message was logged by the ingest's
writer ("dead-lettering a frame: exchange error: ...") as two lines, the second one forged.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from quotewatch.core.logging import JsonFormatter, TextFormatter, escape_control
from quotewatch.domain.venue.normaliser import Normaliser
from tests.unit.domain.venue.test_normaliser import Log

FORGED = "2026-08-09 21:00:00 INFO    ingest quotewatch.services.ingest.service: all good"


@pytest.fixture
def text_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter("ingest"))
    logger = logging.getLogger("quotewatch.tests.text_log")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_an_exchange_error_message_cannot_forge_a_log_line(text_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = text_log
    log = Log(feed="coinbase-exchange")
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    frame = {"type": "error", "message": f"Failed to subscribe\n{FORGED}", "reason": "bad\r\x1b[2Jproduct"}
    (reject,) = normaliser.process(log.frame(frame)).rejects
    assert "\n" in reject.reason, "the reason carries the exchange's text as sent"
    # As the ingest's writer logs a reject (RawWriter._dead_letter).
    logger.warning("dead-lettering a frame: %s", reject.reason, extra={"ref": reject.source_ref, "note": "a\nb"})
    output = stream.getvalue()
    assert output.count("\n") == 1, output
    (line,) = output.splitlines()
    assert "Failed to subscribe\\n2026-08-09 21:00:00 INFO" in line
    assert "\\r\\x1b[2J" in line
    assert "note=a\\nb" in line


def test_a_traceback_stays_under_its_record(text_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = text_log
    try:
        raise ValueError(f"bad value\n{FORGED}")
    except ValueError:
        logger.exception("processing failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("processing failed")
    assert rest, "the traceback follows"
    assert all(line.startswith("  | ") for line in rest), rest
    assert f"  | {FORGED}" in rest


def test_escaping_and_the_json_format() -> None:
    assert escape_control("plain text, with ünïcode") == "plain text, with ünïcode"
    assert escape_control("a\tb\x00c\x7fd\x85e\u2028f") == "a\\tb\\x00c\\x7fd\\x85e\\u2028f"
    record = logging.makeLogRecord({"name": "quotewatch.x", "levelname": "INFO", "msg": f"x\n{FORGED}"})
    line = JsonFormatter("ingest").format(record)
    assert "\n" not in line
    assert json.loads(line)["message"] == f"x\n{FORGED}"
