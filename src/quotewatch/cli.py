"""The ``quotewatch`` command line.

Sub-commands are imported lazily (``LAZY_COMMANDS``), so ``quotewatch broker start`` does not pay
for importing MLflow or Dash. A service's command lives in its own folder; this module only
names it.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from quotewatch.core.errors import QuoteWatchError

logger = logging.getLogger(__name__)

# group path -> {command name: "module:attribute"}; each attribute is a click.Command.
LAZY_COMMANDS: dict[str, dict[str, str]] = {
    "": {
        "demo": "quotewatch.local.demo:command",
        "mlflow": "quotewatch.local.mlflow:command",
        "train": "quotewatch.services.trainer.main:command",
        "replay": "quotewatch.services.replay.main:replay_command",
        "backtest": "quotewatch.services.replay.main:backtest_command",
        "quality": "quotewatch.quality.main:command",
    },
    "run": {
        "book": "quotewatch.services.book.main:command",
        "dashboard": "quotewatch.services.dashboard.main:command",
        "inference": "quotewatch.services.inference.main:command",
        "ingest": "quotewatch.services.ingest.main:command",
        "labeler": "quotewatch.services.labeler.main:command",
        "lake-sink": "quotewatch.services.lake_sink.main:command",
    },
    "feed": {
        "serve": "quotewatch.services.feed_server.main:command",
    },
    "lake": {
        "info": "quotewatch.services.lake_sink.main:info_command",
    },
    "capture": {
        "export": "quotewatch.services.replay.export:command",
    },
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def __init__(self, *args: Any, lazy_path: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = LAZY_COMMANDS.setdefault(lazy_path, {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attribute = self._lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self._lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


class QuoteWatchCLI(LazyGroup):
    """Turns QuoteWatch's own errors into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QuoteWatchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=QuoteWatchCLI, lazy_path="")
@click.version_option(package_name="quotewatch")
def main() -> None:
    """QuoteWatch: real-time market-microstructure ML on the Coinbase level-2 order book."""
    if not logging.getLogger("quotewatch").handlers:
        from quotewatch.core.logging import configure_logging

        configure_logging("cli", "INFO")


# -- broker -------------------------------------------------------------------------------------

_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Broker state directory (default: the per-user state directory).",
)


@main.group()
def broker() -> None:
    """A local Apache Kafka 4.x broker (or a cluster of them) in KRaft mode (no Docker needed)."""


@broker.command("start")
@click.option(
    "--port", type=int, default=9092, show_default=True, help="Kafka listener port on 127.0.0.1 (a cluster: the first)."
)
@click.option(
    "--brokers",
    type=click.IntRange(1, 5),
    default=1,
    show_default=True,
    help="Brokers on this box, on --port, --port+1, ...; from 3 up topics get 3 replicas, min.insync.replicas 2.",
)
@_DATA_DIR
@click.option("--timeout", type=float, default=90.0, show_default=True, help="Seconds to wait for the broker(s).")
def broker_start(port: int, brokers: int, data_dir: Path | None, timeout: float) -> None:
    """Start the broker (resolving its jars and formatting storage on first use)."""
    from quotewatch.core.errors import BrokerError
    from quotewatch.local.cluster import LocalKafkaCluster
    from quotewatch.local.kafka import LocalKafka, default_data_dir

    directory = data_dir or default_data_dir()
    is_cluster = LocalKafkaCluster.holds_cluster(directory)
    if brokers > 1 or is_cluster:
        if not is_cluster and (directory / "broker.json").exists():
            raise BrokerError(f"{directory} holds a single broker: give a cluster its own --data-dir")
        cluster = LocalKafkaCluster(directory) if is_cluster else LocalKafkaCluster(directory, brokers)
        existing = cluster.status()
        if existing is not None and len(existing.nodes) != brokers:
            raise BrokerError(f"{directory} holds a cluster of {len(existing.nodes)} brokers, not {brokers}")
        state = cluster.start([port + i for i in range(brokers)] if existing is None else None, timeout=timeout * 2)
        pids = ", ".join(str(node.pid) for node in state.nodes)
        click.echo(f"cluster of {brokers} running: pids {pids}, bootstrap {state.bootstrap_servers}, data {directory}")
        return
    single = LocalKafka(data_dir).start(port=port, timeout=timeout)
    click.echo(f"broker running: pid {single.pid}, bootstrap {single.bootstrap_servers}, data {single.data_dir}")


@broker.command("stop")
@_DATA_DIR
def broker_stop(data_dir: Path | None) -> None:
    """Stop the broker (every broker of a cluster) by its recorded PID and wait for it to exit."""
    from quotewatch.local.cluster import LocalKafkaCluster
    from quotewatch.local.kafka import LocalKafka, default_data_dir

    directory = data_dir or default_data_dir()
    local = LocalKafkaCluster(directory) if LocalKafkaCluster.holds_cluster(directory) else LocalKafka(directory)
    click.echo("broker stopped" if local.stop() else f"no broker running from {local.data_dir}")


@broker.command("status")
@_DATA_DIR
def broker_status(data_dir: Path | None) -> None:
    """Print whether the broker (each broker of a cluster) runs, its PID and address; exit 1 if one does not."""
    from quotewatch.local.cluster import LocalKafkaCluster
    from quotewatch.local.kafka import LocalKafka, default_data_dir

    directory = data_dir or default_data_dir()
    if LocalKafkaCluster.holds_cluster(directory):
        cluster = LocalKafkaCluster(directory).status()
        assert cluster is not None
        for node in cluster.nodes:
            what = f"running: pid {node.pid}" if node.running else "not running"
            click.echo(f"broker {node.node_id}: {what}, bootstrap {node.bootstrap_servers}")
        click.echo(f"cluster bootstrap {cluster.bootstrap_servers}, data {cluster.data_dir}")
        if not cluster.running:
            sys.exit(1)
        return
    local = LocalKafka(directory)
    state = local.status()
    if state is None or not state.running:
        click.echo(f"not running (data dir {local.data_dir})")
        sys.exit(1)
    click.echo(f"running: pid {state.pid}, bootstrap {state.bootstrap_servers}, data {state.data_dir}")


# -- topics -------------------------------------------------------------------------------------


@main.group()
def topics() -> None:
    """The topic catalog on the broker at KAFKA_BOOTSTRAP_SERVERS."""


@topics.command("create")
def topics_create() -> None:
    """Create every catalog topic under TOPIC_PREFIX and apply its configs (idempotent)."""
    from quotewatch.core.config import CommonSettings, load_settings
    from quotewatch.core.kafka import ensure_topics, make_admin

    settings = load_settings(CommonSettings)
    created = ensure_topics(make_admin(settings), settings.topic_prefix)
    click.echo(f"created {len(created)} topics" + (f": {', '.join(created)}" if created else " (all existed)"))


@topics.command("list")
@click.option("--all", "show_all", is_flag=True, help="Every topic, not only those under TOPIC_PREFIX.")
def topics_list(show_all: bool) -> None:
    """Print each topic's name, partition count and cleanup policy."""
    from quotewatch.core.config import CommonSettings, load_settings
    from quotewatch.core.kafka import describe_topics, make_admin

    settings = load_settings(CommonSettings)
    admin = make_admin(settings)
    infos = describe_topics(admin)
    if not show_all:
        infos = [info for info in infos if info.name.startswith(settings.topic_prefix + ".")]
    width = max((len(info.name) for info in infos), default=5)
    click.echo(f"{'TOPIC':<{width}}  PARTITIONS  CLEANUP")
    for info in infos:
        click.echo(f"{info.name:<{width}}  {info.partitions:>10}  {info.cleanup_policy}")


@topics.command("tail")
@click.argument("topic")
@click.option("--from-beginning", is_flag=True, help="Start at the first retained record.")
@click.option(
    "-n",
    "count",
    type=int,
    default=None,
    help="Stop after N records (without --from-beginning: start N records before the end, default 10).",
)
@click.option("--follow", is_flag=True, help="Keep waiting for new records instead of exiting when caught up.")
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Give up waiting for the broker after this.",
)
def topics_tail(topic: str, from_beginning: bool, count: int | None, follow: bool, timeout: float) -> None:
    """Print decoded records of TOPIC (full name), one JSON object per line."""
    from quotewatch.core.config import CommonSettings, load_settings
    from quotewatch.core.tail import tail_topic

    settings = load_settings(CommonSettings)
    for record in tail_topic(
        settings, topic, from_beginning=from_beginning, count=count, follow=follow, timeout=timeout
    ):
        click.echo(record)


# -- config and schemas --------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Effective settings."""


@config.command("show")
@click.argument("service")
def config_show(service: str) -> None:
    """Print the effective settings of SERVICE (secrets masked) as JSON."""
    from quotewatch.core.config import SERVICE_SETTINGS, load_settings

    key = service.replace("-", "_")
    if key not in SERVICE_SETTINGS:
        raise click.BadParameter(f"unknown service {service!r}; one of {', '.join(sorted(SERVICE_SETTINGS))}")
    click.echo(json.dumps(load_settings(SERVICE_SETTINGS[key]).masked(), indent=2, sort_keys=True))


@main.group()
def schemas() -> None:
    """The Avro contracts in schemas/."""


@schemas.command("list")
def schemas_list() -> None:
    """Print every schema with its version and CRC-64-AVRO fingerprint."""
    from quotewatch.core.schemas import default_store

    store = default_store()
    for name in store.names():
        current = store.current(name)
        version = f"v{current.version}" if current.version else "uncommitted"
        click.echo(f"{name:<28} {version:<12} {current.fingerprint:016x}")


@schemas.command("commit")
def schemas_commit() -> None:
    """Record changed topic value schemas as new versions under schemas/history/."""
    from quotewatch.core.schemas import SchemaStore

    written = SchemaStore(Path(__file__).resolve().parents[2] / "schemas").commit()
    click.echo("\n".join(str(path) for path in written) or "every schema is committed")


@schemas.command("codegen")
@click.option("--check", is_flag=True, help="Exit 1 if src/quotewatch/core/records.py is stale; write nothing.")
def schemas_codegen(check: bool) -> None:
    """Generate the typed record classes (src/quotewatch/core/records.py) from schemas/."""
    from quotewatch.core import codegen

    repo = Path(__file__).resolve().parents[2]
    path, schema_dir = codegen.records_module_path(), repo / "schemas"
    fresh = codegen.generate(schema_dir)
    if path.exists() and path.read_text() == fresh:
        click.echo(f"{path} is current")
        return
    if check:
        raise click.ClickException(f"{path} differs from the schemas: run `quotewatch schemas codegen`")
    path.write_text(fresh)
    click.echo(f"wrote {path}")


@main.group(cls=LazyGroup, lazy_path="run")
def run() -> None:
    """Run one service in the foreground (configured by environment variables)."""


@main.group(cls=LazyGroup, lazy_path="feed")
def feed() -> None:
    """The local Coinbase-protocol feed server."""


@main.group(cls=LazyGroup, lazy_path="lake")
def lake() -> None:
    """The Parquet lake."""


@main.group(cls=LazyGroup, lazy_path="capture")
def capture() -> None:
    """Capture files (one WebSocket frame a line + a receive-time sidecar)."""


if __name__ == "__main__":
    main()
