"""Feature vectors and labels of the synthetic market, made by the real pipeline, and a lake of them.

The synthetic feed (:mod:`quotewatch.domain.simulation.synthetic`, the one ``quotewatch feed serve
--synthetic`` serves) goes through the real normaliser, book/feature pipeline and labeler, so
the records are exactly what ``qw.features`` and ``qw.labels`` carry live. The market is built so
that quote changes are partly predictable from the book, so models learn something real.

:func:`write_lake` files them in the Parquet lake with :mod:`quotewatch.core.lake` (the layout
and chunk files the lake sink writes), one chunk per Kafka partition, for ``quotewatch train``.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from quotewatch.core import lake
from quotewatch.core.records import FeatureVector, Label
from quotewatch.core.topics import FEATURES, LABELS, TopicNames, TopicSpec
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.normaliser import Normaliser

SYMBOLS = ("BTC-USD", "ETH-USD")
TICK_MS = 100
DELTA_MS = 500


@lru_cache(maxsize=8)
def _ticks(seconds: int, symbols: tuple[str, ...], seed: int) -> tuple[tuple[FeatureVector, ...], tuple[Label, ...]]:
    config = SyntheticConfig(symbols=symbols, seed=seed, rate=50.0)
    normaliser, pipeline, labeler = Normaliser(), BookPipeline(TICK_MS), Labeler(DELTA_MS, TICK_MS)
    features: list[FeatureVector] = []
    labels: list[Label] = []
    for frame in synthetic_raw_frames("coinbase-advanced", config, seconds * 1_000_000_000, tick_ms=TICK_MS):
        for event in normaliser.process(frame).events:
            for output in pipeline.process(event):
                if output.features is not None:
                    features.append(output.features)
                label = labeler.process(output.book_top)
                if label is not None:
                    labels.append(label)
    return tuple(features), tuple(labels)


def synthetic_ticks(
    seconds: int = 300, symbols: Sequence[str] = SYMBOLS, seed: int = 3
) -> tuple[list[FeatureVector], list[Label]]:
    """(FeatureVector records, Label records) of ``seconds`` of the synthetic market, in event order.

    Cached per arguments (callers get fresh lists of the same frozen records).
    """
    features, labels = _ticks(seconds, tuple(symbols), seed)
    return list(features), list(labels)


def kafka_partition(symbol: str, partitions: int = 3) -> int:
    """A stable partition per symbol (the test's own producer uses it; any stable choice works)."""
    return zlib.crc32(symbol.encode()) % partitions


def write_lake(lake_uri: str | Path, prefix: str, features: Sequence[FeatureVector], labels: Sequence[Label]) -> None:
    """File ``features`` and ``labels`` under ``<lake_uri>/<prefix>.features`` and ``<prefix>.labels``."""
    names = TopicNames(prefix)
    datasets: tuple[tuple[TopicSpec, str, Sequence[FeatureVector | Label]], ...] = (
        (FEATURES, names.features, features),
        (LABELS, names.labels, labels),
    )
    for spec, topic, records in datasets:
        by_partition: dict[int, list[FeatureVector | Label]] = defaultdict(list)
        for record in records:
            by_partition[kafka_partition(record.symbol, spec.partitions)].append(record)
        schema = lake.file_schema_for(topic)
        for partition, rows in by_partition.items():
            groups: dict[str, list[lake.LakeRow]] = {}
            for offset, record in enumerate(rows):
                row = lake.lake_row(record, topic, partition, offset, record.symbol, record.ts_init // 1_000_000)
                groups.setdefault(lake.partition_dir(topic, row), []).append(row)
            tables = [(directory, pa.Table.from_pylist(rows_, schema=schema)) for directory, rows_ in groups.items()]
            lake.write_chunk(str(lake_uri), topic, partition, 0, len(rows) - 1, tables)
