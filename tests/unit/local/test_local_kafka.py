"""The local broker manager without a broker: one-line errors, the configuration and storage format of a
single broker and of a cluster node, process handling with a stand-in for the JVM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quotewatch.cli import main
from quotewatch.core.errors import BrokerError
from quotewatch.local import cluster as local_cluster
from quotewatch.local import kafka as local_kafka
from quotewatch.local.cluster import LocalKafkaCluster
from quotewatch.local.kafka import BrokerState, ClusterMember, LocalKafka, port_is_free
from tests.helpers import wait_for


def test_missing_java_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_kafka.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="java not found on PATH") as info:
        local_kafka.java_version()
    assert "\n" not in str(info.value)


def test_missing_mvn_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUOTEWATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(local_kafka.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="mvn not found on PATH"):
        local_kafka.ensure_jars()


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(BrokerError, match=f"port {port} is already in use"):
            LocalKafka(tmp_path / "kafka").start(port=port)


def test_status_of_an_unused_data_dir(tmp_path: Path) -> None:
    assert LocalKafka(tmp_path).status() is None
    assert LocalKafka(tmp_path).stop() is False


def test_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-storage parses an id starting with "-" as an option (a CI run failed on one)."""
    import uuid

    dash_first = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 "-A..."
    fine = uuid.UUID(bytes=bytes(16))
    draws = iter([dash_first, dash_first, fine])
    monkeypatch.setattr(local_kafka.uuid, "uuid4", lambda: next(draws))
    cluster_id = local_kafka._cluster_id()
    assert cluster_id == "AAAAAAAAAAAAAAAAAAAAAA"
    assert len(cluster_id) == 22


# -- a cluster of local brokers ----------------------------------------------------------------------


def _properties(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


MEMBER = ClusterMember(2, "AAAAAAAAAAAAAAAAAAAAAA", ((1, 40001), (2, 40002), (3, 40003)))


def test_a_cluster_node_is_a_voter_of_the_static_quorum_and_replicates_three_ways(tmp_path: Path) -> None:
    node = LocalKafka(tmp_path / "node-2", MEMBER)
    node.data_dir.mkdir()
    node._write_config(BrokerState(str(node.data_dir), 9093, MEMBER.controller_port, MEMBER.cluster_id, node_id=2))
    props = _properties(node.data_dir / "server.properties")
    assert props["node.id"] == "2"
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:40001,2@127.0.0.1:40002,3@127.0.0.1:40003"
    assert "controller.quorum.bootstrap.servers" not in props
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9093,CONTROLLER://127.0.0.1:40002"
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
    ):
        assert props[key] == "3", key
    for key in ("min.insync.replicas", "transaction.state.log.min.isr"):
        assert props[key] == "2", key
    assert props["unclean.leader.election.enable"] == "false"


def test_a_single_broker_keeps_one_replica_and_its_own_quorum(tmp_path: Path) -> None:
    node = LocalKafka(tmp_path)
    node._write_config(BrokerState(str(tmp_path), 9092, 40000, "AAAAAAAAAAAAAAAAAAAAAA"))
    props = _properties(tmp_path / "server.properties")
    assert props["node.id"] == "1"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:40000"
    assert "controller.quorum.voters" not in props
    assert props["default.replication.factor"] == props["offsets.topic.replication.factor"] == "1"
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "1"


@pytest.mark.parametrize(("member", "standalone"), [(None, True), (MEMBER, False)])
def test_storage_is_formatted_standalone_only_for_a_single_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: ClusterMember | None, standalone: bool
) -> None:
    calls: list[list[str]] = []

    def run(args: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(local_kafka.subprocess, "run", run)
    node = LocalKafka(tmp_path, member)
    node._format(tmp_path, BrokerState(str(tmp_path), 9092, 40002, "AAAAAAAAAAAAAAAAAAAAAA"))
    (args,) = calls
    assert args[args.index("kafka.tools.StorageTool") + 1] == "format"
    assert ("--standalone" in args) is standalone
    assert args[args.index("-t") + 1] == "AAAAAAAAAAAAAAAAAAAAAA"


class SleeperKafka(LocalKafka):
    """LocalKafka launching a stand-in for the JVM with the broker's arguments (so it is recognised as
    this data directory's broker): the process handling is the real one, no Java needed."""

    def _java(self, libs: Path, heap: str, *args: str) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(600)", *args]


def test_kill_is_a_sigkill_of_the_node_and_reaps_it(tmp_path: Path) -> None:
    node = SleeperKafka(tmp_path, MEMBER)
    node._launch(Path("."), "256m")
    try:
        wait_for(lambda: node._running_pid() is not None, timeout=30, message="the stand-in to exec")
        assert node.kill()
        assert node.exit_code() == -signal.SIGKILL
        assert node.status() is None or not node._pid_file.exists()
        assert node.kill() is False
    finally:
        if node._launched is not None and node._launched.poll() is None:
            node._launched.kill()


def test_a_cluster_needs_two_brokers_and_one_port_each(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="at least 2 brokers"):
        LocalKafkaCluster(tmp_path, brokers=1)
    cluster = LocalKafkaCluster(tmp_path / "cluster", brokers=3)
    assert cluster.status() is None
    assert cluster.stop() is False
    with pytest.raises(BrokerError, match="3 brokers need 3 ports, got 2"):
        cluster.start([9092, 9093])
    assert not LocalKafkaCluster.holds_cluster(tmp_path / "cluster")


def test_cli_keeps_a_cluster_and_a_single_broker_apart(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    (single / "broker.json").write_text('{"port": 9092, "controller_port": 40000, "cluster_id": "x"}\n')
    result = CliRunner().invoke(main, ["broker", "start", "--brokers", "3", "--data-dir", str(single)])
    assert result.exit_code == 1
    assert "holds a single broker" in result.output

    layout = tmp_path / "cluster"
    LocalKafkaCluster(layout)._save_layout(
        "AAAAAAAAAAAAAAAAAAAAAA", [local_cluster._NodeLayout(i, 19090 + i, 40000 + i) for i in (1, 2, 3)]
    )
    result = CliRunner().invoke(main, ["broker", "status", "--data-dir", str(layout)])
    assert result.exit_code == 1
    assert "broker 2: not running, bootstrap 127.0.0.1:19092" in result.output
    assert "cluster bootstrap 127.0.0.1:19091,127.0.0.1:19092,127.0.0.1:19093" in result.output
    result = CliRunner().invoke(main, ["broker", "start", "--brokers", "1", "--data-dir", str(layout)])
    assert result.exit_code == 1
    assert "holds a cluster of 3 brokers, not 1" in result.output
    result = CliRunner().invoke(main, ["broker", "stop", "--data-dir", str(layout)])
    assert result.exit_code == 0
    assert "no broker running" in result.output
