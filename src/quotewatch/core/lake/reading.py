"""Reading a lake dataset (the trainer, the backtest, notebooks): filters by time and symbol,
duplicates from overlapping chunks dropped."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from quotewatch.core.lake.files import LakeLocation, lake_location
from quotewatch.core.lake.layout import (
    _EPOCH,
    HOUR_NS,
    LakeError,
    _spec,
    arrow_schema_for,
    file_schema_for,
    partition_column,
)
from quotewatch.core.topics import (
    MD_RAW,
)

if TYPE_CHECKING:  # pandas is imported by pyarrow's to_pandas() only when read_dataset is called
    import pandas as pd

logger = logging.getLogger(__name__)

# -- reading datasets ------------------------------------------------------------------------------


def _partitioning(column: str) -> ds.Partitioning:
    return ds.partitioning(
        pa.schema([(column, pa.string()), ("date", pa.date32()), ("hour", pa.int32())]), flavor="hive"
    )


def open_dataset(lake: str | LakeLocation, topic: str) -> ds.Dataset:
    """``topic``'s dataset as a :class:`pyarrow.dataset.Dataset` with its hive partition columns typed
    (``symbol``/``feed`` string, ``date`` date32, ``hour`` int32). Hidden files are ignored.

    Raises:
        LakeError: ``topic`` is not a lake topic.
    """
    location = lake_location(lake)
    spec = _spec(topic)
    column = partition_column(spec)
    schema = file_schema_for(topic)
    full = pa.schema(
        [*schema, pa.field(column, pa.string()), pa.field("date", pa.date32()), pa.field("hour", pa.int32())],
        metadata=schema.metadata,
    )
    path = location.dataset_path(topic)
    info = location.filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return ds.dataset(pa.table({f.name: pa.array([], f.type) for f in full}, schema=full))
    return ds.dataset(
        path,
        filesystem=location.filesystem,
        format="parquet",
        partitioning=_partitioning(column),
        schema=full,
    )


def read_table(
    lake: str | LakeLocation,
    topic: str,
    *,
    symbols: Iterable[str] | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Rows of ``topic`` from the lake as an Arrow table, each Kafka record once, in (partition, offset) order.

    Args:
        topic: full topic name, e.g. ``qw.features`` (its prefix picks the namespace).
        symbols: keep these symbols only (for ``md.raw``: frames whose ``symbols`` names one).
        start_ns, end_ns: keep ``start_ns <= ts_event < end_ns`` (hour partitions outside are not opened).
        columns: the columns to return (default: :func:`arrow_schema_for` + ``date``, ``hour``).

    Rows that two files both hold (overlapping chunks, e.g. after a manual copy) come back once.
    """
    spec = _spec(topic)
    column = partition_column(spec)
    dataset = open_dataset(lake, topic)
    wanted = list(columns) if columns is not None else [*arrow_schema_for(topic).names, "date", "hour"]
    unknown = [name for name in wanted if name not in dataset.schema.names]
    if unknown:
        raise LakeError(f"{topic} has no column(s) {unknown}; columns: {dataset.schema.names}")
    wanted_symbols = sorted(set(symbols)) if symbols is not None else None
    expression = _time_filter(start_ns, end_ns)
    raw_symbol_filter = spec.suffix == MD_RAW.suffix and wanted_symbols is not None
    if wanted_symbols is not None and not raw_symbol_filter:
        symbol_filter = ds.field(column).isin(wanted_symbols)
        expression = symbol_filter if expression is None else expression & symbol_filter
    needed = list(dict.fromkeys([*wanted, "_partition", "_offset", *(["symbols"] if raw_symbol_filter else [])]))
    table = dataset.to_table(columns=needed, filter=expression)
    if raw_symbol_filter and wanted_symbols is not None:
        table = _rows_naming(table, wanted_symbols)
    table = _deduplicate(table)
    return table.select(wanted)


def read_dataset(
    lake: str | LakeLocation,
    topic: str,
    *,
    symbols: Iterable[str] | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`read_table` as a pandas DataFrame (structs -> dicts, lists -> arrays), index 0..n-1."""
    return read_table(lake, topic, symbols=symbols, start_ns=start_ns, end_ns=end_ns, columns=columns).to_pandas()


def _time_filter(start_ns: int | None, end_ns: int | None) -> ds.Expression | None:
    expression: ds.Expression | None = None
    if start_ns is not None:
        day, hour = _day_and_hour(start_ns)
        after = (ds.field("date") > day) | ((ds.field("date") == day) & (ds.field("hour") >= hour))
        expression = after & (ds.field("ts_event") >= start_ns)
    if end_ns is not None:
        day, hour = _day_and_hour(end_ns)
        before = (ds.field("date") < day) | ((ds.field("date") == day) & (ds.field("hour") <= hour))
        upper = before & (ds.field("ts_event") < end_ns)
        expression = upper if expression is None else expression & upper
    return expression


def _day_and_hour(ts_ns: int) -> tuple[date, int]:
    moment = _EPOCH + timedelta(hours=ts_ns // HOUR_NS)
    return moment.date(), moment.hour


def _rows_naming(table: pa.Table, symbols: list[str]) -> pa.Table:
    lists = table["symbols"].combine_chunks()
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    hits = pc.filter(parents, pc.is_in(flat, value_set=pa.array(symbols, pa.string())))
    return table.take(pc.unique(hits))


def _deduplicate(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("_partition", "ascending"), ("_offset", "ascending")])
    table = table.take(order)
    partitions = table["_partition"].to_numpy()
    offsets = table["_offset"].to_numpy()
    keep = np.ones(table.num_rows, dtype=bool)
    keep[1:] = (partitions[1:] != partitions[:-1]) | (offsets[1:] != offsets[:-1])
    return table if keep.all() else table.filter(pa.array(keep))
