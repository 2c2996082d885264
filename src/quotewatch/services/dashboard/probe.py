"""The dashboard's look upstream while it has no snapshot: why is it waiting?

The snapshot topic is written by inference, at the end of the pipeline, so a dashboard with no
snapshot can only say *why* by looking at the records of the stages before it. They are all on
topics already: :class:`UpstreamProbe` reads, on its own daemon thread and with its own consumer
(manual assignment, a throw-away group id, never a commit, ``read_committed``):

- the last :data:`LOOKBACK` records of every partition of ``md.events``, then what follows,
  decoded (feed state, snapshots, gaps, exchange time);
- the same tail of ``book.top3``, ``features`` and ``predictions``, by key only (records per symbol);
- the retained offsets of ``md.raw`` (has the ingest written anything?);

and folds them into an :class:`~quotewatch.services.dashboard.upstream.UpstreamTracker`. It starts
reading only once the snapshot consumer has caught up with an empty snapshot topic, and stops
(closing its consumer) as soon as the first snapshot arrives: a dashboard that has snapshots never
reads more than its own topic. A bounded look back keeps the start cheap on a topic holding days
of events; a feed state older than that is unknown (the reasons say so by what they lack).

The probe is an aid to reading the page, not part of the dashboard's job: a broker error is
retried, a record that does not decode is skipped (and counted), and if the thread dies the page
still shows snapshots, only without reasons. It plays no part in ``/health``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from quotewatch.core.clock import Clock
from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import SerdeError
from quotewatch.core.kafka import make_consumer, poll_batch, query_watermarks
from quotewatch.core.records import MarketEvent
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.services.dashboard.upstream import Stage, UpstreamTracker, UpstreamView

logger = logging.getLogger(__name__)

LOOKBACK = 10_000
"""Records read back from the end of each partition when the probe starts."""
BATCH_SIZE = 500
POLL_SECONDS = 0.1
IDLE_SECONDS = 0.2
"""Pause between checks while the probe is not needed yet (snapshot topic not read to its end)."""
RAW_CHECK_NS = 1_000_000_000
QUERY_SECONDS = 2.0


class UpstreamProbe:
    """Reads the pipeline's topics on a daemon thread while ``needed()`` holds (see the module docstring).

    Args:
        settings: broker and topic namespace (TOPIC_PREFIX), SYMBOLS, TICK_MS.
        serde: decodes ``md.events``.
        clock: paces the ``md.raw`` offset checks (monotonic time).
        needed: True while the dashboard waits for its first snapshot with its own topic read to
            the end; the probe starts reading when it turns true and stops for good once
            ``finished()`` does.
        finished: True once the dashboard has a snapshot: the probe closes its consumer and ends.
        lookback: records read back from the end of each partition at the start.
    """

    def __init__(
        self,
        settings: CommonSettings,
        serde: AvroSerde,
        clock: Clock,
        needed: Callable[[], bool],
        finished: Callable[[], bool],
        lookback: int = LOOKBACK,
    ) -> None:
        self._settings = settings
        self._serde = serde
        self._clock = clock
        self._needed = needed
        self._finished = finished
        self._lookback = lookback
        names = TopicNames(settings.topic_prefix)
        self._names = names
        self._stages: dict[str, Stage] = {
            names.book_top3: "top3",
            names.features: "features",
            names.predictions: "predictions",
        }
        self._tracker = UpstreamTracker()
        self._raw_records = 0
        self._rejected = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._view: UpstreamView | None = None  # guarded by _lock: published by the loop, read by callbacks
        self._last_raw_check_ns: int | None = None
        self._warned_missing = False
        self._thread = threading.Thread(target=self._run, name="upstream-probe", daemon=True)

    def start(self) -> UpstreamProbe:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end and wait for it to close its consumer."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def view(self) -> UpstreamView | None:
        """What the probe knows now; None until it has read the tails once."""
        with self._lock:
            return self._view

    # -- the loop (probe thread) ------------------------------------------------------------------

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            while not self._stop.is_set() and not self._finished():
                if consumer is None:
                    if not self._needed():
                        self._stop.wait(IDLE_SECONDS)
                        continue
                    consumer = make_consumer(
                        self._settings,
                        # Required by the client; never joined nor committed to.
                        group_id=f"quotewatch-dashboard-probe-{uuid.uuid4().hex[:12]}",
                        client_id=f"dashboard-probe-{self._settings.instance_id}",
                    )
                    if not self._assign(consumer):
                        consumer.close()
                        consumer = None
                        self._stop.wait(1.0)
                    continue
                self._read(consumer)
        except Exception:
            logger.exception("the upstream probe died; the page shows no waiting reasons from now on")
        finally:
            if consumer is not None:
                consumer.close()
        logger.info("upstream probe stopped", extra={"rejected": self._rejected})

    def _assign(self, consumer: Consumer) -> bool:
        """Assign the tail of every probed topic; False (retry later) while one is missing or unreachable."""
        topics = [self._names.md_events, *self._stages]
        try:
            metadata = consumer.list_topics(timeout=5)
            assignment = []
            for topic in topics:
                found = metadata.topics.get(topic)
                if found is None or found.error is not None or not found.partitions:
                    if not self._warned_missing:
                        logger.warning("probe: topic %s does not exist yet; retrying every second", topic)
                        self._warned_missing = True
                    return False
                for partition in sorted(found.partitions):
                    tp = TopicPartition(topic, partition)
                    low, high = query_watermarks(consumer, tp, QUERY_SECONDS, wait=self._stop.wait)
                    assignment.append(TopicPartition(topic, partition, max(low, high - self._lookback)))
        except KafkaException as exc:
            logger.warning("probe: cannot reach the broker; retrying", extra={"error": str(exc)})
            return False
        consumer.assign(assignment)
        logger.info("probe: reading the pipeline's topics", extra={"lookback": self._lookback})
        return True

    def _read(self, consumer: Consumer) -> None:
        messages = poll_batch(consumer, BATCH_SIZE, POLL_SECONDS)
        for message in messages:
            self._handle(message)
        now = self._clock.monotonic_ns()
        if self._last_raw_check_ns is None or now - self._last_raw_check_ns >= RAW_CHECK_NS:
            self._last_raw_check_ns = now
            self._check_raw(consumer)
        # Nothing more fetched: the tails are read. Publish from then on (a view published before
        # would say "no market event" of records still on their way).
        if messages and self._view is None:
            return
        with self._lock:
            self._view = UpstreamView(
                md_raw=self._names.md_raw,
                md_events=self._names.md_events,
                book_top3=self._names.book_top3,
                features=self._names.features,
                predictions=self._names.predictions,
                tick_ms=self._settings.tick_ms,
                raw_records=self._raw_records,
                symbols=self._tracker.copy(),
                configured=tuple(self._settings.symbols),
            )

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                logger.warning("probe: consumer error", extra={"error": str(error)})
            return
        topic = message.topic() or ""
        stage = self._stages.get(topic)
        if stage is not None:
            key = message.key()
            if key:
                self._tracker.on_output(stage, key.decode(errors="replace"))
            return
        try:
            event = self._serde.decode_as(message.value() or b"", topic, MarketEvent)
        except SerdeError as exc:
            self._rejected += 1
            logger.debug(
                "probe: record does not decode; skipped",
                extra={"topic": topic, "partition": message.partition(), "offset": message.offset(), "error": str(exc)},
            )
            return
        self._tracker.on_event(event)

    def _check_raw(self, consumer: Consumer) -> None:
        topic = self._names.md_raw
        try:
            metadata = consumer.list_topics(topic, timeout=QUERY_SECONDS)
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                return
            total = 0
            for partition in found.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=QUERY_SECONDS, cached=False
                )
                total += max(0, high - low)
        except KafkaException as exc:
            logger.debug("probe: md.raw offsets not available; retrying", extra={"error": str(exc)})
            return
        self._raw_records = total
