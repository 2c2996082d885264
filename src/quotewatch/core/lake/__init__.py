"""The Parquet lake: layout, Avro -> Arrow schemas, chunk files, the reading API and ``lake info``.

Shared by the lake sink (writes), the trainer and the backtest (read) and ``quotewatch lake info``.
The modules: :mod:`~quotewatch.core.lake.layout` (constants, errors, Avro -> Arrow, paths and file
names), :mod:`~quotewatch.core.lake.files` (locations, publishing, writing chunks and reading their
descriptions), :mod:`~quotewatch.core.lake.reading` (the reading API) and
:mod:`~quotewatch.core.lake.info` (``lake info``); this package re-exports their public names.

Layout
------
One dataset per topic, named by the **full** topic name (so a replay namespace never mixes with
the live one), hive-partitioned by the record's symbol and the UTC hour of its ``ts_event``::

    <LAKE_URI>/qw.features/symbol=BTC-USD/date=2026-08-09/hour=21/qw.features+0+00000000000000001200+00000000000000002399.parquet

``qw.md.raw`` is partitioned by ``feed=`` instead of ``symbol=``: a raw frame belongs to a
connection (its ``symbols`` array lists what the connection subscribed, not what the frame is
about), and a replay needs every frame of a feed in order, so one directory per feed and hour
keeps the raw log whole. ``read_dataset(..., symbols=[...])`` on ``md.raw`` keeps the frames
whose ``symbols`` array names one of them.

Partition values are percent-encoded (``BTC/USD`` -> ``symbol=BTC%2FUSD``), which DuckDB, polars
and pyarrow decode. As in Hive and Spark, the partition columns (``symbol`` or ``feed``, ``date``,
``hour``) live in the path only, not in the files, so ``pandas.read_parquet(<dataset dir>)``,
DuckDB ``read_parquet('<dataset>/**/*.parquet', hive_partitioning=1)`` and polars
``scan_parquet('<dataset>/**/*.parquet', hive_partitioning=True)`` all read a dataset directly.
``hour`` is not zero-padded so every reader infers an integer.

Columns
-------
:func:`arrow_schema_for` maps the topic's current Avro value schema: records -> structs, arrays ->
lists, maps -> maps, enums -> strings (dictionary-encoded in the files), ``["null", X]`` -> a
nullable X, every other field non-nullable; logical types are stored as their underlying type
(the catalog uses none). Five columns follow the record's: ``_topic``, ``_partition``,
``_offset``, ``_key`` (the UTF-8 record key) and ``_timestamp_ms`` (the Kafka record timestamp),
so a row can always be traced back to (and replayed as) its Kafka record.

Chunks and files
----------------
The sink cuts the records of one Kafka partition into **chunks**: consecutive offset ranges
``[first, last]``; each chunk starts right after the previous one (``first`` = the committed
offset), so the ranges tile the partition's offsets, including the offsets of transaction
markers, aborted records and dead-lettered records. A chunk is written as one file per hive
directory its rows fall in, every file named ``<topic>+<partition>+<first>+<last>.parquet``
(offsets zero-padded to 20 digits); each file's footer holds the chunk's description (key
``quotewatch.lake.chunk``: topic, partition, first, last and the list of the chunk's files), so
a reader can tell a complete chunk from one cut short by a crash. The file holding the chunk's
first row is always written first (the sink's crash recovery relies on it; see
``quotewatch.services.lake_sink``). Files are zstd-compressed with row groups of at most
:data:`ROW_GROUP_ROWS` rows, rows in offset order, with statistics (``ts_event`` min/max prune
time ranges).

A file is published atomically: on a local disk it is written to a hidden temporary name,
fsynced, renamed and its directory fsynced; on an object store (S3, GCS, Azure) it is uploaded
straight to its final key, and the object becomes visible only when the upload completes (a
PutObject, or pyarrow's multipart upload, whose completion is atomic too), so no temporary
object and no rename are needed. Publishing the same chunk again writes the same bytes under the
same name.

Coverage and holes
------------------
Because chunk ranges tile the offsets the sink consumed, an offset that belongs to no chunk
between a partition's first and last chunk is **missing data**, never a transaction marker: a
marker's offset lies inside the range of the chunk after it. :func:`lake_info` reports such
holes, ranges covered twice by chunks with different names (overlaps) and chunks whose files
are not all present (incomplete).
"""

from __future__ import annotations

from quotewatch.core.lake.files import (
    CHUNK_DESCRIPTION_MAX_BYTES,
    CHUNK_DESCRIPTION_MAX_FILES,
    ChunkRecord,
    LakeLocation,
    Publisher,
    WrittenFile,
    chunk_description,
    dataset_uri,
    encode_file,
    find_chunk,
    lake_location,
    last_chunk,
    missing_files,
    publish_file,
    write_chunk,
)
from quotewatch.core.lake.info import (
    DatasetInfo,
    IncompleteChunk,
    PartitionCoverage,
    dataset_info,
    format_lake_info,
    format_ns,
    lake_info,
)
from quotewatch.core.lake.layout import (
    CHUNK_METADATA_KEY,
    COMPRESSION,
    FILE_SUFFIX,
    HOUR_NS,
    LAKE_TOPICS,
    MAX_PARTITION_VALUE_CHARS,
    META_COLUMNS,
    ROW_GROUP_ROWS,
    AvroSchemas,
    ChunkName,
    LakeError,
    LakeRecordError,
    LakeRow,
    arrow_schema_for,
    avro_to_arrow,
    encode_partition_value,
    file_name,
    file_schema_for,
    hour_partition,
    lake_row,
    parse_file_name,
    partition_column,
    partition_dir,
    record_dir,
)
from quotewatch.core.lake.reading import (
    open_dataset,
    read_dataset,
    read_table,
)

__all__ = [
    "CHUNK_DESCRIPTION_MAX_BYTES",
    "CHUNK_DESCRIPTION_MAX_FILES",
    "CHUNK_METADATA_KEY",
    "COMPRESSION",
    "FILE_SUFFIX",
    "HOUR_NS",
    "LAKE_TOPICS",
    "MAX_PARTITION_VALUE_CHARS",
    "META_COLUMNS",
    "ROW_GROUP_ROWS",
    "AvroSchemas",
    "ChunkName",
    "ChunkRecord",
    "DatasetInfo",
    "IncompleteChunk",
    "LakeError",
    "LakeLocation",
    "LakeRecordError",
    "LakeRow",
    "PartitionCoverage",
    "Publisher",
    "WrittenFile",
    "arrow_schema_for",
    "avro_to_arrow",
    "chunk_description",
    "dataset_info",
    "dataset_uri",
    "encode_file",
    "encode_partition_value",
    "file_name",
    "file_schema_for",
    "find_chunk",
    "format_lake_info",
    "format_ns",
    "hour_partition",
    "lake_info",
    "lake_location",
    "lake_row",
    "last_chunk",
    "missing_files",
    "open_dataset",
    "parse_file_name",
    "partition_column",
    "partition_dir",
    "publish_file",
    "read_dataset",
    "read_table",
    "record_dir",
    "write_chunk",
]
