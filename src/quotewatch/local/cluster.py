"""A local Kafka KRaft cluster of several brokers (the cluster fault tests).

Built on :class:`~quotewatch.local.kafka.LocalKafka`, one combined broker+controller per node.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from quotewatch.core.errors import BrokerError
from quotewatch.local.kafka import BrokerState, ClusterMember, LocalKafka, _cluster_id, default_data_dir, free_port


@dataclass(frozen=True)
class _NodeLayout:
    node_id: int
    port: int
    controller_port: int


@dataclass
class ClusterState:
    """What ``status`` reports for a :class:`LocalKafkaCluster`: every node's state."""

    data_dir: str
    cluster_id: str
    nodes: list[BrokerState] = field(default_factory=list)

    @property
    def bootstrap_servers(self) -> str:
        """Every node's listener: a client finds the cluster through any node that is up."""
        return ",".join(node.bootstrap_servers for node in self.nodes)

    @property
    def running(self) -> bool:
        """True when every node runs."""
        return bool(self.nodes) and all(node.running for node in self.nodes)


class LocalKafkaCluster:
    """N local brokers on one box, one KRaft cluster (see the module docstring: combined nodes,
    a static quorum of all of them, replication from :func:`~quotewatch.core.topics.replication_for`).

    Identified by its data directory, which holds ``cluster.json`` (the cluster id, node ids and
    ports, fixed when the cluster is first formatted) and one ``node-<id>`` directory per node.
    Node ids run 1..N.
    """

    def __init__(self, data_dir: Path | None = None, brokers: int = 3) -> None:
        if brokers < 2:
            raise BrokerError(f"a cluster needs at least 2 brokers, got {brokers} (one broker: LocalKafka)")
        self.data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self.size = brokers
        self._state_file = self.data_dir / "cluster.json"
        self._nodes: dict[int, LocalKafka] = {}

    @staticmethod
    def holds_cluster(data_dir: Path) -> bool:
        """True when ``data_dir`` is (or was) a cluster's, not a single broker's."""
        return (data_dir.expanduser() / "cluster.json").exists()

    # -- layout -----------------------------------------------------------------------------

    def _load_layout(self) -> tuple[str, list[_NodeLayout]] | None:
        if not self._state_file.exists():
            return None
        raw = json.loads(self._state_file.read_text())
        return str(raw["cluster_id"]), [_NodeLayout(**node) for node in raw["nodes"]]

    def _save_layout(self, cluster_id: str, layout: list[_NodeLayout]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        data = {"cluster_id": cluster_id, "nodes": [asdict(node) for node in layout]}
        self._state_file.write_text(json.dumps(data, indent=2) + "\n")

    def _make_nodes(self, cluster_id: str, layout: list[_NodeLayout]) -> dict[int, LocalKafka]:
        controllers = tuple((node.node_id, node.controller_port) for node in layout)
        self.size = len(layout)
        self._nodes = {
            node.node_id: LocalKafka(
                self.data_dir / f"node-{node.node_id}", ClusterMember(node.node_id, cluster_id, controllers)
            )
            for node in layout
        }
        return self._nodes

    def nodes(self) -> dict[int, LocalKafka]:
        """The nodes by id (empty before the first start)."""
        if not self._nodes and (loaded := self._load_layout()) is not None:
            self._make_nodes(*loaded)
        return self._nodes

    def node(self, node_id: int) -> LocalKafka:
        """One node by id.

        Raises:
            KeyError: no such node.
        """
        return self.nodes()[node_id]

    # -- state ------------------------------------------------------------------------------

    def status(self) -> ClusterState | None:
        """Every node's ports and PID, or None if this data directory never held a cluster."""
        loaded = self._load_layout()
        if loaded is None:
            return None
        cluster_id, layout = loaded
        nodes = self.nodes()
        states = []
        for spec in layout:
            state = nodes[spec.node_id].status()
            if state is None:  # in the layout, never launched
                state = BrokerState(
                    str(nodes[spec.node_id].data_dir), spec.port, spec.controller_port, cluster_id, node_id=spec.node_id
                )
            states.append(state)
        return ClusterState(str(self.data_dir), cluster_id, states)

    # -- start / stop -----------------------------------------------------------------------

    def start(
        self,
        ports: Sequence[int] | None = None,
        timeout: float = 180.0,
        heap: str = "256m",
        *,
        die_with_parent: bool = False,
    ) -> ClusterState:
        """Start every node that is not running and wait until all are brokers of the cluster.

        Args:
            ports: the nodes' listener ports (node 1 first) on the first start; later starts reuse
                the recorded ones (default 9092, 9093, ...).
            heap: each node's max heap (three JVMs share the box: keep it small).
            die_with_parent: see :meth:`LocalKafka.start`.

        Raises:
            BrokerError: a port is taken, a node exited or the cluster did not form in time.
        """
        loaded = self._load_layout()
        if loaded is None:
            ports = list(ports) if ports is not None else [9092 + i for i in range(self.size)]
            if len(ports) != self.size:
                raise BrokerError(f"{self.size} brokers need {self.size} ports, got {len(ports)}")
            cluster_id = _cluster_id()
            layout = [_NodeLayout(i + 1, port, free_port()) for i, port in enumerate(ports)]
            self._save_layout(cluster_id, layout)
        else:
            cluster_id, layout = loaded
            if ports is not None and list(ports) != [node.port for node in layout]:
                raise BrokerError(
                    f"the cluster in {self.data_dir} listens on {[node.port for node in layout]}, "
                    f"fixed when it was formatted; asked for {list(ports)}"
                )
        nodes = self._make_nodes(cluster_id, layout)
        for spec in layout:
            nodes[spec.node_id].launch(spec.port, heap, die_with_parent=die_with_parent)
        deadline = time.monotonic() + timeout
        for node in nodes.values():
            node.wait_until_up(max(1.0, deadline - time.monotonic()))
        state = self.status()
        assert state is not None
        return state

    def start_node(
        self, node_id: int, timeout: float = 180.0, heap: str = "256m", *, die_with_parent: bool = False
    ) -> BrokerState:
        """Start one node again (after :meth:`kill` or :meth:`stop_node`) and wait until it is a broker.

        Raises:
            BrokerError: the node did not come back.
        """
        node = self.node(node_id)
        loaded = self._load_layout()
        assert loaded is not None
        port = next(spec.port for spec in loaded[1] if spec.node_id == node_id)
        return node.start(port, timeout, heap, die_with_parent=die_with_parent)

    def kill(self, node_id: int) -> bool:
        """``kill -9`` one node (a crash: no controlled shutdown, no leadership handed over)."""
        return self.node(node_id).kill()

    def stop_node(self, node_id: int, timeout: float = 60.0) -> bool:
        """Stop one node cleanly (SIGTERM: a controlled shutdown that moves its leaderships first)."""
        return self.node(node_id).stop(timeout)

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop every node (SIGTERM to all first, so they shut down together) and wait for them.

        Returns:
            True if any node was running.
        """
        nodes = list(self.nodes().values())
        running = [(node, pid) for node in nodes if (pid := node._running_pid()) is not None]
        for _, pid in running:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).send_signal(signal.SIGTERM)
        for node, _ in running:
            node.stop(timeout)
        return bool(running)
