from __future__ import annotations

import json

from click.testing import CliRunner
from confluent_kafka import Producer

from quotewatch.cli import main
from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import describe_topics, ensure_topics, make_admin
from quotewatch.core.records import Label
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import CATALOG, TopicNames


def test_ensure_topics_creates_the_catalog_idempotently(settings: CommonSettings) -> None:
    admin = make_admin(settings)
    created = ensure_topics(admin, settings.topic_prefix)
    assert sorted(created) == sorted(TopicNames(settings.topic_prefix).all())
    assert ensure_topics(admin, settings.topic_prefix) == []
    infos = {info.name: info for info in describe_topics(admin, TopicNames(settings.topic_prefix).all())}
    for spec in CATALOG.values():
        info = infos[spec.name(settings.topic_prefix)]
        assert info.partitions == spec.partitions
        assert info.cleanup_policy == str(spec.cleanup_policy)
    assert infos[TopicNames(settings.topic_prefix).snapshot].cleanup_policy == "compact"
    metadata = admin.list_topics(timeout=10)
    if (
        len(metadata.brokers) == 1
    ):  # one replica on a single broker (the cluster's 3: tests/faults/test_cluster_faults.py)
        for name in TopicNames(settings.topic_prefix).all():
            assert {len(p.replicas) for p in metadata.topics[name].partitions.values()} == {1}, name


def test_cli_create_list_and_tail(settings: CommonSettings, monkeypatch: object) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "TOPIC_PREFIX": settings.topic_prefix}
    runner = CliRunner()
    result = runner.invoke(main, ["topics", "create"], env=env)
    assert result.exit_code == 0, result.output
    assert "created 8 topics" in result.output
    listing = runner.invoke(main, ["topics", "list"], env=env)
    assert listing.exit_code == 0
    lines = {line.split()[0]: line.split()[1:] for line in listing.output.strip().splitlines()[1:]}
    assert set(lines) == set(TopicNames(settings.topic_prefix).all())
    assert lines[TopicNames(settings.topic_prefix).snapshot] == ["1", "compact"]

    topic = TopicNames(settings.topic_prefix).labels
    serde = AvroSerde()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for i in range(5):
        producer.produce(
            topic,
            key=b"BTC-USD",
            value=serde.encode(
                topic,
                Label(
                    ts_event=1_000 + i,
                    ts_init=2_000 + i,
                    exchange="coinbase",
                    symbol="BTC-USD",
                    t_event=i,
                    delta_ms=500,
                    epoch=1,
                    label=i % 2,
                    best_bid_e8=1,
                    best_ask_e8=2,
                    future_best_bid_e8=1,
                    future_best_ask_e8=3,
                ),
            ),
        )
    producer.produce(topic, key=b"BTC-USD", value=b"garbage")
    assert producer.flush(10) == 0

    tail = runner.invoke(main, ["topics", "tail", topic, "--from-beginning"], env=env)
    assert tail.exit_code == 0, tail.output
    rows = [json.loads(line) for line in tail.output.strip().splitlines()]
    assert [row.get("t_event") for row in rows[:5]] == [0, 1, 2, 3, 4]
    assert "DecodeError" in rows[5]["_error"]
    assert rows[0]["_kafka"]["key"] == "BTC-USD"

    last_two = runner.invoke(main, ["topics", "tail", topic, "-n", "2"], env=env)
    assert [json.loads(line)["_kafka"]["offset"] for line in last_two.output.strip().splitlines()] == [4, 5]


def test_tail_of_a_missing_topic_is_one_clear_error(settings: CommonSettings) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers}
    result = CliRunner().invoke(main, ["topics", "tail", f"{settings.topic_prefix}.nope"], env=env)
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_watermarks_of_topics_created_a_moment_ago_are_answered(settings: CommonSettings) -> None:
    """Right after creation a partition may have no leader yet (NOT_LEADER_FOR_PARTITION): the query
    waits for it instead of failing (a replay into a namespace the services had just created did)."""
    from confluent_kafka import TopicPartition

    from quotewatch.core.kafka import make_consumer, query_watermarks
    from quotewatch.core.topics import split_topic
    from quotewatch.services.replay.publisher import check_fresh
    from quotewatch.services.replay.sources import SourceSpec

    ensure_topics(make_admin(settings), settings.topic_prefix)
    names = TopicNames(settings.topic_prefix)
    consumer = make_consumer(settings, f"{settings.topic_prefix}.wm", "wm")
    try:
        for topic in (names.md_raw, names.md_events, names.features):
            for partition in range(split_topic(topic)[1].partitions):
                assert query_watermarks(consumer, TopicPartition(topic, partition), timeout=30) == (0, 0)
    finally:
        consumer.close()
    check_fresh(settings, settings.topic_prefix, SourceSpec("topic", "elsewhere"))  # fresh: no error
