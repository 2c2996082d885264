"""A read_committed reader that consumes the pipeline's topics **while** the faults happen and
checks, record by record, what a downstream consumer would have seen.

:class:`ReadCommittedChecker` runs one ``isolation.level=read_committed`` consumer in a thread,
assigned to every partition of the checked topics from the beginning (no group: it commits
nothing and no rebalance pauses it). It keeps every record it is delivered, and it checks as they
arrive:

**Offset order**, per partition: each delivered offset is greater than the one before (a record
delivered twice, or a partition going backwards after a leader change, is a violation). Offsets
need not be consecutive: transaction markers and aborted records take offsets and are never
delivered.

**No duplicate and no gap per key.** What "gap" means depends on the topic; each rule is a fact
of the pure domain code (``quotewatch.domain``) that any uninterrupted run satisfies:

- ``md.raw`` (key: the feed): per connection (``connection_id``), the FRAME records'
  ``frame_index`` run 0, 1, 2, ... in offset order. The same index again is a duplicate; a jump
  (or a first index above 0) is a gap of the indexes skipped.
- ``book.top3`` (key: the symbol): ticks ``ts_event`` are multiples of ``TICK_MS`` and strictly
  increase in offset order (the same tick again is a duplicate, an older one out of order); within
  one sync ``epoch`` consecutive ticks are exactly ``TICK_MS`` apart (the book closes every grid
  tick while synced; quiet ticks are carried forward). A larger step inside an epoch is a gap of
  the ticks skipped. A new epoch (a new snapshot after a resync) may start at any later tick; an
  older epoch after a newer one is out of order. (The book skips ticks inside an epoch only after
  5 s without any event, ``MAX_CARRIED_MS``: the feed's heartbeats every 0.25 s rule that out here.)
- ``features`` (key: the symbol): the same rule as ``book.top3``, except that a synced tick whose
  book has an empty side yields a BookTop and no FeatureVector: a tick missing from the features
  is a gap unless ``book.top3`` holds it one-sided.
- ``labels`` (key: the symbol): ``t_event`` (the labelled tick) strictly increases; within one
  ``epoch`` consecutive labels are ``TICK_MS`` apart, unless the tick in between, or the tick
  ``DELTA_MS`` after it, is one-sided in ``book.top3`` (such a tick gets no label). Only labels
  flagged ``synced_over_horizon`` are checked (an unsynced one is an extra, counted by consumers).
- ``predictions`` (key: the symbol): served predictions (champion or fallback; the challenger's
  shadow ones are checked the same way on their own) strictly increase in ``ts_event``; a
  feature tick the checker saw that has no served prediction while a later one of its symbol
  exists is a gap (Prediction carries no epoch, so its rule is the features').
- ``md.events`` (key: the symbol): offset order only (its completeness is md.raw's frames plus
  the normaliser, a pure function; see :func:`tests.faults.support.verify_pipeline`).

The rules are :class:`StreamRules` (no Kafka in it: ``test_checker_rules.py`` feeds it records
with each kind of fault and checks it notices). Gaps that need another topic (features against
book.top3, predictions against features) are decided by :meth:`StreamRules.judge` in
:meth:`ReadCommittedChecker.finish`, over everything delivered during the run.
:meth:`finish` also compares what was delivered with what the topics hold at the end (a record
seen live and gone later, or never delivered, is a violation), so the live reader is checked
against the final state, and the final state against the pure functions by ``verify_pipeline``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config, make_admin, query_watermarks
from quotewatch.core.records import BookTop, FeatureVector, Label, Prediction, RawFrame, Record
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from tests.faults.support import Pipeline, read_all
from tests.helpers import wait_for

CHECKED_TOPICS = ("md.raw", "md.events", "book.top3", "features", "labels", "predictions")
_DETAILS = 50
"""Violations described one by one (the counts cover all of them)."""


@dataclass
class CheckerReport:
    """What the checker found: counts by kind, the first violations in detail, records delivered."""

    duplicates: int = 0
    gaps: int = 0
    """Missing records (ticks, frames, labels, predictions), not gap occurrences."""
    out_of_order: int = 0
    vanished: int = 0
    """Delivered during the run but not in the topic at the end (or with other bytes)."""
    undelivered: int = 0
    """In the topic at the end but never delivered to the live reader."""
    delivered: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.gaps or self.out_of_order or self.vanished or self.undelivered)

    def note(self, violation: str) -> None:
        if len(self.violations) < _DETAILS:
            self.violations.append(violation)

    def summary(self) -> str:
        return (
            f"{sum(self.delivered.values())} records read_committed during the run "
            f"({', '.join(f'{k} {v}' for k, v in self.delivered.items())}): {self.duplicates} duplicated, "
            f"{self.gaps} missing, {self.out_of_order} out of order, {self.vanished} vanished, "
            f"{self.undelivered} undelivered"
        )


@dataclass(frozen=True)
class Delivered:
    """One record as the reader was given it."""

    partition: int
    offset: int
    key: str | None
    raw: bytes
    value: Record | None


class _TickRule:
    """Per key: strictly increasing ticks on the grid, consecutive within an epoch.

    ``missing`` collects (key, tick) of the ticks a step inside an epoch skipped, for
    :meth:`StreamRules.judge` (some may be excused: one-sided books).
    """

    def __init__(self, tick_ns: int, time_field: str, record: type[BookTop | FeatureVector | Label]) -> None:
        self.tick_ns = tick_ns
        self.time_field = time_field
        self.record = record
        self.last: dict[str, tuple[int, int]] = {}
        self.missing: list[tuple[str, int]] = []

    def check(self, key: str, t: int, epoch: int, where: str, report: CheckerReport) -> None:
        if t % self.tick_ns:
            report.out_of_order += 1
            report.note(f"{where}: {self.time_field} {t} is off the {self.tick_ns} ns grid")
            return
        last = self.last.get(key)
        if last is not None:
            last_t, last_epoch = last
            if t == last_t:
                report.duplicates += 1
                report.note(f"{where}: {key} tick {t} again")
                return
            if t < last_t or epoch < last_epoch:
                report.out_of_order += 1
                report.note(f"{where}: {key} tick {t} (epoch {epoch}) after {last_t} (epoch {last_epoch})")
                return
            if epoch == last_epoch:
                self.missing.extend((key, missing) for missing in range(last_t + self.tick_ns, t, self.tick_ns))
        self.last[key] = (t, epoch)


class StreamRules:
    """The checks of the module docstring over records given in delivery order: :meth:`take`
    each one as it arrives, :meth:`judge` once at the end. Pure: no Kafka, no clock."""

    def __init__(self, prefix: str, tick_ms: int, delta_ms: int) -> None:
        self.names = TopicNames(prefix)
        self.delta_ns = delta_ms * 1_000_000
        self.report = CheckerReport()
        self.delivered: dict[str, list[Delivered]] = defaultdict(list)
        tick_ns = tick_ms * 1_000_000
        self._ticks = {
            self.names.book_top3: _TickRule(tick_ns, "ts_event", BookTop),
            self.names.features: _TickRule(tick_ns, "ts_event", FeatureVector),
            self.names.labels: _TickRule(tick_ns, "t_event", Label),
        }
        self._last_offset: dict[tuple[str, int], int] = {}
        self._frames: dict[str, int] = {}
        self._predictions: dict[tuple[str, str], int] = {}
        self._one_sided: set[tuple[str, int]] = set()

    def last_offset(self, topic: str, partition: int) -> int:
        """The last offset delivered of ``topic[partition]`` (-1: none)."""
        return self._last_offset.get((topic, partition), -1)

    def take(self, topic: str, record: Delivered) -> None:
        """Check one delivered record against what came before it."""
        partition, offset = record.partition, record.offset
        where = f"{topic}[{partition}]@{offset}"
        report = self.report
        last = self._last_offset.get((topic, partition))
        if last is not None and offset <= last:
            if offset == last:
                report.duplicates += 1
            else:
                report.out_of_order += 1
            report.note(f"{where}: delivered after offset {last}")
            return
        self._last_offset[(topic, partition)] = offset
        self.delivered[topic].append(record)
        value = record.value
        if value is None:
            report.out_of_order += 1
            report.note(f"{where}: does not decode")
            return
        expected = self._expected_record(topic)
        if expected is not None and not isinstance(value, expected):
            report.out_of_order += 1
            report.note(f"{where}: a {type(value).__name__}, not a {expected.__name__}")
            return
        if isinstance(value, RawFrame):
            if value.kind == "FRAME":
                self._frame(value, where)
        elif isinstance(value, BookTop | FeatureVector | Label):
            if isinstance(value, BookTop) and not (value.bids and value.asks):
                self._one_sided.add((value.symbol, value.ts_event))
            if isinstance(value, Label) and not value.synced_over_horizon:
                # Published only so consumers can count what the synced-only rule excludes (a resync
                # inside [t, t + Δ]): the continuity rule below is the one of the synced labels.
                return
            t = value.t_event if isinstance(value, Label) else value.ts_event
            self._ticks[topic].check(value.symbol, t, value.epoch, where, report)
        elif isinstance(value, Prediction):
            self._prediction(value, where)

    def _expected_record(self, topic: str) -> type[Record] | None:
        """The record class of a topic the rules check (None: a topic they only count)."""
        if topic == self.names.md_raw:
            return RawFrame
        if topic == self.names.predictions:
            return Prediction
        rule = self._ticks.get(topic)
        return rule.record if rule is not None else None

    def _frame(self, value: RawFrame, where: str) -> None:
        connection, index = value.connection_id, value.frame_index
        expected = self._frames.get(connection, -1) + 1
        if index < expected:
            self.report.duplicates += 1
            self.report.note(f"{where}: frame {index} of {connection} again (expected {expected})")
            return
        if index > expected:
            self.report.gaps += index - expected
            self.report.note(f"{where}: frames {expected}..{index - 1} of {connection} missing")
        self._frames[connection] = index

    def _prediction(self, value: Prediction, where: str) -> None:
        stream = (value.symbol, "challenger" if value.model_role == "CHALLENGER" else "served")
        previous = self._predictions.get(stream)
        t = value.ts_event
        if previous is not None and t <= previous:
            if t == previous:
                self.report.duplicates += 1
            else:
                self.report.out_of_order += 1
            self.report.note(f"{where}: {stream[1]} prediction of {stream[0]} for {t} after {previous}")
            return
        self._predictions[stream] = t

    def judge(self) -> CheckerReport:
        """The gaps that need another topic: features and labels against book.top3's one-sided ticks,
        served predictions against the feature ticks."""
        for violation in self._cross_topic_gaps():
            self.report.gaps += 1
            self.report.note(violation)
        return self.report

    def tally(self) -> tuple[int, int]:
        """(lost, duplicated) so far, without judging: the gaps found live plus the cross-topic ones
        as things stand now (a record or a tick missing), and the records delivered twice or out of
        order (an older record again is a replay). For counting per fault during a run; the verdict
        is :meth:`judge`'s."""
        report = self.report
        return report.gaps + len(self._cross_topic_gaps()), report.duplicates + report.out_of_order

    def _cross_topic_gaps(self) -> list[str]:
        names = self.names
        gaps: list[str] = []
        for topic, rule in self._ticks.items():
            for symbol, tick in rule.missing:
                one_sided = (symbol, tick) in self._one_sided
                if topic == names.labels:
                    one_sided = one_sided or (symbol, tick + self.delta_ns) in self._one_sided
                if topic != names.book_top3 and one_sided:
                    continue  # no feature vector / label for a tick with an empty side
                gaps.append(f"{topic}: {symbol} tick {tick} missing")
        served: dict[str, set[int]] = defaultdict(set)
        for record in self.delivered[names.predictions]:
            if isinstance(record.value, Prediction) and record.value.model_role != "CHALLENGER":
                served[record.value.symbol].add(record.value.ts_event)
        last_served = {symbol: max(ticks) for symbol, ticks in served.items()}
        for record in self.delivered[names.features]:
            if not isinstance(record.value, FeatureVector):
                continue
            symbol, tick = record.value.symbol, record.value.ts_event
            if tick <= last_served.get(symbol, -1) and tick not in served[symbol]:
                gaps.append(f"{names.predictions}: {symbol} tick {tick} has no served prediction")
        return gaps


class ReadCommittedChecker:
    """See the module docstring. ``start()``, run the faults, ``finish()`` once the pipeline stopped."""

    def __init__(self, settings: CommonSettings, tick_ms: int, delta_ms: int) -> None:
        self.settings = settings
        self.topics = [f"{settings.topic_prefix}.{suffix}" for suffix in CHECKED_TOPICS]
        self.rules = StreamRules(settings.topic_prefix, tick_ms, delta_ms)
        self._serde = AvroSerde()
        self._ends: dict[tuple[str, int], int] | None = None
        """Set by finish(): the end offsets the thread reads up to before it stops."""
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="read-committed-checker", daemon=True)
        self._consumer = Consumer(consumer_config(settings, f"checker-{uuid.uuid4().hex[:8]}", "faults-checker"))

    # -- live -----------------------------------------------------------------------------------------

    def start(self) -> ReadCommittedChecker:
        metadata = make_admin(self.settings).list_topics(timeout=30)
        self._consumer.assign(
            [
                TopicPartition(topic, partition, OFFSET_BEGINNING)
                for topic in self.topics
                for partition in sorted(metadata.topics[topic].partitions)
            ]
        )
        self._thread.start()
        return self

    def delivered(self, suffix: str) -> int:
        """Records of ``<prefix>.<suffix>`` delivered so far (a test waits on it)."""
        with self._lock:
            return len(self.rules.delivered[f"{self.settings.topic_prefix}.{suffix}"])

    def delivered_in(self, ranges: list[tuple[str, int, int, int]]) -> int:
        """How many delivered records lie in the (topic, partition, first, end) offset ranges."""
        with self._lock:
            return sum(
                1
                for topic, partition, first, end in ranges
                for record in self.rules.delivered[topic]
                if record.partition == partition and first <= record.offset < end
            )

    def tally(self) -> tuple[int, int]:
        """(lost, duplicated) found so far (:meth:`StreamRules.tally`)."""
        with self._lock:
            return self.rules.tally()

    def assert_running(self) -> bool:
        """True, or raise what ended the checker's thread."""
        if self._error is not None:
            raise AssertionError(f"the read_committed checker died: {self._error!r}") from self._error
        assert self._thread.is_alive(), "the read_committed checker is not running"
        return True

    def _run(self) -> None:
        # Only this thread touches the consumer (a call from another thread while consume() ran
        # blocked for minutes): finish() hands over the end offsets and waits for _done.
        try:
            while True:
                ends = self._ends
                if ends is not None and not self._behind(ends):
                    break
                for message in self._consumer.consume(500, 0.2):
                    error = message.error()
                    if error is not None:
                        if error.fatal():
                            raise RuntimeError(f"consumer error: {error}")
                        continue  # transient (a leader moved, partition EOF): librdkafka goes on by itself
                    self._take(message)
        except BaseException as exc:  # noqa: BLE001 - reported by assert_running / finish
            self._error = exc
        finally:
            self._consumer.close()
            self._done.set()

    def _take(self, message: Any) -> None:
        topic = message.topic() or ""
        raw = message.value() or b""
        key = message.key()
        try:
            value: Record | None = self._serde.decode(raw, topic)
        except Exception:  # noqa: BLE001 - kept undecoded (and reported: none is injected here)
            value = None
        record = Delivered(message.partition() or 0, message.offset() or 0, key.decode() if key else None, raw, value)
        with self._lock:
            self.rules.take(topic, record)

    def _behind(self, ends: dict[tuple[str, int], int]) -> list[str]:
        """Partitions whose end the checker has not reached (the last offsets may be transaction
        markers, which are never delivered). Called from the checker's thread only."""
        positions = {
            (tp.topic, tp.partition): tp.offset
            for tp in self._consumer.position([TopicPartition(topic, partition) for topic, partition in ends])
        }
        return [
            f"{topic}[{partition}]"
            for (topic, partition), end in ends.items()
            if end > 0
            and positions.get((topic, partition), -1) < end - 1
            and self.rules.last_offset(topic, partition) < end - 1
        ]

    # -- the end ----------------------------------------------------------------------------------

    def finish(self, timeout: float = 240.0) -> CheckerReport:
        """Once the pipeline has stopped: read up to the end of every partition, stop, judge the
        cross-topic gaps, and compare everything delivered with what the topics hold now."""
        self._ends = self._end_offsets()
        if not self._done.wait(timeout):
            raise AssertionError(f"the checker did not reach the end of the topics in {timeout:.0f} s")
        self._thread.join(30)
        if self._error is not None:
            raise AssertionError(f"the read_committed checker died: {self._error!r}") from self._error
        report = self.rules.judge()
        for topic in self.topics:
            final = {(r.partition, r.offset): r.raw for r in read_all(self.settings, topic)}
            seen = {(r.partition, r.offset): r.raw for r in self.rules.delivered[topic]}
            vanished = sorted(key for key, raw in seen.items() if final.get(key) != raw)
            undelivered = sorted(key for key in final if key not in seen)
            report.vanished += len(vanished)
            report.undelivered += len(undelivered)
            for what, keys in (("vanished or changed", vanished), ("never delivered", undelivered)):
                if keys:
                    report.note(f"{topic}: {len(keys)} records {what}, first {keys[:3]}")
        report.delivered = {
            topic.removeprefix(self.settings.topic_prefix + "."): len(self.rules.delivered[topic])
            for topic in self.topics
        }
        return report

    def _end_offsets(self) -> dict[tuple[str, int], int]:
        consumer = Consumer(consumer_config(self.settings, f"checker-end-{uuid.uuid4().hex[:8]}", "faults-checker"))
        try:
            metadata = make_admin(self.settings).list_topics(timeout=30)
            return {
                (topic, partition): query_watermarks(consumer, TopicPartition(topic, partition), timeout=30)[1]
                for topic in self.topics
                for partition in metadata.topics[topic].partitions
            }
        finally:
            consumer.close()


def wait_recovered(
    pipeline: Pipeline, checker: ReadCommittedChecker, seen: dict[str, int], timeout: float, grace: float
) -> None:
    """After a fault: every service of ``pipeline`` processed 50 more records (acting as the
    supervisor meanwhile, see :meth:`Pipeline.liveness_probe` and ``grace``) and the checker was
    given more records of every topic than ``seen`` (suffix -> delivered before the fault)."""
    for name in pipeline.config.services:
        pipeline.wait_progress(name, 50, timeout=timeout, liveness_grace=grace)
    wait_for(
        lambda: (
            checker.assert_running()
            and all(checker.delivered(suffix) > n for suffix, n in seen.items())
            and not pipeline.liveness_probe(grace)
        ),
        timeout=timeout,
        interval=0.2,
        message="the read_committed checker to be given new records on every topic",
    )


def offsets_in(
    settings: CommonSettings, topic: str, partition: int, first: int, end: int, isolation: str, timeout: float = 60.0
) -> list[int]:
    """The offsets in ``[first, end)`` of ``topic[partition]`` that a reader with ``isolation``
    (``read_committed`` or ``read_uncommitted``) is given, read until its position or a record
    reaches ``end``. Call it once no transaction is open in that range any more (a read_committed
    reader stops at the first open one) and records follow it."""
    consumer = Consumer(
        consumer_config(settings, f"range-{uuid.uuid4().hex[:8]}", "faults-checker", **{"isolation.level": isolation})
    )
    offsets: list[int] = []
    beyond = False
    try:
        consumer.assign([TopicPartition(topic, partition, first)])
        deadline = time.monotonic() + timeout
        while not beyond and consumer.position([TopicPartition(topic, partition)])[0].offset < end:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic}[{partition}] {first}..{end} ({isolation})")
            for message in consumer.consume(500, 0.5):
                offset = message.offset() or 0
                if message.error() is None and first <= offset < end:
                    offsets.append(offset)
                beyond = beyond or (message.error() is None and offset >= end)
    finally:
        consumer.close()
    return offsets
