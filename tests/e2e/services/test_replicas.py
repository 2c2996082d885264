"""Two replicas each of book, labeler and inference, one of each SIGKILLed mid-stream: the outputs
equal a single-replica run of the same input, record for record.

Run A (replicated): the local feed server's synthetic market (6 symbols, two per ``md.events``
partition) through a real ``quotewatch run ingest`` into ``A.md.events``; book, labeler and
inference each run as two real processes in one consumer group (``A.<service>``) with distinct
INSTANCE_IDs, so distinct transactional ids. Once every replica is processing, one replica of each
service is SIGKILLed while the input still flows; the survivors take its partitions over (after the
group's session timeout), rebuild the state from the restart offsets the dead replica committed,
and carry on. Then the input stops and every group catches up.

Run B (reference): ``A.md.events`` copied partition by partition, offset by offset into
``B.md.events``, and one process each of book, labeler and inference on B.

Inference serves a registered champion (a pinned model version) so that a prediction is a pure
function of its feature record (the built-in fallback learns from the labels it happens to see,
which differ per replica by design). Read with read_committed, ``book.top3``, ``features``,
``labels`` and ``predictions`` must then hold the same records in the same order per partition in
A and B (offsets may differ: transaction markers sit where each run committed).
"""

from __future__ import annotations

import signal
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin, producer_config
from quotewatch.core.records import Prediction, Record
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig
from quotewatch.local.kafka import free_port
from quotewatch.services.feed_server.server import FeedServer, RunningFeedServer, SyntheticSource
from tests.broker.services.inference.registry_models import fitted_lr, register, set_alias
from tests.conftest import MlflowServerInfo
from tests.faults.support import ServiceProcess, last_data_offsets, read_all
from tests.helpers import committed_past, wait_for

# Two symbols in each of the three md.events partitions (librdkafka's partitioner: CRC32(key) % 3).
SYMBOLS = ("ETH-USD", "ADA-USD", "AVAX-USD", "DOT-USD", "BTC-USD", "SOL-USD")
TICK_MS = 100
DELTA_MS = 500
REPLICATED = ("book", "labeler", "inference")
DERIVED = ("book.top3", "features", "labels", "predictions")


def inputs(names: TopicNames, service: str) -> list[str]:
    return {
        "book": [names.md_events],
        "labeler": [names.book_top3],
        "inference": [names.features, names.labels],
    }[service]


def service_env(settings: CommonSettings, prefix: str, model_uri: str, tracking_uri: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPIC_PREFIX": prefix,
        "SYMBOLS": ",".join(SYMBOLS),
        "TICK_MS": str(TICK_MS),
        "DELTA_MS": str(DELTA_MS),
        "LOG_LEVEL": "INFO",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MODEL_URI": model_uri,
        "CHALLENGER_URI": model_uri.replace("@champion", "@challenger"),  # no such alias: no challenger
    }


def start(name: str, service: str, env: dict[str, str], log_dir: Path, **extra: str) -> ServiceProcess:
    return ServiceProcess(name, ["run", service], {**env, "METRICS_PORT": str(free_port()), **extra}, log_dir).start()


def healthy(process: ServiceProcess) -> bool:
    return process.assert_alive() and process.health().healthy


def processed_at_least(process: ServiceProcess, records: int) -> bool:
    return process.assert_alive() and process.records_processed() >= records


def caught_up(settings: CommonSettings, service: str, survivors: list[ServiceProcess]) -> bool:
    """Has ``service``'s group committed every record of its inputs (as they are now)?"""
    names = TopicNames(settings.topic_prefix)
    lasts = {
        (topic, partition): last
        for topic in inputs(names, service)
        for partition, last in last_data_offsets(settings, topic).items()
    }
    alive = all(process.assert_alive() for process in survivors)
    try:
        return alive and committed_past(settings, f"{settings.topic_prefix}.{service}", lasts)
    except KafkaException as exc:
        # The group's offsets are held back while the killed replica's transaction is open (this
        # reader is read_committed too, KIP-447): not yet.
        if exc.args[0].code() == KafkaError._TIMED_OUT:
            return False
        raise


def copy_topic(source: CommonSettings, target: CommonSettings, topic_suffix: str) -> int:
    """Every record of ``source``'s topic into ``target``'s, same partition, same order."""
    source_topic = f"{source.topic_prefix}.{topic_suffix}"
    target_topic = f"{target.topic_prefix}.{topic_suffix}"
    producer = Producer(producer_config(target, "replicas-test-copy"))
    records = read_all(source, source_topic)
    for record in records:
        key = record.key.encode() if record.key is not None else None
        producer.produce(target_topic, record.raw, key=key, partition=record.partition)
        producer.poll(0)
    assert producer.flush(60) == 0
    return len(records)


def per_partition(settings: CommonSettings, suffix: str) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = {}
    for record in read_all(settings, f"{settings.topic_prefix}.{suffix}"):
        assert record.value is not None, f"{record.topic}[{record.partition}]@{record.offset} does not decode"
        out.setdefault(record.partition, []).append(record.value)
    return out


@pytest.mark.timeout(900)
def test_two_replicas_each_one_killed_mid_stream_give_the_single_replica_outputs(
    make_settings: Any, mlflow_server: MlflowServerInfo, tmp_path: Path
) -> None:
    began = time.monotonic()
    replicated: CommonSettings = make_settings()
    reference: CommonSettings = make_settings(topic_prefix=f"{replicated.topic_prefix}-single")
    for settings in (replicated, reference):
        ensure_topics(make_admin(settings), settings.topic_prefix)
    model_name = f"replicas-{uuid.uuid4().hex[:6]}"
    version = register(mlflow_server.tracking_uri, model_name, fitted_lr(seed=5))
    set_alias(mlflow_server.tracking_uri, model_name, "champion", version)
    model_uri = f"models:/{model_name}@champion"
    env_a = service_env(replicated, replicated.topic_prefix, model_uri, mlflow_server.tracking_uri)
    env_b = service_env(reference, reference.topic_prefix, model_uri, mlflow_server.tracking_uri)

    feed = RunningFeedServer(
        FeedServer(
            "advanced", SyntheticSource(SyntheticConfig(symbols=SYMBOLS, seed=17, rate=25.0)), heartbeat_interval=0.25
        )
    )
    processes: list[ServiceProcess] = []
    try:
        feed.start()
        replicas = {
            (service, index): start(f"{service}-{index}", service, env_a, tmp_path, INSTANCE_ID=f"replica{index}")
            for service in REPLICATED
            for index in (1, 2)
        }
        processes.extend(replicas.values())
        for process in processes:
            wait_for(partial(healthy, process), timeout=300, interval=0.2, message=f"{process.name}'s /health")
        # The input starts once every replica is up (group joins and model loading are not part of the test).
        ingest = start(
            "ingest",
            "ingest",
            env_a,
            tmp_path,
            COINBASE_WS_URL=feed.url,
            FEED="coinbase-advanced",
            HEARTBEAT_TIMEOUT_SECONDS="1.5",
        )
        processes.append(ingest)
        wait_for(partial(healthy, ingest), timeout=300, interval=0.2, message="ingest's /health")

        # Both replicas of each service get partitions (range assignor: 2 + 1 of 3) and process them.
        for (service, index), process in replicas.items():
            wait_for(
                partial(processed_at_least, process, 20),
                timeout=180,
                interval=0.2,
                message=f"{service} replica {index} to process records",
            )
        victims = {service: replicas[(service, 1)] for service in REPLICATED}
        survivors = {service: replicas[(service, 2)] for service in REPLICATED}
        before = {service: process.records_processed() for service, process in victims.items()}
        for process in victims.values():
            assert process.kill() == -signal.SIGKILL
        # The input keeps flowing while the survivors notice (session timeout) and take over.
        for service, process in survivors.items():
            done = process.records_processed()
            wait_for(
                partial(processed_at_least, process, done + 100),
                timeout=300,
                interval=0.2,
                message=f"{service}'s survivor to carry on after the kill",
            )
        assert ingest.stop() == 0, ingest.log_tail()
        for service in REPLICATED:
            wait_for(
                partial(caught_up, replicated, service, [survivors[service]]),
                timeout=240,
                interval=0.5,
                message=f"{service}'s survivor to commit all of its group's input",
            )
        for process in survivors.values():
            assert process.stop() == 0, process.log_tail()

        copied = copy_topic(replicated, reference, "md.events")
        singles = {service: start(f"{service}-single", service, env_b, tmp_path) for service in REPLICATED}
        processes.extend(singles.values())
        for service, process in singles.items():
            wait_for(
                partial(caught_up, reference, service, [process]),
                timeout=240,
                interval=0.5,
                message=f"the single {service} to commit all of its input",
            )
        for process in singles.values():
            assert process.stop() == 0, process.log_tail()

        got = {suffix: per_partition(replicated, suffix) for suffix in DERIVED}
        want = {suffix: per_partition(reference, suffix) for suffix in DERIVED}
        logs = {service: replicas[(service, 2)].log_path.read_text(errors="replace") for service in REPLICATED}
    finally:
        for process in processes:
            process.close()
        feed.stop()

    assert all(count > 0 for count in before.values()), before
    assert copied > 0
    for suffix in DERIVED:
        assert sorted(want[suffix]) == [0, 1, 2], f"{suffix}: every partition has records in the single run"
        for partition in sorted(want[suffix]):
            expected, actual = want[suffix][partition], got[suffix].get(partition, [])
            assert len(actual) == len(expected), (
                f"{suffix}[{partition}]: {len(actual)} records, single run {len(expected)}"
            )
            assert actual == expected, f"{suffix}[{partition}] differs from the single-replica run"
    served = [p for records in got["predictions"].values() for p in records if isinstance(p, Prediction)]
    assert len(served) == sum(map(len, got["predictions"].values())), "predictions hold Prediction records"
    assert {p.model_role for p in served} == {"CHAMPION"}, "the pinned champion served every tick"
    assert {p.model_version for p in served} == {version}
    for service in ("book", "labeler"):
        assert "rebuilding state from already-committed input" in logs[service], f"{service}'s survivor rebuilt state"
    print(f"replica test: {time.monotonic() - began:.0f} s, {sum(map(len, got['features'].values()))} feature ticks")
