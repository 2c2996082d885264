"""Kafka-grade faults: a 3-broker KRaft cluster whose partition leaders die by ``kill -9``, and a
zombie book instance that must be fenced. A read_committed checker consumes during both.

**The cluster** (``make faults`` only: three JVMs take a minute to form on 2 cores):
:class:`~quotewatch.local.cluster.LocalKafkaCluster`, three combined broker+controller nodes on free
ports in the test's temporary directory (256 MiB heap each), started once for this module. The
catalog's topics get 3 replicas and ``min.insync.replicas=2`` there (asserted), as do the group
offsets and the transaction log.

**Leader kill** (:func:`test_kill_9_of_the_partition_leader_mid_stream_loses_and_duplicates_nothing`):
the whole pipeline runs on the cluster as real processes (ingest from the local feed server,
book, labeler, inference, lake-sink: :class:`~tests.faults.support.Pipeline`). Each trial picks a
partition carrying the stream (in turn ``md.raw``, the busiest ``md.events`` partition and the
busiest ``book.top3`` one) and ``kill -9``s the broker that leads it: no controlled shutdown, no
leadership handed over, and, the nodes being combined, possibly the active controller with it.
The trial has recovered when the partition has a new leader, every service has processed again
and the read_committed checker has been given new records on every topic of the pipeline; the
seconds in the table run from the kill to that moment (the broker session timeout, 9 s, is most of
it). The killed node is then started again and the next trial waits until every partition is
fully replicated. As in the outage test, the test acts as the services' supervisor (restarts a
service that exits, nothing more); restarts are in the notes.

**Zombie** (:func:`test_a_frozen_book_is_fenced_by_its_replacement_and_its_transaction_never_shows`):
the book is frozen with SIGSTOP **in the middle of a transaction** (retried until a freeze lands
while its output partitions hold records of an open transaction: read_committed end offset below
the read_uncommitted one, still so after ``SETTLE_SECONDS``). A replacement with the same ``INSTANCE_ID``
(so the same ``transactional.id``) starts: its ``init_transactions`` bumps the producer epoch and
aborts the zombie's open transaction; it takes the partitions once the zombie's group session
expires. Then the zombie is resumed with SIGCONT: its next transactional call is refused
(producer fenced) and it must exit non-zero, having made nothing visible: the records of its open
transaction are in the log (a read_uncommitted reader gets them) and no read_committed reader
ever gets them (neither the checker, live, nor a reader afterwards). A freeze can still land
after the zombie's commit request reached the coordinator and before the markers were written
(seen once under a load average of 25); the takeover then completes that commit, which is
legitimate: such a round is checked to be whole (all of its records visible, or none) and does not
count, and rounds go on until the required number caught an open transaction. Under ``make faults`` this
runs on the cluster with the whole pipeline, 3 rounds; in ``make test`` on the session broker
with ingest and book, 1 round (about a minute).

Both end like every pipeline fault: the input stops, every stage catches up, each service exits
0 on SIGTERM, and :func:`~tests.faults.support.verify_pipeline` compares every derived topic with
the pure functions of its input (what an uninterrupted run produces) and every lake dataset with
its topic. The checker's own rules (duplicates, gaps per key, offset order) are in
:mod:`tests.faults.checker`. Lost and duplicated in the table add up both.
"""

from __future__ import annotations

import math
import re
import signal
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from confluent_kafka import IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, OffsetSpec

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import make_admin
from quotewatch.core.topics import CATALOG, TopicNames
from quotewatch.local.cluster import ClusterState, LocalKafkaCluster
from quotewatch.local.kafka import free_port
from tests.faults.checker import CheckerReport, ReadCommittedChecker, offsets_in
from tests.faults.conftest import FaultReport
from tests.faults.support import (
    DELTA_MS,
    FULL,
    STREAM_SERVICES,
    TICK_MS,
    Pipeline,
    PipelineConfig,
    ServiceProcess,
    Verdict,
    trials,
    verify_pipeline,
)
from tests.helpers import wait_for

BROKERS = 3
NODE_HEAP = "256m"
STALL_SECONDS = 10.0
"""HEALTH_STALL_SECONDS of the services in the leader-kill run."""
STUCK_EXIT_SECONDS = 30.0
"""STUCK_EXIT_SECONDS of the services in the leader-kill run (see test_broker_outage.py)."""
RESTART_EXITED_ONLY = math.inf
"""As ``liveness_grace``: restart services that exit, never one that is only unhealthy."""
KILL_TARGETS = ("md.raw", "md.events", "book.top3")
"""The topics whose partition leader each trial kills, in turn."""
PIPELINE_TOPICS = ("md.raw", "md.events", "book.top3", "features", "labels", "predictions")
FREEZE_ATTEMPTS = 300
"""SIGSTOPs of the book tried before one lands inside a transaction (1 to 80 in the runs so far: the
book spends most of its time polling between transactions)."""
KILLS = 3
"""Leader kills per run (one per target topic)."""
SETTLE_SECONDS = 3.0
"""How long a frozen book's transaction must stay open before it counts as open (see _open_transaction)."""
EXTRA_ROUNDS = 3
"""Zombie rounds allowed beyond the required ones, for freezes that land in a commit already under way."""

cluster_only = pytest.mark.skipif(
    not FULL, reason="the 3-broker cluster runs under make faults (QUOTEWATCH_FAULTS=full) only"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalKafkaCluster, ClusterState]]:
    """Three combined KRaft nodes on free ports, for this module; stopped at the end."""
    local = LocalKafkaCluster(tmp_path_factory.mktemp("cluster"), BROKERS)
    try:
        state = local.start([free_port() for _ in range(BROKERS)], timeout=600, heap=NODE_HEAP, die_with_parent=True)
        yield local, state
    finally:
        local.stop()


# -- cluster facts ----------------------------------------------------------------------------------


def _leader(admin: AdminClient, topic: str, partition: int) -> int:
    return int(admin.list_topics(topic, timeout=10).topics[topic].partitions[partition].leader)


def _busiest_partition(settings: CommonSettings, topic: str) -> int:
    admin = make_admin(settings)
    partitions = sorted(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    ends = _end_offsets(admin, [TopicPartition(topic, p) for p in partitions], IsolationLevel.READ_UNCOMMITTED)
    return max(partitions, key=lambda p: ends[(topic, p)])


def _end_offsets(
    admin: AdminClient, partitions: list[TopicPartition], isolation: IsolationLevel
) -> dict[tuple[str, int], int]:
    """Per partition, the end offset a reader with ``isolation`` sees: read_committed the last stable
    offset (the first offset of the oldest open transaction), read_uncommitted the high watermark."""
    futures = admin.list_offsets(
        {tp: OffsetSpec.latest() for tp in partitions}, isolation_level=isolation, request_timeout=30
    )
    return {(tp.topic, tp.partition): int(future.result().offset) for tp, future in futures.items()}


def _new_leader(admin: AdminClient, topic: str, partition: int, old: int) -> int | None:
    """The partition's leader once it is another broker than ``old`` (None until then)."""
    leader = _leader(admin, topic, partition)
    return leader if leader not in (-1, old) else None


def _delivered_beyond(checker: ReadCommittedChecker, counts: dict[str, int]) -> bool:
    """Has the checker been given more records of each topic suffix than ``counts`` says?"""
    return checker.assert_running() and all(checker.delivered(suffix) > n for suffix, n in counts.items())


def _resolved(
    admin: AdminClient, partitions: list[TopicPartition], open_ranges: dict[tuple[str, int], tuple[int, int]]
) -> bool:
    """Has every open transaction of ``open_ranges`` ended (read_committed end past its records)?"""
    ends = _end_offsets(admin, partitions, IsolationLevel.READ_COMMITTED)
    return all(ends[key] >= written for key, (_, written) in open_ranges.items())


def _committed_past(
    admin: AdminClient, partitions: list[TopicPartition], ends: dict[tuple[str, int], tuple[int, int]]
) -> bool:
    """Has a transaction been committed on one of ``partitions`` since ``ends`` was taken?"""
    committed = _end_offsets(admin, partitions, IsolationLevel.READ_COMMITTED)
    return any(committed[key] > first for key, (first, _) in ends.items())


def _under_replicated(admin: AdminClient, prefix: str) -> list[str]:
    """Partitions of the namespace and of the group-offset and transaction logs missing an in-sync replica."""
    topics = admin.list_topics(timeout=10).topics
    return [
        f"{name}[{p}]"
        for name, topic in topics.items()
        if name.startswith(prefix + ".") or name in ("__consumer_offsets", "__transaction_state")
        for p, partition in topic.partitions.items()
        if partition.leader < 0 or len(partition.isrs) < len(partition.replicas)
    ]


def _assert_replicated_three_ways(admin: AdminClient, prefix: str) -> None:
    topics = admin.list_topics(timeout=10).topics
    names = [spec.name(prefix) for spec in CATALOG.values()]
    factors = {name: {len(p.replicas) for p in topics[name].partitions.values()} for name in names}
    assert all(f == {BROKERS} for f in factors.values()), f"replication factors: {factors}"
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
    for resource, future in admin.describe_configs(resources, request_timeout=30).items():
        assert future.result()["min.insync.replicas"].value == "2", resource.name


# -- leader kill ------------------------------------------------------------------------------------


@cluster_only
@pytest.mark.timeout(3600)
def test_kill_9_of_the_partition_leader_mid_stream_loses_and_duplicates_nothing(
    cluster: tuple[LocalKafkaCluster, ClusterState], tmp_path: Path, fault_report: FaultReport
) -> None:
    local, state = cluster
    bootstrap = state.bootstrap_servers
    prefix = f"leader{uuid.uuid4().hex[:8]}"
    settings = CommonSettings(kafka_bootstrap_servers=bootstrap, topic_prefix=prefix)
    admin = make_admin(settings)
    (tmp_path / "run").mkdir()
    pipeline = Pipeline(
        PipelineConfig(
            bootstrap,
            prefix,
            tmp_path / "run",
            common_env={"HEALTH_STALL_SECONDS": str(STALL_SECONDS), "STUCK_EXIT_SECONDS": str(STUCK_EXIT_SECONDS)},
        )
    )
    checker: ReadCommittedChecker | None = None
    seconds: list[float] = []
    kill_notes: list[str] = []
    try:
        pipeline.start()
        _assert_replicated_three_ways(admin, prefix)
        checker = ReadCommittedChecker(settings, TICK_MS, DELTA_MS).start()
        for trial in range(KILLS):
            for name in STREAM_SERVICES:
                pipeline.wait_progress(name, 50, timeout=300, liveness_grace=RESTART_EXITED_ONLY)
            topic = f"{prefix}.{KILL_TARGETS[trial % len(KILL_TARGETS)]}"
            partition = _busiest_partition(settings, topic)
            victim = _leader(admin, topic, partition)
            led = sum(
                1
                for name, meta in admin.list_topics(timeout=10).topics.items()
                if name.startswith(prefix + ".")
                for p in meta.partitions.values()
                if p.leader == victim
            )
            seen = {suffix: checker.delivered(suffix) for suffix in PIPELINE_TOPICS}
            killed_at = time.monotonic()
            assert local.kill(victim), f"broker {victim} was running"
            new_leader = wait_for(
                partial(_new_leader, admin, topic, partition, victim),
                timeout=120,
                interval=0.2,
                message=f"a new leader for {topic}[{partition}]",
            )
            failover = time.monotonic() - killed_at
            for name in STREAM_SERVICES:
                pipeline.wait_progress(name, 50, timeout=300, liveness_grace=RESTART_EXITED_ONLY)
            wait_for(
                partial(_delivered_beyond, checker, seen),
                timeout=300,
                interval=0.2,
                message="read_committed records on every topic after the kill",
            )
            seconds.append(time.monotonic() - killed_at)
            kill_notes.append(
                f"broker {victim} (leader of {topic.removeprefix(prefix + '.')}[{partition}] and {led} partitions "
                f"of the namespace; new leader {new_leader} after {failover:.1f} s)"
            )
            local.start_node(victim, timeout=300, heap=NODE_HEAP, die_with_parent=True)
            wait_for(
                lambda: not _under_replicated(admin, prefix),
                timeout=300,
                interval=0.5,
                message=f"every partition fully replicated again after broker {victim} restarted",
            )
        pipeline.finish()
        report = checker.finish()
        verdict = verify_pipeline(settings, pipeline.lake_dir)
        restarts = sorted(f"{name} {count}x ({why})" for (name, why), count in pipeline.restarts.items())
        aborted = sum(
            pipeline[name].log_path.read_text(errors="replace").count("transaction aborted")
            for name in ("book", "labeler", "inference")
        )
    finally:
        pipeline.close()
    _report(
        fault_report,
        "kill -9 of the partition leader (3-broker KRaft, RF 3, min ISR 2)",
        trials=len(seconds),
        seconds=seconds,
        verdict=verdict,
        report=report,
        notes=(
            f"killed: {'; '.join(kill_notes)}; restarts by the supervisor: {'; '.join(restarts) or 'none'}; "
            f"{aborted} transactions aborted and redone"
        ),
    )
    assert report.ok, report.violations[:20]
    assert verdict.ok, verdict.problems
    assert all(verdict.counts.get(f"lake {suffix}", 0) > 0 for suffix in ("md.raw", "md.events", "labels"))


# -- zombie -----------------------------------------------------------------------------------------


@pytest.fixture
def zombie_bootstrap(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(bootstrap servers, description): the cluster under make faults, else the session broker."""
    if FULL:
        _, state = request.getfixturevalue("cluster")
        return state.bootstrap_servers, f"{BROKERS}-broker KRaft cluster"
    info = request.getfixturevalue("broker")
    return info.bootstrap_servers, info.kind


def _settled_ends(
    admin: AdminClient, partitions: list[TopicPartition], hold: float = 0.0
) -> dict[tuple[str, int], tuple[int, int]]:
    """With the producer frozen: per partition (read_committed end, read_uncommitted end), once the
    answers have stayed the same for ``hold`` seconds (and at least two answers in a row), so a
    commit or abort already on its way has landed. A partition whose first is below its second
    holds records of an open transaction."""
    previous: dict[tuple[str, int], tuple[int, int]] | None = None
    since = time.monotonic()
    deadline = since + 60 + hold
    while time.monotonic() < deadline:
        committed = _end_offsets(admin, partitions, IsolationLevel.READ_COMMITTED)
        written = _end_offsets(admin, partitions, IsolationLevel.READ_UNCOMMITTED)
        now = {key: (committed[key], written[key]) for key in written}
        if now != previous:
            previous, since = now, time.monotonic()
        elif time.monotonic() - since >= hold:
            return now
    raise AssertionError("the output partitions' end offsets did not settle with the book frozen")


def _open_transaction(
    admin: AdminClient, partitions: list[TopicPartition]
) -> tuple[dict[tuple[str, int], tuple[int, int]], dict[tuple[str, int], tuple[int, int]], bool]:
    """With the book frozen: (every partition's settled ends, the (first, end) offsets its open
    transaction holds per output partition, empty if none, whether a transaction that looked open
    ended while frozen). A transaction whose commit reached the coordinator before the freeze looks
    open until the coordinator has written its markers (longer under load): it counts as open only
    if it still looks open after ``SETTLE_SECONDS``."""
    ends = _settled_ends(admin, partitions)
    if not any(first < end for first, end in ends.values()):
        return ends, {}, False
    confirmed = _settled_ends(admin, partitions, hold=SETTLE_SECONDS)
    if confirmed != ends:
        return confirmed, {}, True
    return ends, {key: (first, end) for key, (first, end) in ends.items() if first < end}, False


def _refused_call(log: str) -> str:
    """The zombie's transactional call that was refused as fenced, from librdkafka's log line."""
    match = re.search(r"Fatal transaction error: Failed to ([a-z ]+?)(?: on broker |: )", log)
    return match.group(1) if match else "?"


@pytest.mark.timeout(1800)
def test_a_frozen_book_is_fenced_by_its_replacement_and_its_transaction_never_shows(
    zombie_bootstrap: tuple[str, str], tmp_path: Path, fault_report: FaultReport
) -> None:
    bootstrap, broker_kind = zombie_bootstrap
    rounds = trials(subset=1, full=3)
    services = STREAM_SERVICES if FULL else ("ingest", "book")
    prefix = f"zombie{uuid.uuid4().hex[:8]}"
    settings = CommonSettings(kafka_bootstrap_servers=bootstrap, topic_prefix=prefix)
    names = TopicNames(prefix)
    admin = make_admin(settings)
    (tmp_path / "run").mkdir()
    pipeline = Pipeline(
        PipelineConfig(
            bootstrap,
            prefix,
            tmp_path / "run",
            services=services,
            # One instance id for the book and its replacements: one transactional.id. The stuck
            # watchdog is kept out of the way: the zombie must end because it is fenced.
            common_env={"INSTANCE_ID": "zombie-test", "STUCK_EXIT_SECONDS": "900"},
        )
    )
    zombies: list[ServiceProcess] = []
    aborted: list[tuple[list[tuple[str, int, int, int]], int]] = []
    """Rounds whose frozen transaction the takeover aborted: (offset ranges, records written)."""
    committed: list[tuple[list[tuple[str, int, int, int]], int]] = []
    """Rounds whose frozen transaction turned out to be committing already (its commit had reached
    the coordinator before the freeze, the markers had not): completed, visible, legitimate."""
    attempts: list[int] = []
    takeovers: list[float] = []
    exits: list[int] = []
    refused: list[str] = []
    settled_late = 0
    """Freezes whose seemingly open transaction ended while the book was frozen (commit in flight)."""
    try:
        pipeline.start()
        checker = ReadCommittedChecker(settings, TICK_MS, DELTA_MS).start()
        outputs = [
            TopicPartition(topic, p)
            for topic in (names.book_top3, names.features)
            for p in sorted(admin.list_topics(topic, timeout=10).topics[topic].partitions)
        ]
        while len(aborted) < rounds and len(takeovers) < rounds + EXTRA_ROUNDS:
            zombie = pipeline["book"]
            pipeline.wait_progress("book", 50)
            open_now: dict[tuple[str, int], tuple[int, int]] = {}
            for attempt in range(1, FREEZE_ATTEMPTS + 1):
                zombie.signal(signal.SIGSTOP)
                ends, open_now, ended_while_frozen = _open_transaction(admin, outputs)
                settled_late += ended_while_frozen
                if open_now:
                    attempts.append(attempt)
                    break
                zombie.signal(signal.SIGCONT)
                # The next freeze lands somewhere else: after the book's next commit.
                wait_for(
                    partial(_committed_past, admin, outputs, ends),
                    timeout=60,
                    interval=0.01,
                    message="the book's next commit",
                )
            assert open_now, f"no SIGSTOP in {FREEZE_ATTEMPTS} landed inside one of the book's transactions"
            zombies.append(zombie)
            replacement = ServiceProcess(
                f"book-replacement-{len(takeovers) + 1}",
                ["run", "book"],
                {**zombie.env, "METRICS_PORT": str(free_port())},
                tmp_path / "run",
            ).start()
            started = time.monotonic()
            pipeline.services["book"] = replacement
            # The replacement's init_transactions ends the zombie's open transaction: aborts it, or
            # completes it if the zombie's commit request had reached the coordinator after all.
            wait_for(
                partial(_resolved, admin, outputs, open_now),
                timeout=180,
                interval=0.2,
                message="the zombie's open transaction to be ended",
            )
            delivered = {"book.top3": checker.delivered("book.top3")}
            pipeline.wait_progress("book", 50, timeout=180)  # once the zombie's group session expired
            wait_for(
                partial(_delivered_beyond, checker, delivered),
                timeout=120,
                interval=0.2,
                message="read_committed book.top3 records from the replacement",
            )
            takeovers.append(time.monotonic() - started)
            # The replacement writes behind the range now: a read_committed reader gets past it.
            ranges = [(topic, p, first, end) for (topic, p), (first, end) in open_now.items()]
            written = sum(len(offsets_in(settings, *r, "read_uncommitted")) for r in ranges)
            visible = sum(len(offsets_in(settings, *r, "read_committed")) for r in ranges)
            assert written > 0, f"the zombie's open transaction holds no record: {ranges}"
            assert visible in (0, written), f"a transaction partly visible: {visible} of {written} records"
            (aborted if visible == 0 else committed).append((ranges, written))
            zombie.signal(signal.SIGCONT)
            assert zombie.process is not None
            exits.append(zombie.process.wait(120))
            assert exits[-1] != 0, f"the zombie exited cleanly; log tail:\n{zombie.log_tail()}"
            log = zombie.log_path.read_text(errors="replace")
            assert "fenced by a newer instance" in log, f"the zombie was not fenced; log tail:\n{zombie.log_tail()}"
            refused.append(_refused_call(log))
            pipeline.wait_progress("book", 50, timeout=120)
        pipeline.finish()
        report = checker.finish()
        verdict = verify_pipeline(settings, pipeline.lake_dir if "lake-sink" in services else None, services=services)
        aborted_ranges = [r for ranges, _ in aborted for r in ranges]
        visible_after = sum(len(offsets_in(settings, *r, "read_committed")) for r in aborted_ranges)
        seen_by_checker = checker.delivered_in(aborted_ranges)
    finally:
        pipeline.close()
        for zombie in zombies:
            zombie.close()
    written_aborted = sum(written for _, written in aborted)
    _report(
        fault_report,
        "zombie book (SIGSTOP mid-transaction, replacement with the same INSTANCE_ID, SIGCONT)",
        trials=len(takeovers),
        seconds=takeovers,
        verdict=verdict,
        report=report,
        extra_lost=visible_after + seen_by_checker,
        notes=(
            f"{broker_kind}; frozen inside a transaction after {attempts} SIGSTOPs; {len(aborted)} open "
            f"transactions aborted by the takeover, holding {written_aborted} records: {visible_after} visible "
            f"to read_committed afterwards, {seen_by_checker} to the live checker; {len(committed)} frozen "
            f"while already committing (completed, whole), {settled_late} freezes whose transaction "
            f"ended within {SETTLE_SECONDS:.0f} s not used; zombies refused at '{', '.join(refused)}' "
            f"(fenced), exits {exits}; seconds = replacement start to its first read_committed output"
        ),
    )
    assert len(aborted) == rounds, f"only {len(aborted)} of {len(takeovers)} freezes caught an open transaction"
    assert visible_after == 0, "records of the zombie's aborted transaction are visible to read_committed readers"
    assert seen_by_checker == 0, "records of the zombie's aborted transaction reached the live checker"
    assert report.ok, report.violations[:20]
    assert verdict.ok, verdict.problems


# -- the row ----------------------------------------------------------------------------------------


def _report(
    fault_report: FaultReport,
    fault: str,
    *,
    trials: int,
    seconds: list[float],
    verdict: Verdict,
    report: CheckerReport,
    notes: str,
    extra_lost: int = 0,
) -> None:
    ok = verdict.ok and report.ok
    fault_report.add(
        fault,
        trials=trials,
        recovered=trials if ok else 0,
        lost=verdict.lost + report.gaps + report.vanished + extra_lost,
        duplicated=verdict.duplicated + report.duplicates,
        seconds=max(seconds, default=None),
        notes=(
            f"{notes}; seconds per trial {[round(s, 1) for s in seconds]}; read_committed checker: "
            f"{report.summary()}; exactly-once vs the pure functions: "
            + ", ".join(f"{k} {v}" for k, v in verdict.counts.items())
        ),
    )
