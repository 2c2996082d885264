"""Kafka client helpers every service uses.

- :func:`producer_config` / :func:`make_producer`: idempotent producers (acks=all, compression),
  optionally transactional.
- :func:`consumer_config` / :func:`make_consumer`: manual offset handling, read_committed.
- :func:`ensure_topics` / :func:`describe_topics`: the catalog applied to a broker.
- :class:`ShutdownSignal`: SIGTERM/SIGINT -> finish the record, flush, commit, close.
- :class:`DeliveryTracker`: delivery failures of a non-transactional producer are never silent.

The consume-transform-produce loop with exactly-once semantics is
:class:`quotewatch.core.runtime.StreamProcessor`; dead letters are mapped by
:mod:`quotewatch.core.runtime.deadletter`.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ClusterMetadata,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import BrokerError, ConfigError, FatalError
from quotewatch.core.topics import CATALOG, LARGE_MESSAGE_BYTES, TopicSpec, replication_for

ClientConfig = dict[str, Any]  # not a topic record: a librdkafka client configuration

logger = logging.getLogger(__name__)

FETCH_WAIT_MAX_MS = 500
"""How long the broker may hold a consumer's fetch when there is nothing new (librdkafka's default)."""

FETCH_QUEUE_BACKOFF_MS = 20
"""How long a consumer whose local queue is full waits before fetching again (librdkafka's default: 1000)."""


def client_config(settings: CommonSettings) -> ClientConfig:
    """Bootstrap servers and the librdkafka security passthrough (secrets unwrapped here only)."""
    conf: ClientConfig = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "security.protocol": settings.kafka_security_protocol,
    }
    optional = {
        "sasl.mechanism": settings.kafka_sasl_mechanism,
        "sasl.username": settings.kafka_sasl_username,
        "sasl.password": settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
        "ssl.ca.location": settings.kafka_ssl_ca_location,
        "ssl.certificate.location": settings.kafka_ssl_certificate_location,
        "ssl.key.location": settings.kafka_ssl_key_location,
        "ssl.key.password": (
            settings.kafka_ssl_key_password.get_secret_value() if settings.kafka_ssl_key_password else None
        ),
        "debug": settings.kafka_debug,
    }
    conf.update({key: value for key, value in optional.items() if value is not None})
    return conf


def producer_config(
    settings: CommonSettings, client_id: str, transactional_id: str | None = None, **overrides: Any
) -> ClientConfig:
    """An idempotent producer: acks=all and enable.idempotence, so retries never duplicate or reorder."""
    conf = client_config(settings)
    conf.update(
        {
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 1,
            "message.max.bytes": LARGE_MESSAGE_BYTES + 1024 * 1024,
            "queue.buffering.max.kbytes": 256 * 1024,
        }
    )
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = 60_000
        # A transaction begun right after a commit finds the coordinator still writing the last
        # one's markers: AddPartitionsToTxn answers CONCURRENT_TRANSACTIONS and is retried after
        # retry.backoff.ms. With librdkafka's default (100 ms, doubling) send_offsets_to_transaction
        # took p50 104 ms in a consume-transform-produce loop at 20/s, with 5 ms 2.4 ms (measured,
        # see docs/benchmarks.md); the Java client uses 20 ms for this (KAFKA-5477).
        conf["retry.backoff.ms"] = 5
        conf["retry.backoff.max.ms"] = 250
    conf.update(overrides)
    return conf


def make_producer(
    settings: CommonSettings, client_id: str, transactional_id: str | None = None, **overrides: Any
) -> Producer:
    """Build a producer (see :func:`producer_config`).

    Raises:
        ConfigError: librdkafka refused the configuration (e.g. an SSL file that does not exist).
    """
    return _build("producer", Producer, producer_config(settings, client_id, transactional_id, **overrides))


def consumer_config(settings: CommonSettings, group_id: str, client_id: str, **overrides: Any) -> ClientConfig:
    """A consumer that never commits on its own and reads only committed transactional data."""
    conf = client_config(settings)
    conf.update(
        {
            "group.id": group_id,
            "client.id": client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            # A fetch is a long poll that the broker answers as soon as committed data is there
            # (for read_committed: when the commit marker lands), so this bounds only how often an
            # idle consumer asks again. Measured on the local broker: a record's latency from
            # commit_transaction to poll was p50 1.4-2.5 ms with 10 and with 500, but four idle
            # consumers at 10 cost the broker ~0.4 of a core (docs/benchmarks.md, replay).
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
            "fetch.max.bytes": 2 * LARGE_MESSAGE_BYTES,
            # Once the local queue holds queued.min.messages (100k) or queued.max.messages.kbytes
            # (64 MiB), librdkafka postpones the next fetch by this much (default 1000 ms). A reader
            # faster than that refill (a replay forwarding at 200k records/s) drained the queue and
            # then stalled 0.6-0.8 s mid-window; at 20 ms it does not (docs/benchmarks.md, replay).
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
        }
    )
    conf.update(overrides)
    return conf


def make_consumer(settings: CommonSettings, group_id: str, client_id: str, **overrides: Any) -> Consumer:
    """Build a consumer (see :func:`consumer_config`).

    Raises:
        ConfigError: librdkafka refused the configuration.
    """
    return _build("consumer", Consumer, consumer_config(settings, group_id, client_id, **overrides))


def make_admin(settings: CommonSettings) -> AdminClient:
    """Build an admin client (see :func:`client_config`).

    Raises:
        ConfigError: librdkafka refused the configuration.
    """
    return _build("admin client", AdminClient, client_config(settings))


_Client = TypeVar("_Client", Producer, Consumer, AdminClient)


def _build(kind: str, factory: Callable[[ClientConfig], _Client], config: ClientConfig) -> _Client:
    """A client, or a ConfigError naming what librdkafka refused (one clear line, not a traceback)."""
    try:
        return factory(config)
    except KafkaException as exc:
        raise ConfigError(f"cannot create a Kafka {kind} with these settings: {exc.args[0].str()}") from exc


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: int
    cleanup_policy: str


def ensure_topics(
    admin: AdminClient, prefix: str, specs: Iterable[TopicSpec] | None = None, timeout: float = 30.0
) -> list[str]:
    """Create the catalog's topics in namespace ``prefix`` and apply their configs. Idempotent.

    New topics get the replication of the cluster's size (:func:`cluster_size`,
    :func:`quotewatch.core.topics.replication_for`: 1 on a single broker, 3 with
    ``min.insync.replicas=2`` from three brokers up). Existing topics
    get their catalog configs set again (incremental alter, ``min.insync.replicas`` from their own
    replica count); a partition count or replication factor that differs from the catalog is
    reported, never changed (moving keys between partitions, or replicas between brokers, is an
    operator's decision).

    Returns:
        The names of the topics created by this call.

    Raises:
        BrokerError: the broker refused a creation or a config change.
    """
    specs = list(specs if specs is not None else CATALOG.values())
    metadata = _cluster_metadata(admin, timeout)
    existing = dict(metadata.topics)
    replicas, _ = replication_for(cluster_size(metadata))
    to_create = [spec for spec in specs if spec.name(prefix) not in existing]
    created: list[str] = []
    if to_create:
        futures = admin.create_topics(
            [
                NewTopic(
                    spec.name(prefix),
                    num_partitions=spec.partitions,
                    replication_factor=replicas,
                    config=spec.configs(replicas),
                )
                for spec in to_create
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BrokerError(f"cannot create topic {name}: {exc}") from exc
    existing_replicas: dict[str, int] = {}
    for spec in specs:
        name = spec.name(prefix)
        if name in existing:
            actual = len(existing[name].partitions)
            existing_replicas[name] = _replica_count(existing[name])
            if actual != spec.partitions:
                logger.warning(
                    "topic has a different partition count than the catalog",
                    extra={"topic": name, "partitions": actual, "catalog_partitions": spec.partitions},
                )
            if existing_replicas[name] != replicas:
                logger.warning(
                    "topic has a different replication factor than this cluster's topics get",
                    extra={"topic": name, "replicas": existing_replicas[name], "cluster_replicas": replicas},
                )
    resources = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            spec.name(prefix),
            incremental_configs=[
                ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
                for key, value in spec.configs(existing_replicas[spec.name(prefix)]).items()
            ],
        )
        for spec in specs
        if spec.name(prefix) in existing
    ]
    if resources:
        for resource, future in admin.incremental_alter_configs(resources, request_timeout=timeout).items():
            try:
                future.result()
            except KafkaException as exc:
                raise BrokerError(f"cannot apply configs to {resource.name}: {exc}") from exc
    if created:
        await_topics_visible(admin, created, timeout)
    return created


def cluster_size(metadata: ClusterMetadata) -> int:
    """How many brokers the cluster has: those answering now and those any partition has a replica on.

    A broker that is down is missing from the metadata's broker list but still named in the replica
    lists of its partitions, so a service that (re)starts while one broker of three is down still
    counts three. (A fresh cluster with a broker down and no topic yet cannot be told from a smaller one.)
    """
    replica_brokers = {
        broker
        for topic in metadata.topics.values()
        for partition in topic.partitions.values()
        for broker in partition.replicas
    }
    return len(set(metadata.brokers) | replica_brokers)


def _replica_count(topic: Any) -> int:
    """The replication factor of a topic in a metadata answer (its partitions' largest replica set)."""
    return max((len(partition.replicas) for partition in topic.partitions.values()), default=1)


def await_topics_visible(
    admin: AdminClient, names: Iterable[str], timeout: float = 30.0, wait: Callable[[float], object] = time.sleep
) -> None:
    """Return once every topic of ``names`` is in the broker's metadata with a leader on each partition.

    CreateTopics answers when the controller has committed the topics; the broker that serves
    metadata may apply them a moment later. Until then a metadata request (``topics list``, a
    producer's first send, a watermark query) does not see them. Asked again with a growing pause.

    Raises:
        BrokerError: a topic is still missing or leaderless after ``timeout``.
    """
    wanted = set(names)
    for time_left in retry_schedule(timeout, 0.02, wait):
        metadata = _topic_metadata(admin, time_left)
        pending = sorted(
            name
            for name in wanted
            if (topic := metadata.get(name)) is None
            or topic.error is not None
            or not topic.partitions
            or any(partition.leader < 0 for partition in topic.partitions.values())
        )
        if not pending:
            return
    raise BrokerError(f"topics created but not visible in the broker's metadata after {timeout:g} s: {pending}")


def retry_schedule(timeout: float, first_pause: float, wait: Callable[[float], object]) -> Iterator[float]:
    """The attempts of a bounded retry: yields the seconds left before the deadline (at least 0.1) for each.

    Between attempts it calls ``wait`` with a pause that doubles from ``first_pause`` up to 1 s. It
    stops when the next pause would pass the deadline, or when ``wait`` returns True (a shutdown
    event's ``wait``: a stop is not held up). The caller decides what an attempt's failure means.
    """
    deadline = time.monotonic() + timeout
    pause = first_pause
    while True:
        yield max(0.1, deadline - time.monotonic())
        if time.monotonic() + pause >= deadline or wait(pause) is True:
            return
        pause = min(1.0, pause * 2)


class TransientBackoff:
    """The pause after a transient failure (a dependency down, not the record's fault), unbounded in time.

    0.5 s, doubling up to 10 s, each waited with jitter in [pause/2, pause]; :meth:`reset` after a
    success. The stream processor and the lake sink pause this way before reading a batch again.
    """

    FIRST_PAUSE = 0.5
    MAX_PAUSE = 10.0

    def __init__(self) -> None:
        self.pause = 0.0
        """The pause the last :meth:`wait` was drawn under (0 after a success)."""

    def next_pause(self) -> float:
        self.pause = min(max(self.pause * 2, self.FIRST_PAUSE), self.MAX_PAUSE)
        return self.pause

    def wait(self, shutdown: ShutdownSignal) -> None:
        """Wait out :attr:`pause` (with jitter), or less if a shutdown is requested."""
        shutdown.wait(random.uniform(self.pause / 2, self.pause))  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self.pause = 0.0


def _topic_metadata(admin: AdminClient, timeout: float) -> dict[str, Any]:  # not a topic record: metadata
    """Every topic's metadata by name, as the broker answers now."""
    return dict(_cluster_metadata(admin, timeout).topics)


def _cluster_metadata(admin: AdminClient, timeout: float) -> ClusterMetadata:
    """The brokers and topics, as the cluster answers now."""
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerError(f"cannot list topics: {exc}") from exc


def describe_topics(admin: AdminClient, names: Iterable[str] | None = None, timeout: float = 30.0) -> list[TopicInfo]:
    """Name, partition count and cleanup policy of ``names`` (default: every non-internal topic)."""
    metadata = _topic_metadata(admin, timeout)
    wanted = sorted(names if names is not None else (t for t in metadata if not t.startswith("__")))
    wanted = [name for name in wanted if name in metadata]
    policies: dict[str, str] = {}
    if wanted:
        resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in wanted]
        for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
            try:
                entries = future.result()
                policies[resource.name] = str(entries["cleanup.policy"].value)
            except (KafkaException, KeyError) as exc:
                policies[resource.name] = f"unknown ({exc})"
    return [TopicInfo(name, len(metadata[name].partitions), policies.get(name, "?")) for name in wanted]


class ShutdownSignal:
    """SIGTERM/SIGINT set an event the processing loop checks between records.

    Who calls this: the service entry point, once, from the main thread. The loop then finishes
    the record (or batch) in hand, flushes, commits and closes.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> ShutdownSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logger.info("shutdown requested", extra={"signal": signal.Signals(signum).name})
        self._event.set()

    def set(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class DeliveryTracker:
    """Delivery callback for non-transactional producers: failures are counted and re-raised.

    A failed delivery after the idempotent producer's own retries means data would be lost, so
    :meth:`raise_if_failed` (called by the service loop before committing input offsets) raises
    :class:`FatalError` instead of carrying on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.delivered = 0
        self.failures: list[str] = []

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        with self._lock:
            if error is None:
                self.delivered += 1
            else:
                self.failures.append(f"{message.topic()}: {error}")

    def raise_if_failed(self) -> None:
        with self._lock:
            if self.failures:
                raise FatalError(f"{len(self.failures)} records were not delivered: {self.failures[:3]}")


def poll_batch(consumer: Consumer, max_records: int, timeout: float) -> list[Message]:
    """Take up to ``max_records`` already fetched; when there are none, wait up to ``timeout`` for one.

    librdkafka's ``consume(n, timeout)`` returns only when ``n`` records arrived or the timeout
    expired, which at live rates would hold every record back for the whole timeout.

    Every batch is what *one* librdkafka call returned. A rebalance (or seek) served inside a call
    purges the records that call had already collected for the partitions it resets, but a record
    handed out by an earlier call is beyond its reach: a batch made of ``poll()`` and then
    ``consume()`` could hold a record fetched under the old assignment after the callbacks that
    reset (or gave away) its partition, and the processor would then handle it against the reset
    state or commit it for a partition it no longer owns.
    """
    if max_records > 1:
        fetched = consumer.consume(max_records, 0)
        if fetched:
            return fetched
    first = consumer.poll(timeout)
    return [] if first is None else [first]


# Errors a watermark query meets while a partition's leader is being elected (right after the topic
# was created, or a broker restart): the same query succeeds a moment later. librdkafka does not flag
# them retriable() on this call, hence the list.
_TRANSIENT_QUERY_ERRORS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
    }
)


def query_watermarks(
    consumer: Consumer,
    partition: TopicPartition,
    timeout: float = 30.0,
    wait: Callable[[float], object] = time.sleep,
) -> tuple[int, int]:
    """The (low, high) offsets of ``partition`` asked of the broker, retrying transient errors.

    A leader not elected yet (a topic created a moment ago) or a broker restarting answers with an
    error that goes away: the query is repeated with a growing pause until ``timeout`` has passed.
    ``wait`` pauses between attempts; when it returns True the retries stop (a service passes its
    shutdown event's ``wait``, so a stop is not held up).

    Raises:
        KafkaException: a permanent error, or the transient one still there at the deadline (or stop).
    """
    last: KafkaException | None = None
    for time_left in retry_schedule(timeout, 0.05, wait):
        try:
            low, high = consumer.get_watermark_offsets(partition, timeout=time_left, cached=False)
            return int(low), int(high)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not (error.retriable() or error.code() in _TRANSIENT_QUERY_ERRORS):
                raise
            logger.debug("retrying a watermark query", extra={"partition": str(partition), "error": str(error)})
            last = exc
    assert last is not None  # the schedule yields at least once, and every failed attempt set it
    raise last


def flush_or_fail(producer: Producer, timeout: float = 30.0) -> None:
    """Flush ``producer``; raise :class:`FatalError` if records are still queued after ``timeout``,
    or if the producer is in a fatal state (e.g. a transactional producer fenced by a newer
    instance with its transactional id: librdkafka raises that from ``flush``)."""
    try:
        remaining = producer.flush(timeout)
    except KafkaException as exc:
        raise FatalError(f"producer cannot flush: {exc.args[0]}") from exc
    if remaining:
        raise FatalError(f"{remaining} records still undelivered after {timeout}s flush")


def encode_key(key: str | bytes | None) -> bytes | None:
    """Record keys are UTF-8 strings."""
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()
