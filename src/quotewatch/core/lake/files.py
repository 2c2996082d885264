"""The lake's files: locations (local or object store), atomic publishing, writing chunks and
reading their descriptions back (the sink's crash recovery, ``lake info``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from quotewatch.core.bounded import field_int, field_str, parse_json_object
from quotewatch.core.errors import UntrustedInputError
from quotewatch.core.lake.layout import (
    _OBJECT_STORES,
    _OFFSET_DIGITS,
    CHUNK_METADATA_KEY,
    COMPRESSION,
    ROW_GROUP_ROWS,
    ChunkName,
    LakeError,
    file_name,
    parse_file_name,
)

if TYPE_CHECKING:  # pandas is imported by pyarrow's to_pandas() only when read_dataset is called
    pass

logger = logging.getLogger(__name__)

# -- the filesystem --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LakeLocation:
    """Where the lake is: a pyarrow filesystem and the lake's root path in it.

    Build it with :func:`lake_location` from ``LAKE_URI``, or directly from any
    :class:`pyarrow.fs.FileSystem` (tests and tools that hold credentials in code).
    """

    filesystem: pafs.FileSystem
    root: str
    """Path of the lake root inside ``filesystem`` (no trailing slash)."""
    uri: str = ""
    """The LAKE_URI it was built from, for messages."""

    def dataset_path(self, topic: str) -> str:
        """Path of ``topic``'s dataset inside :attr:`filesystem`."""
        return f"{self.root}/{topic}" if self.root else topic

    def describe(self) -> str:
        return self.uri or f"{self.filesystem.type_name}:{self.root}"


def lake_location(lake: str | LakeLocation) -> LakeLocation:
    """Resolve ``LAKE_URI``: a local path (relative to the working directory), ``file://…`` or ``s3://bucket/prefix``.

    Object-store options go in the URI's query string, as pyarrow reads them
    (``s3://lake/qw?endpoint_override=minio:9000&scheme=http``); credentials come from the
    standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``…).

    Raises:
        LakeError: pyarrow cannot build a filesystem for the URI.
    """
    if isinstance(lake, LakeLocation):
        return lake
    if "://" not in lake:
        return LakeLocation(pafs.LocalFileSystem(), os.path.abspath(lake).rstrip("/") or "/", lake)
    try:
        filesystem, path = pafs.FileSystem.from_uri(lake)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise LakeError(f"LAKE_URI={lake}: {exc}") from exc
    return LakeLocation(filesystem, path.rstrip("/"), lake)


def dataset_uri(lake_uri: str, topic: str) -> str:
    """The URI (or local path) of ``topic``'s dataset directory, for tools such as DuckDB or polars.

    Query-string options of an object-store URI are connection settings, not part of the
    location, and are left out. Append ``/**/*.parquet`` for a glob.
    """
    if "://" not in lake_uri:
        return os.path.join(os.path.abspath(lake_uri), topic)
    parts = urlsplit(lake_uri)
    path = parts.path.rstrip("/") + "/" + topic
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _local_os_path(filesystem: pafs.FileSystem, path: str) -> str | None:
    """The OS path of ``path`` when ``filesystem`` is the local disk (possibly under a SubTreeFileSystem)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    if isinstance(filesystem, pafs.SubTreeFileSystem) and isinstance(filesystem.base_fs, pafs.LocalFileSystem):
        return os.path.join(filesystem.base_path, path.lstrip("/"))
    return None


def publish_file(location: LakeLocation, path: str, data: bytes) -> None:
    """Make ``data`` visible at ``path`` (inside the lake's filesystem) atomically and durably.

    Local disk: write a hidden temporary file next to it, fsync, rename over ``path``, fsync the
    directory (and any directory created on the way). Object stores: one upload to the final
    key; the object appears only when the upload completes. Other filesystems: temporary name +
    move.
    Publishing the same bytes twice is harmless (same name, same content).

    Raises:
        OSError: the write failed (nothing is visible at ``path`` then, or the previous content).
    """
    directory, _, base = path.rpartition("/")
    temporary = f"{directory}/.{base}.tmp"
    local = _local_os_path(location.filesystem, path)
    if local is not None:
        _publish_local(local, data)
    elif location.filesystem.type_name in _OBJECT_STORES:
        with location.filesystem.open_output_stream(path) as out:
            out.write(data)
    else:
        location.filesystem.create_dir(directory, recursive=True)
        with location.filesystem.open_output_stream(temporary) as out:
            out.write(data)
        location.filesystem.move(temporary, path)


def _publish_local(path: str, data: bytes) -> None:
    directory, base = os.path.split(path)
    created = _make_dirs(directory)
    temporary = os.path.join(directory, f".{base}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)  # the bytes are on disk before the name points at them
    finally:
        os.close(fd)
    os.replace(temporary, path)  # atomic: readers see the old file, or the complete new one
    for synced in [directory, *created]:
        _fsync_dir(synced)  # the rename (and new directories) survive a power loss


def _make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and its missing parents; return the parents whose entries changed."""
    missing = []
    current = directory
    while current and not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    os.makedirs(directory, exist_ok=True)
    return [os.path.dirname(path) for path in missing]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing chunks --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """A chunk as described in its files' footers."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    files: tuple[str, ...]
    """Paths of all the chunk's files relative to the dataset directory, in write order."""


@dataclass(frozen=True, slots=True)
class WrittenFile:
    path: str
    """Relative to the dataset directory."""
    rows: int
    bytes: int


Publisher = Callable[[LakeLocation, str, bytes], None]


def encode_file(table: pa.Table, chunk: ChunkRecord) -> bytes:
    """One chunk file's bytes: ``table`` as zstd Parquet with the chunk description in the footer.

    Deterministic: the same rows and chunk give the same bytes.
    """
    description = json.dumps(
        {
            "version": 1,
            "topic": chunk.topic,
            "partition": chunk.partition,
            "first_offset": chunk.first_offset,
            "last_offset": chunk.last_offset,
            "files": list(chunk.files),
        },
        separators=(",", ":"),
    ).encode()
    metadata = dict(table.schema.metadata or {})
    metadata[CHUNK_METADATA_KEY] = description
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.replace_schema_metadata(metadata),
        sink,
        compression=COMPRESSION,
        row_group_size=ROW_GROUP_ROWS,
        use_dictionary=True,
        write_statistics=True,
    )
    return bytes(sink.getvalue())


def write_chunk(
    lake: str | LakeLocation,
    topic: str,
    partition: int,
    first_offset: int,
    last_offset: int,
    groups: Sequence[tuple[str, pa.Table]],
    *,
    publish: Publisher = publish_file,
) -> list[WrittenFile]:
    """Write one chunk: a file per ``(hive directory, rows)`` group, in the order given.

    Who calls this: the lake sink, when it cuts a partition's buffer; then it commits
    ``last_offset + 1``. The first group must hold the chunk's first row (crash recovery looks
    for the chunk there). Tables are in :func:`file_schema_for` form, rows in offset order.
    """
    if not groups:
        raise ValueError("a chunk has at least one file")
    location = lake_location(lake)
    name = file_name(topic, partition, first_offset, last_offset)
    chunk = ChunkRecord(topic, partition, first_offset, last_offset, tuple(f"{d}/{name}" for d, _ in groups))
    root = location.dataset_path(topic)
    written = []
    for relative, (_, table) in zip(chunk.files, groups, strict=True):
        data = encode_file(table, chunk)
        publish(location, f"{root}/{relative}", data)
        written.append(WrittenFile(relative, table.num_rows, len(data)))
    return written


# -- reading chunk descriptions (recovery and info) -------------------------------------------------


def _read_footer(location: LakeLocation, path: str) -> pq.FileMetaData:
    with location.filesystem.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata


CHUNK_DESCRIPTION_MAX_BYTES = 1024 * 1024
"""A footer's chunk description longer than this is not parsed (ours: ~100 bytes per file of the chunk)."""
CHUNK_DESCRIPTION_MAX_FILES = 10_000
"""More files than this in one chunk description is not ours (one file per hive directory of the chunk)."""
_PATH_MAX_CHARS = 1024
_TOPIC_MAX_CHARS = 249  # Kafka's limit
_PARTITION_MAX = 2**31 - 1


def chunk_description(metadata: pq.FileMetaData, name: ChunkName | None = None) -> ChunkRecord | None:
    """The chunk described in a file's footer, or None for a file without a valid one.

    The footer is not trusted (anyone who can write to the lake writes it): the description is
    parsed bounded (:data:`CHUNK_DESCRIPTION_MAX_BYTES`, depth 3); its offsets must be offsets, its
    files relative paths of this chunk's file name, and, when ``name`` (the coordinates in the
    file's own name) is given, it must describe that chunk. Anything else is logged and taken for
    no description: the sink then rewrites the chunk under the same names, ``lake info`` counts the
    file by its name. Never raises.

    Sample (one chunk of ``qw.md.events`` partition 0 in one hive directory)::

        {"version":1,"topic":"qw.md.events","partition":0,"first_offset":0,"last_offset":41,
         "files":["symbol=BTC-USD/date=2026-08-09/hour=21/qw.md.events+0+000…0+000…41.parquet"]}
    """
    raw = (metadata.metadata or {}).get(CHUNK_METADATA_KEY)
    if raw is None:
        return None
    what = "chunk description in a Parquet footer"
    try:
        data = parse_json_object(raw, what=what, max_bytes=CHUNK_DESCRIPTION_MAX_BYTES, max_depth=3)
        topic = field_str(data, "topic", what=what, max_length=_TOPIC_MAX_CHARS)
        partition = field_int(data, "partition", what=what, maximum=_PARTITION_MAX)
        first_offset = field_int(data, "first_offset", what=what)
        last_offset = field_int(data, "last_offset", what=what, minimum=first_offset)
        files = data.get("files")
        if not isinstance(files, list) or not 0 < len(files) <= CHUNK_DESCRIPTION_MAX_FILES:
            raise UntrustedInputError(f"{what}: 'files' is not a list of 1 to {CHUNK_DESCRIPTION_MAX_FILES} paths")
        chunk = ChunkRecord(topic, partition, first_offset, last_offset, tuple(files))
        if name is not None and ChunkName(topic, partition, first_offset, last_offset) != name:
            raise UntrustedInputError(
                f"{what}: describes {topic}[{partition}] {first_offset}..{last_offset}, not {name}"
            )
        base = file_name(topic, partition, first_offset, last_offset)
        for path in files:
            if not isinstance(path, str) or len(path) > _PATH_MAX_CHARS or not _is_chunk_path(path, base):
                raise UntrustedInputError(f"{what}: {str(path)[:100]!r} is not a relative path of a file {base}")
    except UntrustedInputError as exc:
        logger.warning("ignoring a chunk description that is not valid: %s", exc)
        return None
    return chunk


def _is_chunk_path(path: str, base: str) -> bool:
    """``path`` is ``[dir/...]base``, relative, without ``.`` or ``..`` segments."""
    parts = path.split("/")
    return parts[-1] == base and all(part not in ("", ".", "..") for part in parts)


def find_chunk(
    lake: str | LakeLocation, topic: str, partition: int, first_offset: int, directory: str
) -> ChunkRecord | None:
    """The chunk of ``topic[partition]`` starting at ``first_offset`` with a file in hive ``directory``.

    Who calls this: the lake sink after a (re)start, with the directory of the first row it read
    from its committed offset: a chunk written before a crash (but not committed) has its first
    file there. One directory listing, whatever the size of the lake.
    """
    location = lake_location(lake)
    path = f"{location.dataset_path(topic)}/{directory}"
    prefix = f"{topic}+{partition}+{first_offset:0{_OFFSET_DIGITS}d}+"
    try:
        infos = location.filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise LakeError(f"cannot list {path}: {exc}") from exc
    candidates = sorted(info.base_name for info in infos if info.is_file and info.base_name.startswith(prefix))
    for base in reversed(candidates):
        description = chunk_description(_read_footer(location, f"{path}/{base}"), parse_file_name(base))
        if description is not None:
            return description
    return None


def missing_files(lake: str | LakeLocation, chunk: ChunkRecord) -> list[str]:
    """The files of ``chunk`` (relative paths) that are not in the lake."""
    location = lake_location(lake)
    root = location.dataset_path(chunk.topic)
    infos = location.filesystem.get_file_info([f"{root}/{relative}" for relative in chunk.files])
    return [relative for relative, info in zip(chunk.files, infos, strict=True) if not info.is_file]


def last_chunk(lake: str | LakeLocation, topic: str, partition: int) -> ChunkRecord | None:
    """The chunk of ``topic[partition]`` with the highest first offset (lists the whole dataset).

    Who calls this: the lake sink when its consumer group has no committed offset for a
    partition, so that it resumes after what the lake already holds instead of writing it twice.
    """
    location = lake_location(lake)
    best: tuple[ChunkName, str] | None = None
    for info in _list_files(location, location.dataset_path(topic)):
        name = parse_file_name(info.base_name)
        if name is None or name.topic != topic or name.partition != partition:
            continue
        if best is None or (name.first_offset, name.last_offset) > (best[0].first_offset, best[0].last_offset):
            best = (name, info.path)
    if best is None:
        return None
    return chunk_description(_read_footer(location, best[1]), best[0])


def _list_files(location: LakeLocation, path: str) -> list[pafs.FileInfo]:
    try:
        infos = location.filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise LakeError(f"cannot list {path}: {exc}") from exc
    return [info for info in infos if info.is_file]
