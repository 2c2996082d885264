"""``quotewatch capture export``: a window of ``md.raw`` as a capture file anyone can share and backtest.

The capture format is the one :mod:`quotewatch.domain.venue.captures` reads (and so the backtest,
``replay --source capture:FILE`` and ``feed serve --capture FILE``): one WebSocket frame per line,
exactly as received, gzip-compressed for ``.jsonl.gz``, and the receive-time sidecar
``<stem>.recv_ts.tsv`` (``line``, ``local_recv_unix_ts``: the frame's ``ts_init`` as exact decimal
seconds, nanoseconds kept).

**The window** is found as a replay finds it (:mod:`quotewatch.services.replay.sources`): from the
CONNECTED record of the connection live at ``--from`` (the frames since that connection opened:
the subscription, the snapshots, the warm-up), up to ``--to`` (exclusive, on ``ts_init``). A
capture is one connection: a window that reaches into a later connection is refused with the
time of its CONNECTED (export the connections one by one). Control records (CONNECTED, CLOCK,
DISCONNECTED) are not frames and are not written; an OVERFLOW (frames the live ingest lost) is
reported, since the capture cannot say where frames are missing (the reader sees the sequence
jump and resyncs, as live).

To backtest ``[A, B)`` of an export with every label of it, export up to ``B + Δ + 5 s``: the
labels of the last ticks are known only later (:func:`quotewatch.services.replay.engine.input_lookahead_ns`).
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from quotewatch.core.config import ReplaySettings, load_settings
from quotewatch.core.errors import ConfigError
from quotewatch.core.records import RawFrame
from quotewatch.core.serde import AvroSerde
from quotewatch.domain.venue.captures import capture_stem
from quotewatch.services.replay import lake_source, sources
from quotewatch.services.replay.sources import RawStart, ReplayError, SourceSpec, Window, format_time

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".recv_ts.tsv"
SIDECAR_HEADER = "line\tlocal_recv_unix_ts"


@dataclass
class ExportSummary:
    """What an export wrote."""

    output: Path
    sidecar: Path
    frames: int
    start: RawStart
    first_ns: int | None
    last_ns: int | None
    skipped: Counter[str] = field(default_factory=Counter)
    """Control records not written, by kind."""
    overflows: list[int] = field(default_factory=list)
    """``ts_init`` of each OVERFLOW record inside the window."""

    def describe(self) -> str:
        span = (
            f"{format_time(self.first_ns)} .. {format_time(self.last_ns)}"
            if self.first_ns is not None and self.last_ns is not None
            else "no frame"
        )
        lines = [
            f"wrote {self.frames} frames ({span}) of connection {self.start.connection_id} to {self.output}, "
            f"receive times to {self.sidecar}",
            "control records not written: "
            + (", ".join(f"{count} {kind}" for kind, count in sorted(self.skipped.items())) or "none"),
        ]
        lines.extend(
            f"warning: OVERFLOW at {format_time(ts)}: the live ingest lost frames there; the capture's reader sees "
            "the sequence jump and resyncs"
            for ts in self.overflows
        )
        return "\n".join(lines)


def sidecar_for(output: Path) -> Path:
    """``<stem>.recv_ts.tsv`` next to a ``<stem>.jsonl[.gz]`` capture.

    Raises:
        ConfigError: the output is not named ``*.jsonl`` or ``*.jsonl.gz``.
    """
    try:
        stem = capture_stem(output)
    except ValueError as exc:
        raise ConfigError(f"--output {output}: a capture is named FILE.jsonl.gz or FILE.jsonl") from exc
    return output.with_name(stem + SIDECAR_SUFFIX)


def frames_of_window(records: Iterable[RawFrame], start: RawStart, summary: ExportSummary) -> Iterator[RawFrame]:
    """The FRAME records of one connection (the window's), counting the control records; refuses a second connection.

    Raises:
        ReplayError: a frame of another connection (a CONNECTED after the start), or a frame with a line break.
    """
    for record in records:
        kind = record.kind
        connection = record.connection_id
        if kind == "CONNECTED" and connection != start.connection_id:
            raise ReplayError(
                f"the window reaches into another connection ({connection}, CONNECTED at "
                f"{format_time(record.ts_init)}): a capture is one connection; export up to that time "
                "(--to), and from it on as a second file"
            )
        if kind != "FRAME":
            summary.skipped[kind] += 1
            if kind == "OVERFLOW":
                summary.overflows.append(record.ts_init)
            continue
        if connection != start.connection_id:
            raise ReplayError(f"a frame of connection {connection} inside {start.connection_id}'s window")
        text = record.text
        if "\n" in text or "\r" in text:
            raise ReplayError(
                f"frame {record.frame_index} of {connection} ({format_time(record.ts_init)}) holds a line "
                "break: it cannot be one line of a capture"
            )
        yield record


def write_capture(output: Path, frames: Iterable[RawFrame], summary: ExportSummary) -> None:
    """Write the frames' texts (one a line) and their ``ts_init`` sidecar.

    ``.gz`` outputs are gzip-compressed reproducibly (no file name, mtime 0 in the header).

    Both files are written under temporary names and renamed at the end, so a failed export leaves
    no half capture behind.
    """
    sidecar = summary.sidecar
    partial = output.with_name(output.name + ".partial")
    partial_sidecar = sidecar.with_name(sidecar.name + ".partial")
    try:
        with partial.open("wb") as raw_out, partial_sidecar.open("w", encoding="utf-8") as times:
            out = (
                gzip.GzipFile(filename="", fileobj=raw_out, mode="wb", mtime=0)
                if output.name.endswith(".gz")
                else raw_out
            )
            times.write(SIDECAR_HEADER + "\n")
            for number, record in enumerate(frames, start=1):
                ts = record.ts_init
                out.write(record.text.encode("utf-8") + b"\n")
                times.write(f"{number}\t{ts // 1_000_000_000}.{ts % 1_000_000_000:09d}\n")
                summary.frames = number
                summary.first_ns = ts if summary.first_ns is None else summary.first_ns
                summary.last_ns = ts
            if out is not raw_out:
                out.close()
        partial.replace(output)
        partial_sidecar.replace(sidecar)
    finally:
        partial.unlink(missing_ok=True)
        partial_sidecar.unlink(missing_ok=True)


def export(settings: ReplaySettings, source: SourceSpec, window: Window, output: Path) -> ExportSummary:
    """Write the raw frames of ``window`` of a topic or lake ``md.raw`` as a capture (see the module doc).

    Raises:
        ConfigError: a source that is not a topic or the lake, or a badly named output.
        ReplayError: no CONNECTED before the window, a window spanning two connections, no frame.
    """
    sidecar = sidecar_for(output)
    if source.kind == "topic":
        start, _, records = sources.topic_raw_records(settings, source.prefix, window, AvroSerde())
        values: Iterable[RawFrame] = sources.values_of(records, RawFrame)
    elif source.kind == "lake":
        start, _, lake_records = lake_source.lake_raw_records(settings.lake_uri, source.prefix, window)
        values = sources.values_of(lake_records, RawFrame)
    else:
        raise ConfigError(
            f"--source {source.describe()}: export reads md.raw of a topic or the lake (topic|lake[:PREFIX])"
        )
    summary = ExportSummary(output, sidecar, 0, start, None, None)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_capture(output, frames_of_window(values, start, summary), summary)
    if summary.frames == 0:
        output.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise ReplayError(f"no frame in {window.describe()} of {source.describe()}: nothing exported")
    logger.info("capture exported", extra={"output": str(output), "frames": summary.frames})
    return summary


@click.command("export")
@click.option("--from", "start", default=None, help="Window start (ISO 8601, UTC unless a zone is given) on ts_init.")
@click.option("--to", "end", default=None, help="Window end (exclusive; default: the end of the log).")
@click.option(
    "--source",
    default="topic",
    show_default=True,
    help="topic[:PREFIX] (default TOPIC_PREFIX) or lake[:PREFIX] (LAKE_URI): whose md.raw to export.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The capture to write: FILE.jsonl.gz (or FILE.jsonl); FILE.recv_ts.tsv is written next to it.",
)
def command(start: str | None, end: str | None, source: str, output: Path) -> None:
    """Write the raw frames of a window of md.raw as a capture file (one frame a line + the receive-time sidecar).

    The capture starts at the CONNECTED record of the connection live at --from and is read by
    `quotewatch backtest --source capture:FILE`, `replay --source capture:FILE` and
    `feed serve --capture FILE`. To backtest [A, B) with all its labels, export up to B + DELTA_MS + 5 s.
    """
    settings = load_settings(ReplaySettings)
    spec = sources.parse_source(source, settings.topic_prefix)
    window = Window(sources.parse_time(start) if start else None, sources.parse_time(end) if end else None)
    summary = export(settings, spec, window, output)
    click.echo(summary.describe())
