"""How many replicas the catalog's topics get: 3 (min.insync.replicas 2) from three brokers up, 1 on one broker."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import BrokerMetadata, ClusterMetadata, PartitionMetadata, TopicMetadata

from quotewatch.core.kafka import cluster_size
from quotewatch.core.topics import CATALOG, MD_EVENTS, replication_for


@pytest.mark.parametrize(("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))])
def test_replication_follows_the_cluster_size(brokers: int, expected: tuple[int, int]) -> None:
    assert replication_for(brokers) == expected


def test_a_replicated_topic_gets_min_insync_replicas_and_a_single_replica_keeps_the_broker_default() -> None:
    assert MD_EVENTS.configs(3)["min.insync.replicas"] == "2"
    for spec in CATALOG.values():
        assert "min.insync.replicas" not in spec.configs()
        assert "min.insync.replicas" not in spec.configs(1)
        assert spec.configs(3)["cleanup.policy"] == spec.configs()["cleanup.policy"]


def _metadata(live: list[int], replica_lists: list[list[int]]) -> ClusterMetadata:
    metadata = ClusterMetadata()
    metadata.brokers = {broker: BrokerMetadata() for broker in live}
    topic = TopicMetadata()
    for index, replicas in enumerate(replica_lists):
        partition = PartitionMetadata()
        partition.replicas = replicas
        topic.partitions[index] = partition
    metadata.topics = {"t": topic} if replica_lists else {}
    return metadata


def test_a_broker_that_is_down_still_counts_in_the_cluster_size() -> None:
    assert cluster_size(_metadata([1], [])) == 1
    assert cluster_size(_metadata([1, 2, 3], [[1, 2, 3]])) == 3
    # Broker 2 killed: the metadata lists two brokers, the replica lists still name three.
    assert cluster_size(_metadata([1, 3], [[2, 3, 1], [3, 1, 2]])) == 3
