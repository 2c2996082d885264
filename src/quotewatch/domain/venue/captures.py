"""Recorded Coinbase captures as raw-log records.

A capture (``../shared/data/coinbase/*.jsonl`` or ``*.jsonl.gz``, see SOURCES.md there) holds one
WebSocket message per line, in the order received, with a sidecar ``.tsv`` aligned by line number
that gives the receive time: ``<stem>.recv_ts.tsv`` (``line``, ``local_recv_unix_ts``) or
``<stem>.mongo_ids.tsv`` (``line``, ``mongo_object_id``, ``mongo_insert_utc_seconds``).

:func:`read_capture` turns a file into a :class:`Capture`; :meth:`Capture.raw_frames` gives the
``RawFrame`` records the ingest would have written for it (a synthetic CONNECTED record first,
then one FRAME per line), ready for :class:`~quotewatch.domain.venue.normaliser.Normaliser`::

    events, rejects = Normaliser().process_all(read_capture(path).raw_frames())

The feed is detected from the content (Advanced messages have ``channel``, Exchange ``type``);
``ts_init`` comes from the sidecar, made strictly increasing (the 2018 sidecar has 1 s resolution).
This module reads files (its only I/O); it reads no clock and talks to no broker.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from quotewatch.core.records import RawFrame, RawKind
from quotewatch.domain.venue.coinbase_feeds import detect_feed
from quotewatch.domain.venue.normaliser import CONNECTING, STOPPED, control_text

SIDECAR_SUFFIXES = (".recv_ts.tsv", ".mongo_ids.tsv")
CAPTURE_SUFFIXES = (".jsonl", ".jsonl.gz")


class CaptureError(ValueError):
    """A capture file or its sidecar cannot be read as a capture."""


@dataclass(frozen=True)
class Capture:
    """One recorded session: its frames as received, their receive times and what it covers."""

    path: Path
    feed: str
    symbols: tuple[str, ...]
    lines: tuple[str, ...]
    """Each frame's text exactly as recorded (without the line terminator)."""
    recv_ns: tuple[int, ...]
    """Receive time of each line in ns, strictly increasing."""

    @property
    def stem(self) -> str:
        return capture_stem(self.path)

    @property
    def connection_id(self) -> str:
        return f"capture:{self.stem}"

    def raw_frames(self, *, exchange: str = "coinbase", disconnect: bool = False) -> Iterator[RawFrame]:
        """The ``RawFrame`` records of this capture: CONNECTED, one FRAME per line (and DISCONNECTED).

        The CONNECTED record is stamped 1 ns before the first frame; control records carry their
        ``ts_init`` as ``ts_event`` (a capture has no exchange-time estimate before its first frame).
        """
        symbols = tuple(self.symbols)
        first = self.recv_ns[0] if self.recv_ns else 0
        feed, connection_id = self.feed, self.connection_id

        def record(kind: RawKind, ts: int, frame_index: int, text: str) -> RawFrame:
            return RawFrame(
                ts_event=ts,
                ts_init=ts,
                exchange=exchange,
                feed=feed,
                symbols=symbols,
                connection_id=connection_id,
                frame_index=frame_index,
                kind=kind,
                text=text,
            )

        yield record("CONNECTED", first - 1, -1, control_text(CONNECTING, f"capture {self.path.name}"))
        for index, (text, ts) in enumerate(zip(self.lines, self.recv_ns, strict=True)):
            yield record("FRAME", ts, index, text)
        if disconnect:
            last = (self.recv_ns[-1] if self.recv_ns else first) + 1
            yield record("DISCONNECTED", last, -1, control_text(STOPPED, f"end of capture {self.path.name}"))


def capture_stem(path: Path) -> str:
    """The file name without ``.jsonl`` / ``.jsonl.gz``."""
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise CaptureError(f"{path}: not a capture (expected a .jsonl or .jsonl.gz file)")


def capture_files(directory: Path) -> list[Path]:
    """Every capture file in ``directory``, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.name.endswith(CAPTURE_SUFFIXES))


def sidecar_path(path: Path) -> Path:
    """The receive-time sidecar of a capture file.

    Raises:
        CaptureError: there is none.
    """
    stem = capture_stem(path)
    for suffix in SIDECAR_SUFFIXES:
        candidate = path.with_name(stem + suffix)
        if candidate.exists():
            return candidate
    raise CaptureError(f"{path}: no sidecar {stem}{{{','.join(SIDECAR_SUFFIXES)}}} with receive times")


def read_capture(path: Path | str) -> Capture:
    """Read a capture and its sidecar.

    Raises:
        CaptureError: unreadable file, no sidecar, sidecar not aligned with the lines, or no line
            that says which protocol the capture speaks.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise CaptureError(f"{path}: cannot read: {exc}") from exc
    lines = tuple(line.rstrip("\r") for line in text.split("\n"))
    if lines and lines[-1] == "":
        lines = lines[:-1]
    recv_ns = _read_sidecar(sidecar_path(path), len(lines))
    feed: str | None = None
    symbols: dict[str, None] = {}
    for line in lines:
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        feed = feed or detect_feed(message)
        if isinstance(message, dict):
            _collect_symbols(message, symbols)
    if feed is None:
        raise CaptureError(f"{path}: no line says which Coinbase protocol this is")
    return Capture(path=path, feed=feed, symbols=tuple(sorted(symbols)), lines=lines, recv_ns=recv_ns)


def _collect_symbols(message: dict[str, Any], symbols: dict[str, None]) -> None:  # not a topic record: Coinbase JSON
    product = message.get("product_id")
    if isinstance(product, str) and message.get("type") in {"snapshot", "l2update", "match", "heartbeat"}:
        symbols[product] = None
    if message.get("channel") in {"l2_data", "market_trades"} and isinstance(message.get("events"), list):
        for event in message["events"]:
            if not isinstance(event, dict):
                continue
            if isinstance(event.get("product_id"), str):
                symbols[event["product_id"]] = None
            for trade in event.get("trades") or ():
                if isinstance(trade, dict) and isinstance(trade.get("product_id"), str):
                    symbols[trade["product_id"]] = None


def _read_sidecar(path: Path, expected_lines: int) -> tuple[int, ...]:
    try:
        rows = path.read_text().splitlines()
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read: {exc}") from exc
    if not rows:
        raise CaptureError(f"{path}: empty sidecar")
    header = rows[0].split("\t")
    column = next(
        (i for i, name in enumerate(header) if name in ("local_recv_unix_ts", "mongo_insert_utc_seconds")), None
    )
    if header[0] != "line" or column is None:
        raise CaptureError(f"{path}: unknown sidecar header {header}")
    times: list[int] = []
    previous = -1
    for number, row in enumerate(rows[1:], start=1):
        cells = row.split("\t")
        if len(cells) <= column or cells[0] != str(number):
            raise CaptureError(f"{path}:{number + 1}: row {row!r:.80} is not line {number}")
        ts = max(_seconds_to_ns(cells[column], path, number), previous + 1)
        times.append(ts)
        previous = ts
    if len(times) != expected_lines:
        raise CaptureError(f"{path}: {len(times)} sidecar rows for {expected_lines} capture lines")
    return tuple(times)


def _seconds_to_ns(text: str, path: Path, number: int) -> int:
    """Exact ns of a decimal seconds string (never through a float)."""
    whole, _, frac = text.strip().partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(frac) > 9:
        raise CaptureError(f"{path}: line {number}: {text!r:.40} is not a decimal number of seconds")
    return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
