"""Realistic records for every lake topic, made from the recorded Coinbase captures.

The raw frames are the captures' own (``quotewatch.domain.venue.captures``); the market events come out
of the real normaliser, the top-3 and feature vectors out of the real book pipeline, the labels
out of the real labeler. Predictions (no inference domain code yet) are scored from the feature
vectors with a fixed logistic formula and alternate champion/challenger roles. Three captures give
two feeds, twelve symbols, every MarketEvent body (snapshot, update, trade, gap, status,
heartbeat) and an hour boundary (2018-04-17 00:55 -> 01:05 UTC).

Also: producing them to a namespace the way the services do (raw and events with an idempotent
producer; derived topics in transactions, with an aborted transaction in between, so their
partitions hold commit markers and aborted records).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from quotewatch.core import lake
from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config
from quotewatch.core.records import FeatureVector, ModelRole, Prediction, Record
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler
from quotewatch.domain.venue.captures import read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from tests.helpers import committed_past, shared_data_dir
from tests.records import plain as plain_datum

CAPTURES = (
    "exchange_level2_BTC-USD_2018-04-17_gdax-orderbook-ml.jsonl",
    "exchange_level2_ticker_matches_10products_2021-04-17_cryptofeed.jsonl",
    "advanced_trade_level2_BTC-USD_ETH-USD_2026-08-09_cryptofeed.jsonl.gz",
)
TRANSACTIONAL = ("book.top3", "features", "labels", "predictions")
"""Derived topics: written in transactions by the services, so their logs hold commit markers."""

Keyed = tuple[str, Record]


@cache
def capture_records(frames_per_capture: int | None = None) -> dict[str, tuple[Keyed, ...]]:
    """``suffix -> ((key, record), ...)`` for the six lake topics, in production order.

    ``frames_per_capture`` keeps the first N frames of each capture (all by default).
    """
    out: dict[str, list[Keyed]] = {s: [] for s in ("md.raw", "md.events", *TRANSACTIONAL)}
    for name in CAPTURES:
        capture = read_capture(shared_data_dir() / name)
        raws = list(capture.raw_frames(disconnect=True))
        if frames_per_capture is not None:
            raws = raws[: frames_per_capture + 1]
        events, _ = Normaliser().process_all(raws)
        out["md.raw"].extend((raw.feed, raw) for raw in raws)
        out["md.events"].extend((event.symbol, event) for event in events)
        book = BookPipeline(100)
        labeler = Labeler(500, 100)
        for event in events:
            for tick in book.process(event):
                top = tick.book_top
                out["book.top3"].append((top.symbol, top))
                label = labeler.process(top)
                if label is not None:
                    out["labels"].append((label.symbol, label))
                if tick.features is not None:
                    out["features"].append((top.symbol, tick.features))
                    roles: tuple[ModelRole, ...] = ("CHAMPION", "CHALLENGER")
                    for role in roles:
                        prediction = predict(tick.features, role)
                        out["predictions"].append((prediction.symbol, prediction))
    return {suffix: tuple(records) for suffix, records in out.items()}


def predict(features: FeatureVector, role: ModelRole) -> Prediction:
    """A Prediction of a FeatureVector: a fixed logistic score of its first values (deterministic)."""
    values = [v for v in features.values[:4] if math.isfinite(v)]
    score = sum(values) * (0.7 if role == "CHAMPION" else 0.3)
    return Prediction(
        ts_event=features.ts_event,
        ts_init=features.ts_init,
        exchange=features.exchange,
        symbol=features.symbol,
        p_change=1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, score)))),
        model_name="quotewatch",
        model_version="3" if role == "CHAMPION" else "4",
        model_role=role,
        feature_spec_id=features.feature_spec_id,
    )


@dataclass(frozen=True)
class ProducedRecord:
    topic: str
    partition: int
    offset: int
    key: str
    value: bytes


class _Collector:
    def __init__(self) -> None:
        self.delivered: list[Message] = []
        self.errors: list[str] = []

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered.append(message)
        else:
            self.errors.append(str(error))


def produce_records(
    settings: CommonSettings,
    records: Mapping[str, Iterable[Keyed]],
    *,
    transaction_size: int = 400,
    serde: AvroSerde | None = None,
) -> list[ProducedRecord]:
    """Produce ``records`` (suffix -> keyed records) to the namespace of ``settings``.

    ``md.*`` go through an idempotent producer; the derived topics through a transactional one,
    ``transaction_size`` records per transaction, with one aborted transaction of junk after the
    first. Returns what readers with read_committed see, with offsets, in production order.
    """
    serde = serde or AvroSerde()
    names = TopicNames(settings.topic_prefix)
    bootstrap = {"bootstrap.servers": settings.kafka_bootstrap_servers, "message.max.bytes": 33 * 1024 * 1024}
    produced: list[ProducedRecord] = []

    plain = _Collector()
    producer = Producer({**bootstrap, "enable.idempotence": True, "linger.ms": 5, "on_delivery": plain})
    for suffix in ("md.raw", "md.events"):
        topic = f"{names.prefix}.{suffix}"
        for key, value in records.get(suffix, ()):
            _produce(producer, topic, key, serde.encode(topic, value))
    assert producer.flush(60) == 0
    assert not plain.errors, plain.errors
    produced.extend(_as_produced(plain.delivered))

    committed = _Collector()
    transactional = Producer(
        {
            **bootstrap,
            "transactional.id": f"factory-{uuid.uuid4().hex[:8]}",
            "linger.ms": 5,
            "on_delivery": committed,
        }
    )
    transactional.init_transactions(30)
    batch: list[tuple[str, str, bytes]] = []
    aborted_once = False
    for suffix in TRANSACTIONAL:
        topic = f"{names.prefix}.{suffix}"
        for key, value in records.get(suffix, ()):
            batch.append((topic, key, serde.encode(topic, value)))
            if len(batch) >= transaction_size:
                _commit_batch(transactional, batch)
                batch = []
                if not aborted_once:
                    aborted_once = True
                    _abort_junk(transactional, topic, committed)
    if batch:
        _commit_batch(transactional, batch)
    assert transactional.flush(60) == 0
    assert not committed.errors, committed.errors
    produced.extend(_as_produced(committed.delivered))
    return produced


def _commit_batch(producer: Producer, batch: list[tuple[str, str, bytes]]) -> None:
    producer.begin_transaction()
    for topic, key, value in batch:
        _produce(producer, topic, key, value)
    producer.commit_transaction(60)


def _abort_junk(producer: Producer, topic: str, collector: _Collector) -> None:
    """An aborted transaction: its records occupy offsets but read_committed readers never see them."""
    before = len(collector.delivered)
    producer.begin_transaction()
    for index in range(25):
        _produce(producer, topic, "BTC-USD", b"aborted junk %d" % index)
    producer.flush(30)
    producer.abort_transaction(30)
    aborted = collector.delivered[before:]
    del collector.delivered[before:]
    assert len(aborted) == 25


def _produce(producer: Producer, topic: str, key: str, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, key=key.encode(), value=value)
            break
        except BufferError:
            producer.poll(0.1)
    producer.poll(0)


def _as_produced(messages: list[Message]) -> list[ProducedRecord]:
    return [
        ProducedRecord(
            m.topic() or "", m.partition() or 0, m.offset() or 0, (m.key() or b"").decode(), m.value() or b""
        )
        for m in messages
    ]


# -- checking the lake -----------------------------------------------------------------------------


def lake_offsets(root: Path | str, topic: str) -> list[tuple[int, int]]:
    """(partition, offset) of every row of every file, duplicates included (no deduplication)."""
    table = lake.open_dataset(str(root), topic).to_table(columns=["_partition", "_offset"])
    return sorted(zip(table["_partition"].to_pylist(), table["_offset"].to_pylist(), strict=True))


def rows_in_lake(root: Path | str, topics: list[str]) -> int:
    return sum(len(lake_offsets(root, topic)) for topic in topics)


def committed_offsets(settings: CommonSettings, topic: str, partitions: int, group: str | None = None) -> list[int]:
    consumer = Consumer(consumer_config(settings, group or f"{settings.topic_prefix}.lake-sink", "committed-check"))
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in found]
    finally:
        consumer.close()


def assert_lake_holds_exactly(root: Path | str, produced: list[ProducedRecord]) -> None:
    """Each produced record is in the lake exactly once (across all files), with identical content."""
    serde = AvroSerde()
    by_topic: dict[str, list[ProducedRecord]] = {}
    for record in produced:
        by_topic.setdefault(record.topic, []).append(record)
    for topic, records in by_topic.items():
        expected = sorted((r.partition, r.offset) for r in records)
        assert lake_offsets(root, topic) == expected, f"{topic}: offsets lost or written twice"
        rows = {(row["_partition"], row["_offset"]): row for row in lake.read_table(str(root), topic).to_pylist()}
        for record in records:
            row = rows[(record.partition, record.offset)]
            decoded = plain_datum(serde.decode(record.value, topic))  # the record's Avro datum: what the columns hold
            # repr() so that NaN feature values compare equal to themselves.
            assert repr({key: row[key] for key in decoded}) == repr(decoded), (topic, record.partition, record.offset)
            assert (row["_topic"], row["_key"]) == (topic, record.key)


def committed_everything(settings: CommonSettings, produced: list[ProducedRecord], group: str | None = None) -> bool:
    """Has the sink's group committed past every produced record? (Then every file is written.)"""
    last: dict[tuple[str, int], int] = {}
    for record in produced:
        last[(record.topic, record.partition)] = max(record.offset, last.get((record.topic, record.partition), -1))
    return committed_past(settings, group or f"{settings.topic_prefix}.lake-sink", last)
