"""Real Apache Kafka 4.x in KRaft mode, run from Maven Central jars on a machine without Docker:
one node (:class:`LocalKafka`, combined broker + controller) or a cluster of them on one box
(:class:`LocalKafkaCluster`, ``quotewatch broker start --brokers 3``, what ``make faults`` kills).

``quotewatch broker start|stop|status`` and the pytest broker fixture use :class:`LocalKafka`:

- the jars are resolved once by Maven from ``infra/kafka/pom.xml`` into a cache directory
  (``QUOTEWATCH_CACHE_DIR`` or the per-user cache);
- the storage is formatted on first start (``kafka.tools.StorageTool format --standalone``);
- ``start`` waits until the broker answers metadata requests; ``stop`` ends the process by its
  recorded PID and waits for it;
- ``start(die_with_parent=True)`` (what ``quotewatch demo`` uses) makes the kernel SIGTERM the
  broker should the starting process die, even by SIGKILL (:mod:`quotewatch.local.lifetime`);
  ``quotewatch broker start`` leaves it running on its own, which is that command's point.

Everything about one broker lives in its data directory: properties, data, PID, log, ports.

**The cluster** (:class:`LocalKafkaCluster`): N nodes, each a :class:`LocalKafka` in
``<data dir>/node-<id>`` with its own listener, controller port, log and PID, all *combined*
(broker + controller) and all voters of one static controller quorum
(``controller.quorum.voters``). Combined, not separate controllers: a separate quorum that
survives one loss needs three more JVMs (six on a 2-core box), and a single separate controller
would be a point of failure the brokers' replication does not have. Combined, killing a node can
kill the active controller *and* partition leaders at once, the harder failover. Replication
follows :func:`quotewatch.core.topics.replication_for`: with 3 nodes every topic, the consumer
offsets and the transaction log have 3 replicas and ``min.insync.replicas=2`` (an acks=all write
is on two nodes before it is acknowledged), unclean leader election off. :meth:`LocalKafkaCluster.kill`
is a ``kill -9`` of one node; :meth:`LocalKafkaCluster.start_node` brings it back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs
import psutil

from quotewatch.core.errors import BrokerError
from quotewatch.core.topics import replication_for
from quotewatch.local.lifetime import die_with_parent as _die_with_parent

logger = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
MIN_JAVA = 17
_REPO_POM = Path(__file__).resolve().parents[3] / "infra" / "kafka" / "pom.xml"

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


def default_data_dir() -> Path:
    """The per-user state directory of the default broker."""
    return Path(platformdirs.user_state_dir("quotewatch")) / "kafka"


def cache_dir() -> Path:
    return Path(os.environ.get("QUOTEWATCH_CACHE_DIR") or platformdirs.user_cache_dir("quotewatch"))


def java_version() -> int:
    """The major version of ``java`` on PATH.

    Raises:
        BrokerError: java is missing or older than 17.
    """
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            f"java not found on PATH: the local Kafka broker needs a JDK {MIN_JAVA}+ "
            "(apt install openjdk-17-jre-headless)"
        )
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        raise BrokerError(f"cannot tell the version of {java}: {result.stderr.strip()[:200]}")
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise BrokerError(f"java {major} found at {java}; the local Kafka broker needs Java {MIN_JAVA}+")
    return major


def ensure_jars(pom: Path | None = None) -> Path:
    """The directory of the broker's jars, resolved by Maven on first use.

    Raises:
        BrokerError: mvn is missing or the resolution failed.
    """
    libs = cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    pom = pom or Path(os.environ.get("QUOTEWATCH_KAFKA_POM", _REPO_POM))
    if not pom.exists():
        raise BrokerError(f"the broker's Maven pom is missing: {pom} (set QUOTEWATCH_KAFKA_POM)")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "mvn not found on PATH: the local Kafka broker's jars are resolved with Maven (apt install maven)"
        )
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("resolving Kafka %s jars with Maven into %s", KAFKA_VERSION, libs)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not any(staging.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise BrokerError(f"Maven could not resolve the Kafka jars (exit {result.returncode}): {' | '.join(tail)}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    marker.write_text(KAFKA_VERSION + "\n")
    return libs


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class BrokerState:
    """What ``status`` reports and ``broker.json`` keeps."""

    data_dir: str
    port: int
    controller_port: int
    cluster_id: str
    pid: int | None = None
    running: bool = False
    node_id: int = 1

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class ClusterMember:
    """How one node of a :class:`LocalKafkaCluster` joins it: its id and the static controller quorum."""

    node_id: int
    cluster_id: str
    controllers: tuple[tuple[int, int], ...]
    """Every voter of the quorum as (node id, controller port): every node of the cluster."""

    @property
    def controller_port(self) -> int:
        return dict(self.controllers)[self.node_id]

    @property
    def size(self) -> int:
        return len(self.controllers)

    def voters(self) -> str:
        """``controller.quorum.voters``: ``1@127.0.0.1:port,2@...``."""
        return ",".join(f"{node}@127.0.0.1:{port}" for node, port in self.controllers)


class LocalKafka:
    """One local broker, identified by its data directory.

    Args:
        member: this broker is one node of a :class:`LocalKafkaCluster` (its node id, cluster id
            and controller quorum come from there); None: a standalone single-node cluster.
    """

    def __init__(self, data_dir: Path | None = None, member: ClusterMember | None = None) -> None:
        self.member = member
        self.node_id = member.node_id if member is not None else 1
        self.data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self._state_file = self.data_dir / "broker.json"
        self._pid_file = self.data_dir / "broker.pid"
        self.log_file = self.data_dir / "broker.log"
        self._properties = self.data_dir / "server.properties"
        self._log_dirs = self.data_dir / "kraft"
        self._launched: subprocess.Popen[bytes] | None = None
        self._launched_now = False
        self._state: BrokerState | None = None

    # -- state ------------------------------------------------------------------------------

    def _load_state(self) -> BrokerState | None:
        if not self._state_file.exists():
            return None
        raw = json.loads(self._state_file.read_text())
        return BrokerState(
            data_dir=str(self.data_dir),
            port=raw["port"],
            controller_port=raw["controller_port"],
            cluster_id=raw["cluster_id"],
            node_id=self.node_id,
        )

    def _save_state(self, state: BrokerState) -> None:
        data = {key: value for key, value in asdict(state).items() if key in {"port", "controller_port", "cluster_id"}}
        self._state_file.write_text(json.dumps(data, indent=2) + "\n")

    def _running_pid(self) -> int | None:
        if not self._pid_file.exists():
            return None
        try:
            pid = int(self._pid_file.read_text().strip())
            process = psutil.Process(pid)
            cmdline = process.cmdline()
        except (ValueError, psutil.Error):
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if "kafka.Kafka" in cmdline and str(self._properties) in cmdline:
            return pid
        return None

    def status(self) -> BrokerState | None:
        """The broker's ports and PID, or None if this data directory never held a broker."""
        state = self._load_state()
        if state is None:
            return None
        pid = self._running_pid()
        state.pid, state.running = pid, pid is not None
        return state

    # -- start ------------------------------------------------------------------------------

    def start(
        self, port: int = 9092, timeout: float = 90.0, heap: str = "768m", *, die_with_parent: bool = False
    ) -> BrokerState:
        """Start the broker (formatting its storage on first start) and wait until it answers.

        Idempotent: a broker already running from this data directory is left alone. A node of a
        cluster is up once it is a registered, unfenced broker of the cluster (which needs a
        majority of the controller quorum running).

        Args:
            die_with_parent: the kernel sends the broker SIGTERM when the thread that called this
                ends, i.e. when its process dies, however it dies (a supervisor that owns the broker
                calls this from its main thread); False leaves the broker running on its own.

        Raises:
            BrokerError: java/mvn missing, the port is taken, or the broker did not come up.
        """
        state = self.launch(port, heap, die_with_parent=die_with_parent)
        if not self._launched_now:
            return state
        self.wait_until_up(timeout)
        state.pid, state.running = self._running_pid(), True
        return state

    def launch(self, port: int = 9092, heap: str = "768m", *, die_with_parent: bool = False) -> BrokerState:
        """Start the broker's process without waiting for it (formatting its storage on first start).

        A cluster launches all its nodes this way, then waits for them together: no node answers
        before a majority of the quorum runs. A broker already running is left alone.

        Raises:
            BrokerError: java/mvn missing, a port is taken, or formatting failed.
        """
        self._launched_now = False
        current = self.status()
        if current is not None and current.running:
            if current.port != port:
                logger.warning("broker already running on another port", extra={"port": current.port})
            return current
        java_version()
        libs = ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        if state is None:
            if self.member is not None:
                controller_port, cluster_id = self.member.controller_port, self.member.cluster_id
            else:
                controller_port, cluster_id = free_port(), _cluster_id()
            state = BrokerState(str(self.data_dir), port, controller_port, cluster_id, node_id=self.node_id)
        state.port = port
        if not port_is_free(port):
            raise BrokerError(f"port {port} is already in use on 127.0.0.1: stop what listens there or pass --port")
        if not port_is_free(state.controller_port):
            raise BrokerError(
                f"controller port {state.controller_port} (fixed when {self.data_dir} was formatted) is in use"
            )
        self._write_config(state)
        if not (self._log_dirs / "meta.properties").exists():
            self._format(libs, state)
        self._save_state(state)
        self._launch(libs, heap, die_with_parent=die_with_parent)
        self._launched_now = True
        self._state = state
        return state

    def _write_config(self, state: BrokerState) -> None:
        replicas, min_insync = replication_for(self.member.size if self.member is not None else 1)
        quorum = (
            {"controller.quorum.voters": self.member.voters()}
            if self.member is not None
            else {"controller.quorum.bootstrap.servers": f"127.0.0.1:{state.controller_port}"}
        )
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": f"PLAINTEXT://127.0.0.1:{state.port},CONTROLLER://127.0.0.1:{state.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{state.port},CONTROLLER://127.0.0.1:{state.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self._log_dirs),
            "num.partitions": "1",
            "num.network.threads": "2",
            "num.io.threads": "4",
            # Internal topics replicated like ours (quotewatch.core.topics.replication_for): with
            # 3 nodes the group offsets and transaction states survive the loss of any one.
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min_insync),
            "unclean.leader.election.enable": "false",
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min_insync),
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min_insync),
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "message.max.bytes": str(33 * 1024 * 1024),
            "replica.fetch.max.bytes": str(34 * 1024 * 1024),
            "log.segment.bytes": str(128 * 1024 * 1024),
            "log.retention.hours": "168",
            "log.cleaner.backoff.ms": "2000",
        }
        self._properties.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_file, level="INFO"))

    def _java(self, libs: Path, heap: str, *args: str) -> list[str]:
        java = shutil.which("java") or "java"
        return [
            java,
            f"-Xms{min_heap(heap)}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            *args,
        ]

    def _format(self, libs: Path, state: BrokerState) -> None:
        result = subprocess.run(
            self._java(
                libs,
                "256m",
                "kafka.tools.StorageTool",
                "format",
                # Standalone: this node is the whole quorum. A cluster node: the static quorum of
                # controller.quorum.voters in its properties.
                *(["--standalone"] if self.member is None else []),
                "-t",
                state.cluster_id,
                "-c",
                str(self._properties),
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting the broker storage failed: {(result.stdout + result.stderr).strip()[-400:]}")

    def _launch(self, libs: Path, heap: str, *, die_with_parent: bool = False) -> None:
        stdout = (self.data_dir / "broker.stdout").open("ab")
        process = subprocess.Popen(
            self._java(libs, heap, "kafka.Kafka", str(self._properties)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.data_dir,
            preexec_fn=_die_with_parent() if die_with_parent else None,
        )
        stdout.close()
        self._pid_file.write_text(f"{process.pid}\n")
        self._launched = process

    def wait_until_up(self, timeout: float = 90.0) -> None:
        """Wait until this broker answers metadata requests as a registered broker of its cluster.

        Raises:
            BrokerError: the broker exited, or did not come up within ``timeout`` (it is stopped).
        """
        from confluent_kafka.admin import AdminClient

        state = self._state or self._load_state()
        if state is None:
            raise BrokerError(f"no broker was ever started from {self.data_dir}")
        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": state.bootstrap_servers, "log_level": 0})
        while time.monotonic() < deadline:
            # The launched child, not _running_pid(): right after the fork its command line is still
            # Python's (exec not yet done), which _running_pid() would take for an exited broker.
            launched = self._launched
            if launched is not None and launched.poll() is not None:
                raise BrokerError(f"the broker exited during start-up; last log lines: {self.log_tail()}")
            try:
                # Only this node's listener is asked (librdkafka may learn the others from it, so
                # the node must itself be among the registered brokers, not just some node).
                metadata = admin.list_topics(timeout=2)
                if self.node_id in metadata.brokers:
                    return
            except Exception:  # noqa: BLE001, S112 - not up yet: librdkafka raises several types while connecting
                continue
        self.stop()
        raise BrokerError(f"the broker did not answer within {timeout:.0f}s; last log lines: {self.log_tail()}")

    def exit_code(self) -> int | None:
        """The exit code of the broker this object launched, once it has exited (and is reaped).

        None while it runs, and when this object did not launch one (a broker found running).
        Who calls this: the demo's supervisor, every half second, to notice a dead broker.
        """
        return self._launched.poll() if self._launched is not None else None

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of the broker's logs, joined with ' | '."""
        text = []
        for path in (self.log_file, self.data_dir / "broker.stdout"):
            if path.exists():
                text.extend(path.read_text(errors="replace").strip().splitlines()[-lines:])
        return " | ".join(text[-lines:]) or "(no log)"

    # -- stop -------------------------------------------------------------------------------

    def kill(self, timeout: float = 30.0) -> bool:
        """``kill -9`` the broker (no shutdown at all: a crash) and wait until it is gone.

        Returns:
            True if a running broker was killed, False if none was running.
        """
        pid = self._running_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        if self._launched is not None and self._launched.pid == pid:
            self._launched.wait(timeout)  # our child: reaped here, so its exit code stays readable
        else:
            psutil.Process(pid).wait(timeout)
        self._pid_file.unlink(missing_ok=True)
        return True

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the broker by its recorded PID and wait for it to exit.

        Returns:
            True if a running broker was stopped, False if none was running.
        """
        pid = self._running_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            logger.warning("broker ignored SIGTERM; killing it", extra={"pid": pid})
            process.kill()
            process.wait(10)
        self._pid_file.unlink(missing_ok=True)
        return True


def min_heap(heap: str) -> str:
    """A start heap no larger than the max heap."""
    return "256m" if heap.endswith("m") and int(heap[:-1]) >= 256 else heap


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).

    Never one that starts with "-" (1 in 64 would): kafka-storage's argument parser takes it for an
    option ("--cluster-id: expected one argument"); Kafka's own ``Uuid.randomUuid()`` skips them too.
    """
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
