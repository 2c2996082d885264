"""``quotewatch lake info``: per dataset and partition, coverage, holes, overlaps, incomplete chunks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from quotewatch.core.lake.files import LakeLocation, _list_files, _read_footer, chunk_description, lake_location
from quotewatch.core.lake.layout import _EPOCH, LakeError, parse_file_name

if TYPE_CHECKING:  # pandas is imported by pyarrow's to_pandas() only when read_dataset is called
    pass

logger = logging.getLogger(__name__)

# -- lake info -------------------------------------------------------------------------------------


@dataclass
class IncompleteChunk:
    partition: int
    first_offset: int
    last_offset: int
    missing: list[str]


@dataclass
class PartitionCoverage:
    """Which offsets of one Kafka partition the lake holds."""

    partition: int
    first_offset: int
    last_offset: int
    chunks: int
    rows: int
    holes: list[tuple[int, int]] = field(default_factory=list)
    """Inclusive offset ranges no chunk covers between the first and the last: missing data."""
    overlaps: list[tuple[int, int]] = field(default_factory=list)
    """Inclusive offset ranges covered by two chunks with different names."""
    incomplete_chunks: int = 0
    """Chunks of this partition with files missing (a crash mid-chunk; listed on the dataset)."""

    @property
    def complete(self) -> bool:
        return not self.holes and not self.overlaps and not self.incomplete_chunks


@dataclass
class DatasetInfo:
    """What ``quotewatch lake info`` prints for one dataset."""

    topic: str
    files: int = 0
    rows: int = 0
    bytes: int = 0
    ts_event_min: int | None = None
    ts_event_max: int | None = None
    partitions: list[PartitionCoverage] = field(default_factory=list)
    incomplete_chunks: list[IncompleteChunk] = field(default_factory=list)
    temporary_files: list[str] = field(default_factory=list)
    """Hidden ``.…tmp`` files a crash left behind (never read; safe to delete when no sink runs)."""
    foreign_files: list[str] = field(default_factory=list)
    """Files that are not chunk files (readers of ``**/*.parquet`` may pick them up)."""

    @property
    def healthy(self) -> bool:
        return not self.incomplete_chunks and not self.foreign_files and all(p.complete for p in self.partitions)


def lake_info(lake: str | LakeLocation) -> list[DatasetInfo]:
    """Describe every dataset under the lake root (reads file footers only, never the data).

    Raises:
        LakeError: the lake root cannot be listed.
    """
    location = lake_location(lake)
    try:
        entries = location.filesystem.get_file_info(pafs.FileSelector(location.root, allow_not_found=True))
    except OSError as exc:
        raise LakeError(f"cannot list the lake at {location.describe()}: {exc}") from exc
    return [
        dataset_info(location, entry.base_name)
        for entry in sorted(entries, key=lambda e: e.base_name)
        if entry.type == pafs.FileType.Directory and not entry.base_name.startswith((".", "_"))
    ]


def dataset_info(lake: str | LakeLocation, topic: str) -> DatasetInfo:
    """Describe one dataset: rows, files, bytes, ts_event range, offset coverage per partition."""
    location = lake_location(lake)
    root = location.dataset_path(topic)
    info = DatasetInfo(topic)
    chunks: dict[tuple[int, int, int], tuple[set[str], set[str], int]] = {}
    for entry in _list_files(location, root):
        relative = entry.path[len(root) + 1 :]
        if entry.base_name.startswith("."):
            info.temporary_files.append(relative)
            continue
        name = parse_file_name(entry.base_name)
        if name is None or name.topic != topic:
            info.foreign_files.append(relative)
            continue
        metadata = _read_footer(location, entry.path)
        description = chunk_description(metadata, name)
        info.files += 1
        info.rows += metadata.num_rows
        info.bytes += entry.size or 0
        low, high = _ts_event_range(metadata)
        if low is not None:
            info.ts_event_min = low if info.ts_event_min is None else min(info.ts_event_min, low)
        if high is not None:
            info.ts_event_max = high if info.ts_event_max is None else max(info.ts_event_max, high)
        key = (name.partition, name.first_offset, name.last_offset)
        present, expected, rows = chunks.get(key, (set(), set(), 0))
        present.add(relative)
        if description is not None:
            expected.update(description.files)
        chunks[key] = (present, expected, rows + metadata.num_rows)
    by_partition: dict[int, list[tuple[int, int, int]]] = {}
    for (partition, first, last), (present, expected, rows) in chunks.items():
        by_partition.setdefault(partition, []).append((first, last, rows))
        missing = sorted(expected - present)
        if missing:
            info.incomplete_chunks.append(IncompleteChunk(partition, first, last, missing))
    for partition in sorted(by_partition):
        coverage = _coverage(partition, sorted(by_partition[partition]))
        coverage.incomplete_chunks = sum(1 for c in info.incomplete_chunks if c.partition == partition)
        info.partitions.append(coverage)
    info.incomplete_chunks.sort(key=lambda c: (c.partition, c.first_offset))
    return info


def _coverage(partition: int, chunks: list[tuple[int, int, int]]) -> PartitionCoverage:
    coverage = PartitionCoverage(partition, chunks[0][0], max(last for _, last, _ in chunks), len(chunks), 0)
    next_expected = chunks[0][0]
    for first, last, rows in chunks:
        coverage.rows += rows
        if first > next_expected:
            coverage.holes.append((next_expected, first - 1))
        elif first < next_expected:
            coverage.overlaps.append((first, min(last, next_expected - 1)))
        next_expected = max(next_expected, last + 1)
    return coverage


def _ts_event_range(metadata: pq.FileMetaData) -> tuple[int | None, int | None]:
    low: int | None = None
    high: int | None = None
    if metadata.num_row_groups == 0:
        return low, high
    first = metadata.row_group(0)
    index = next((i for i in range(first.num_columns) if first.column(i).path_in_schema == "ts_event"), None)
    if index is None:
        return low, high
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(index).statistics
        if statistics is None or not statistics.has_min_max:
            continue
        low = statistics.min if low is None else min(low, statistics.min)
        high = statistics.max if high is None else max(high, statistics.max)
    return low, high


def format_ns(ts_ns: int | None) -> str:
    """``2026-08-09T21:05:48.229000000Z`` (UTC, ns) or ``-``."""
    if ts_ns is None:
        return "-"
    seconds, nanos = divmod(ts_ns, 10**9)
    return f"{_EPOCH + timedelta(seconds=seconds):%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def format_lake_info(infos: Sequence[DatasetInfo], location: str = "") -> str:
    """The human-readable report of ``quotewatch lake info``."""
    if not infos:
        return f"no datasets in the lake{' at ' + location if location else ''}"
    lines = []
    for info in infos:
        lines.append(
            f"{info.topic}: {info.rows:,} rows in {info.files:,} files ({info.bytes / 1e6:,.1f} MB), "
            f"ts_event {format_ns(info.ts_event_min)} .. {format_ns(info.ts_event_max)}"
        )
        for part in info.partitions:
            status = "complete" if part.complete else "INCOMPLETE"
            lines.append(
                f"  partition {part.partition}: offsets {part.first_offset}..{part.last_offset} "
                f"in {part.chunks} chunks, {part.rows:,} rows, {status}"
            )
            lines.extend(f"    hole: offsets {a}..{b} missing ({b - a + 1} offsets)" for a, b in part.holes)
            lines.extend(f"    overlap: offsets {a}..{b} in two chunks with different names" for a, b in part.overlaps)
        lines.extend(
            f"  incomplete chunk: partition {chunk.partition} offsets {chunk.first_offset}..{chunk.last_offset}, "
            f"missing {len(chunk.missing)} file(s): {', '.join(chunk.missing[:3])}"
            for chunk in info.incomplete_chunks
        )
        if info.temporary_files:
            lines.append(f"  {len(info.temporary_files)} temporary file(s) left by a crash (ignored by readers)")
        if info.foreign_files:
            lines.append(f"  {len(info.foreign_files)} foreign file(s): {', '.join(info.foreign_files[:3])}")
    return "\n".join(lines)
