"""The topic catalog: every topic of QuoteWatch, its key, partitioning, configs and value schema.

Topic names are ``<TOPIC_PREFIX>.<suffix>`` (default prefix ``qw``), so a replay or a test runs in
its own namespace. Keys are UTF-8 strings (the symbol, or the feed for the raw log); values are
Avro records (see :mod:`quotewatch.core.serde`). Record timestamps are the producers' create
time (wall clock), used only for latency measurements and to find replay windows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

DAY_MS = 24 * 60 * 60 * 1000
# A BTC-USD level-2 snapshot frame is several MB of JSON; the broker default (1 MB) is too small.
LARGE_MESSAGE_BYTES = 32 * 1024 * 1024
REPLICAS = 3
"""Replication factor of every topic on a cluster of at least this many brokers."""


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of the topics on a cluster of ``brokers`` brokers.

    Three replicas and ``min.insync.replicas=2`` from three brokers up: with ``acks=all`` (every
    producer of ours) a write is on two brokers before it is acknowledged, so any one broker may
    die, even by ``kill -9``, without losing an acknowledged record, and writes go on while it is
    down. Fewer brokers: one replica per broker (a single broker: 1 and 1).
    """
    replicas = max(1, min(REPLICAS, brokers))
    return replicas, max(1, replicas - 1)


class CleanupPolicy(StrEnum):
    DELETE = "delete"
    COMPACT = "compact"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic of the catalog."""

    suffix: str
    """Name without the prefix, e.g. ``md.events``."""
    value_schema: str
    """Full name of the Avro record on this topic (``quotewatch.X`` -> ``schemas/quotewatch.X.avsc``)."""
    key: str
    """What the record key is (UTF-8 string)."""
    partitions: int
    cleanup_policy: CleanupPolicy
    retention_ms: int | None
    """None keeps records forever (compacted topics)."""
    description: str
    extra_configs: Mapping[str, str] = field(default_factory=dict)

    def name(self, prefix: str) -> str:
        """The full topic name in namespace ``prefix``."""
        return f"{prefix}.{self.suffix}"

    def configs(self, replicas: int = 1) -> dict[str, str]:
        """Topic-level configs applied by ``quotewatch topics create`` to a topic of ``replicas`` replicas.

        A replicated topic also gets its ``min.insync.replicas`` (:func:`replication_for`); a
        single replica keeps the broker's default.
        """
        configs = {"cleanup.policy": str(self.cleanup_policy)}
        configs["retention.ms"] = str(self.retention_ms if self.retention_ms is not None else -1)
        if replicas > 1:
            configs["min.insync.replicas"] = str(max(1, replicas - 1))
        configs.update(self.extra_configs)
        return configs


MD_RAW = TopicSpec(
    suffix="md.raw",
    value_schema="quotewatch.RawFrame",
    key="feed (one partition: the total order of frames as received)",
    partitions=1,
    cleanup_policy=CleanupPolicy.DELETE,
    retention_ms=7 * DAY_MS,
    description="Every WebSocket frame exactly as received, plus connect/disconnect/overflow/clock control "
    "records: the complete input log of the normaliser and the source of truth for replays.",
    extra_configs={"max.message.bytes": str(LARGE_MESSAGE_BYTES), "compression.type": "producer"},
)
MD_EVENTS = TopicSpec(
    suffix="md.events",
    value_schema="quotewatch.MarketEvent",
    key="symbol",
    partitions=3,
    cleanup_policy=CleanupPolicy.DELETE,
    retention_ms=7 * DAY_MS,
    description="Normalised market events in order per symbol: book snapshot, update batch, trade, "
    "heartbeat, clock, gap/reset, feed status.",
    extra_configs={"max.message.bytes": str(LARGE_MESSAGE_BYTES), "compression.type": "producer"},
)
BOOK_TOP3 = TopicSpec(
    suffix="book.top3",
    value_schema="quotewatch.BookTop",
    key="symbol",
    partitions=3,
    cleanup_policy=CleanupPolicy.DELETE,
    retention_ms=30 * DAY_MS,
    description="Best 3 bid and ask levels of each synced book at every event-time grid tick.",
)
FEATURES = TopicSpec(
    suffix="features",
    value_schema="quotewatch.FeatureVector",
    key="symbol",
    partitions=3,
    cleanup_policy=CleanupPolicy.DELETE,
    retention_ms=30 * DAY_MS,
    description="The feature vector x(t) of each symbol at every grid tick (feature spec named in the record).",
)
LABELS = TopicSpec(
    suffix="labels",
    value_schema="quotewatch.Label",
    key="symbol",
    partitions=3,
    cleanup_policy=CleanupPolicy.DELETE,
    retention_ms=30 * DAY_MS,
    description="y(t): did the best bid or ask price change between t and t + DELTA_MS.",
)
PREDICTIONS = TopicSpec(
    suffix="predictions",
    value_schema="quotewatch.Prediction",
    key="symbol",
    partitions=3,
    cleanup_policy=CleanupPolicy.DELETE,
    retention_ms=30 * DAY_MS,
    description="p_change for every feature tick, from the champion (and the challenger in shadow) or the fallback.",
)
SNAPSHOT = TopicSpec(
    suffix="snapshot",
    value_schema="quotewatch.Snapshot",
    key="symbol",
    partitions=1,
    cleanup_policy=CleanupPolicy.COMPACT,
    retention_ms=None,
    description="Latest prices, features, p_change, model and live metrics per symbol, for the dashboard.",
    extra_configs={
        "min.cleanable.dirty.ratio": "0.1",
        "segment.ms": "600000",
        "delete.retention.ms": "60000",
    },
)
DLQ = TopicSpec(
    suffix="dlq",
    value_schema="quotewatch.DeadLetter",
    key="source topic",
    partitions=1,
    cleanup_policy=CleanupPolicy.DELETE,
    retention_ms=30 * DAY_MS,
    description="Dead letters: records and frames a service could not process, with topic, partition, "
    "offset and reason.",
    extra_configs={"max.message.bytes": str(LARGE_MESSAGE_BYTES)},
)

CATALOG: Mapping[str, TopicSpec] = MappingProxyType(
    {spec.suffix: spec for spec in (MD_RAW, MD_EVENTS, BOOK_TOP3, FEATURES, LABELS, PREDICTIONS, SNAPSHOT, DLQ)}
)


def spec_for_topic(topic: str, prefix: str) -> TopicSpec:
    """The catalog entry of a full topic name in namespace ``prefix``.

    Raises:
        KeyError: the topic is not ``<prefix>.<suffix>`` of a catalog topic.
    """
    head = prefix + "."
    if not topic.startswith(head) or topic[len(head) :] not in CATALOG:
        raise KeyError(f"{topic!r} is not a QuoteWatch topic in namespace {prefix!r}")
    return CATALOG[topic[len(head) :]]


def split_topic(topic: str) -> tuple[str, TopicSpec]:
    """Split a full topic name into (prefix, spec), whatever the prefix.

    Raises:
        KeyError: no catalog suffix ends the name.
    """
    for suffix, spec in CATALOG.items():
        if topic.endswith("." + suffix) and len(topic) > len(suffix) + 1:
            return topic[: -len(suffix) - 1], spec
    raise KeyError(f"{topic!r} does not end with a QuoteWatch topic suffix ({', '.join(CATALOG)})")


@dataclass(frozen=True, slots=True)
class TopicNames:
    """The full topic names of one namespace: ``TopicNames("qw").md_events == "qw.md.events"``."""

    prefix: str

    @property
    def md_raw(self) -> str:
        return MD_RAW.name(self.prefix)

    @property
    def md_events(self) -> str:
        return MD_EVENTS.name(self.prefix)

    @property
    def book_top3(self) -> str:
        return BOOK_TOP3.name(self.prefix)

    @property
    def features(self) -> str:
        return FEATURES.name(self.prefix)

    @property
    def labels(self) -> str:
        return LABELS.name(self.prefix)

    @property
    def predictions(self) -> str:
        return PREDICTIONS.name(self.prefix)

    @property
    def snapshot(self) -> str:
        return SNAPSHOT.name(self.prefix)

    @property
    def dlq(self) -> str:
        return DLQ.name(self.prefix)

    def all(self) -> list[str]:
        """Every topic of the namespace, in catalog order."""
        return [spec.name(self.prefix) for spec in CATALOG.values()]
