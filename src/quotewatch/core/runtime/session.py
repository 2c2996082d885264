"""The consumer session every stream loop runs in: assignment, lag, backoff and liveness.

A :class:`ConsumerSession` owns the group consumer of one service: it subscribes, keeps the set of
assigned partitions and the consumer's positions, hands assignments and revocations to the loop
that runs in it (:class:`~quotewatch.core.runtime.processor.StreamProcessor`, the
:class:`~quotewatch.core.runtime.sink.SinkRunner`), reads the group's committed offsets (waiting
for them when a transaction holds them), sets the lag gauges, paces retries and says whether a
loop turn is a sign of life (:class:`UnassignedWatch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypedDict, Unpack

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from quotewatch.core.clock import Clock
from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import FatalError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, TransientBackoff, make_consumer
from quotewatch.core.metrics import CONSUMER_LAG
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames

logger = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]

COMMITTED_TIMEOUT_SECONDS = 30.0
"""How long one fetch of the group's committed offsets may take before it is asked again."""
_COMMITTED_RETRIABLE = frozenset(
    {
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.UNSTABLE_OFFSET_COMMIT,
    }
)
UNASSIGNED_WARN_SECONDS = 10.0
"""How long a loop may hold no partition while its input has data before it says so."""
INPUT_PROBE_SECONDS = 5.0
"""How often an unassigned session asks the broker whether its input has data waiting."""
INPUT_PROBE_TIMEOUT_SECONDS = 2.0


class Rebalance(Protocol):
    """What the loop running in a session does on a rebalance. Who calls it: :class:`ConsumerSession`,
    from the consumer's rebalance callbacks (inside ``poll``/``consume``, on the loop's thread)."""

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """``partitions`` (with the group's committed offsets and metadata) are now ours: set each
        one's ``offset`` to where reading starts. The session assigns them afterwards."""
        ...

    def revoked(self, partitions: list[TopicPartitionKey], lost: bool) -> None:
        """``partitions`` are taken away; ``lost``: they already belong to someone else (session
        timeout), so nothing may be written or committed for them any more."""
        ...


class UnassignedWatch:
    """Decides whether a loop turn is a sign of life, for the stuck watchdog.

    A turn with partitions assigned is. A turn without partitions is not while the input has data
    waiting: once, after a broker restart, a consumer lost its partitions (session timeout) and never
    rejoined its group, its loop kept turning with nothing assigned and its output fell behind
    silently. Such a loop is warned about after :data:`UNASSIGNED_WARN_SECONDS` and, as it no longer
    beats, ended by the :class:`~quotewatch.core.health.StuckWatchdog` after STUCK_EXIT_SECONDS (a
    new consumer joins afresh). A turn without partitions while nothing waits (a spare replica, an
    idle input) is a sign of life.

    Args:
        has_waiting_input: True when the input has records the group has not committed yet, False
            when not, None when the broker did not answer (the last answer stands; at first: True).
    """

    def __init__(
        self,
        liveness: Liveness,
        clock: Clock,
        has_waiting_input: Callable[[], bool | None],
        warn_seconds: float = UNASSIGNED_WARN_SECONDS,
        probe_seconds: float = INPUT_PROBE_SECONDS,
    ) -> None:
        self._liveness = liveness
        self._clock = clock
        self._has_waiting_input = has_waiting_input
        self._warn_seconds = warn_seconds
        self._probe_ns = int(probe_seconds * 1e9)
        self._last_probe_ns: int | None = None
        self._waiting = True
        self.warned = False

    def turned(self, assigned: bool) -> None:
        """One turn of the loop, with (``assigned``) or without partitions."""
        if assigned:
            self._liveness.beat()
            self.warned = False
            self._last_probe_ns = None  # probe again as soon as the partitions are gone
            return
        now = self._clock.monotonic_ns()
        if self._last_probe_ns is None or now - self._last_probe_ns >= self._probe_ns:
            self._last_probe_ns = now
            answer = self._has_waiting_input()
            if answer is not None:
                self._waiting = answer
        if not self._waiting:
            self._liveness.beat()
            self.warned = False
            return
        stuck = self._liveness.stuck_seconds()
        if not self.warned and stuck >= self._warn_seconds:
            self.warned = True
            logger.warning(
                "no partition assigned for %.0f s while the input has data (normal while the group rebalances, "
                "e.g. after a broker restart); the stuck watchdog restarts the service if none is assigned "
                "within STUCK_EXIT_SECONDS",
                stuck,
            )


def has_waiting_input(
    consumer: Consumer, topics: Sequence[str], timeout: float = INPUT_PROBE_TIMEOUT_SECONDS
) -> bool | None:
    """Do ``topics`` hold records past the group's committed offsets? None if the broker did not answer.

    A transactional topic ends with a commit marker that is never delivered: a group committed one
    offset before the high watermark has read everything.
    """
    try:
        metadata = consumer.list_topics(timeout=timeout)
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            if topic in metadata.topics
            for partition in metadata.topics[topic].partitions
        ]
        if not partitions:
            return False
        for tp in consumer.committed(partitions, timeout=timeout):
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout, cached=False)
            start = tp.offset if tp.offset >= 0 else low
            if high - max(start, low) > 1:
                return True
        return False
    except KafkaException:
        return None


class ConsumerSession:
    """The group consumer of one service and everything kept about its partitions.

    Args:
        rebalance: the loop's rebalance hooks (set with :meth:`open`).
        input_probe: whether the input has data waiting (default: :func:`has_waiting_input`);
            injected by tests.
    """

    def __init__(
        self,
        *,
        settings: CommonSettings,
        service: str,
        input_topics: Sequence[str],
        group_id: str,
        clock: Clock,
        shutdown: ShutdownSignal,
        liveness: Liveness,
        consumer_overrides: Mapping[str, Any] | None = None,  # not a topic record: librdkafka config
        input_probe: Callable[[], bool | None] | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.inputs = list(input_topics)
        self.group_id = group_id
        self.clock = clock
        self.shutdown = shutdown
        self.liveness = liveness
        self._consumer_overrides = dict(consumer_overrides or {})
        self._consumer: Consumer | None = None
        self._rebalance: Rebalance | None = None
        self.assigned: set[TopicPartitionKey] = set()
        self.positions: dict[TopicPartitionKey, int] = {}
        """Next offset to read of each assigned partition (after the records handled so far)."""
        self.backoff = TransientBackoff()
        self._last_lag_check_ns = 0
        self.watch = UnassignedWatch(liveness, clock, input_probe or self._probe_input)

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("the session is not open")
        return self._consumer

    def open(self, rebalance: Rebalance) -> Consumer:
        """Create the consumer and subscribe to the inputs; ``rebalance`` hears of every (re)assignment."""
        client_id = f"{self.service}-{self.settings.instance_id}"
        self._rebalance = rebalance
        self._consumer = make_consumer(self.settings, self.group_id, client_id, **self._consumer_overrides)
        self._consumer.subscribe(
            self.inputs, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            # close() leaves the group so the partitions are reassigned promptly.
            self._consumer.close()

    # -- rebalance --------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._rebalance is not None
        committed = self.committed(partitions)
        if committed is None:
            return  # shutting down: the loop ends before it polls again
        self._rebalance.assigned(committed)
        self.assigned.update((tp.topic, tp.partition) for tp in committed)
        consumer.assign(committed)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, partitions, lost=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, partitions, lost=True)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition], lost: bool) -> None:
        assert self._rebalance is not None
        keys = [(tp.topic, tp.partition) for tp in partitions]
        try:
            self._rebalance.revoked(keys, lost)
        finally:
            for key in keys:
                self.assigned.discard(key)
                self.positions.pop(key, None)
            consumer.unassign()

    def committed(self, partitions: list[TopicPartition]) -> list[TopicPartition] | None:
        """The group's committed offsets (with their metadata) of ``partitions``, asked again until
        they come; None when shutdown was requested meanwhile.

        Waiting is the normal case after a replica died: read_committed, the offset fetch (KIP-447,
        require_stable) holds the answer while a transaction that committed offsets for these
        partitions is open, and the open transaction of a replica killed mid-batch stays open until
        the coordinator aborts it, ``transaction.timeout.ms`` later. The coordinator may also be
        loading (a broker just started). Raising out of the rebalance callback instead would end the
        service that is taking the dead replica's partitions over.

        Raises:
            FatalError: any other error (e.g. not authorised for the group).
        """
        consumer = self.consumer
        while True:
            try:
                return list(consumer.committed(partitions, timeout=COMMITTED_TIMEOUT_SECONDS))
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or error.code() not in _COMMITTED_RETRIABLE:
                    raise FatalError(
                        f"cannot read the committed offsets of the group {self.group_id}: {error}"
                    ) from exc
                logger.warning(
                    "waiting for the committed offsets (an open transaction of a member that left, or the "
                    "coordinator is not ready): %s",
                    error,
                    extra={"partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]},
                )
            self.liveness.beat()  # waiting for the coordinator is not a stuck loop
            if self.shutdown.requested:
                return None

    # -- per turn ---------------------------------------------------------------------------

    def turned(self) -> None:
        """One turn of the loop: a sign of life unless it holds no partition while input waits."""
        self.watch.turned(bool(self.assigned))

    def _probe_input(self) -> bool | None:
        return has_waiting_input(self.consumer, self.inputs)

    def consumer_error(self, message: Message) -> bool:
        """True if ``message`` carries a consumer error (logged, skipped) instead of a record.

        Raises:
            FatalError: librdkafka reports the error as fatal.
        """
        error = message.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        if error.fatal():
            raise FatalError(f"consumer error: {error}")
        logger.warning("consumer error", extra={"error": str(error)})
        return True

    def pause_before_retry(self, error: BaseException, **extra: object) -> None:
        """A transient failure, not the record's fault: wait (doubling, with jitter) before retrying."""
        pause = self.backoff.next_pause()
        logger.warning("transient failure; retrying after a pause: %s", error, extra={**extra, "pause_s": pause})
        self.backoff.wait(self.shutdown)
        self.liveness.beat()  # waiting out a dependency is not a stuck loop

    def update_lag(self) -> None:
        """Set the lag gauges (at most once a second): records between position and high watermark."""
        now = self.clock.monotonic_ns()
        if now - self._last_lag_check_ns < 1_000_000_000 or self._consumer is None:
            return
        self._last_lag_check_ns = now
        total = 0
        for topic, partition in list(self.assigned):
            try:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            position = self.positions.get((topic, partition))
            if high < 0 or position is None:
                continue
            # With transactional input the last offset is a commit marker, never delivered to us:
            # a gap of one record past our position is "caught up", not lag.
            lag = max(0, high - position - 1)
            CONSUMER_LAG.labels(self.service, topic, str(partition)).set(lag)
            total += lag
        self.liveness.set_lag(total)


class LoopOptions(TypedDict, total=False):
    """The optional settings of a runtime loop (:class:`ConsumerLoop`), given as keyword arguments."""

    group_id: str | None
    """Consumer group (default ``<prefix>.<service>``)."""
    batch_size: int
    """Records per poll at most."""
    poll_timeout: float
    consumer_overrides: Mapping[str, Any] | None  # not a topic record: librdkafka config
    input_probe: Callable[[], bool | None] | None
    """Whether the input has data waiting, for the watchdog (default: ask the broker); for tests."""


class LoopArgs(LoopOptions):
    """Everything a runtime loop (:class:`ConsumerLoop`) is given, as keyword arguments."""

    settings: CommonSettings
    service: str
    input_topics: Sequence[str]
    serde: AvroSerde
    clock: Clock
    shutdown: ShutdownSignal
    liveness: Liveness


class ConsumerLoop:
    """What the runtime's loops (the stream processor, the sink runner) share: their inputs and
    their :class:`ConsumerSession` (``self.session``)."""

    BATCH_SIZE = 500
    """Records per poll at most, unless ``batch_size`` is given."""
    POLL_TIMEOUT = 0.05
    """Seconds a poll waits for records, unless ``poll_timeout`` is given."""

    def __init__(self, **args: Unpack[LoopArgs]) -> None:
        settings, service = args["settings"], args["service"]
        self._settings = settings
        self._service = service
        self._serde = args["serde"]
        self._clock = args["clock"]
        self._shutdown = args["shutdown"]
        self._liveness = args["liveness"]
        self._batch_size = args.get("batch_size", self.BATCH_SIZE)
        self._poll_timeout = args.get("poll_timeout", self.POLL_TIMEOUT)
        self._dlq_topic = TopicNames(settings.topic_prefix).dlq
        self.session = ConsumerSession(
            settings=settings,
            service=service,
            input_topics=args["input_topics"],
            group_id=args.get("group_id") or f"{settings.topic_prefix}.{service}",
            clock=self._clock,
            shutdown=self._shutdown,
            liveness=self._liveness,
            consumer_overrides=args.get("consumer_overrides"),
            input_probe=args.get("input_probe"),
        )
