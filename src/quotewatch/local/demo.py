"""``quotewatch demo`` (``make demo``): the command line of :class:`~quotewatch.local.stack.LocalStack`."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from quotewatch.core.kafka import ShutdownSignal
from quotewatch.domain.venue.captures import CaptureError, read_capture
from quotewatch.local.stack import HOST, STREAM_SERVICES, FeedMode, LocalStack, StackConfig


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on right now (held open together while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@click.command("demo")
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("data/demo"),
    show_default=True,
    help="State of this stack: broker data, MLflow store, lake, logs/, stack.json.",
)
@click.option(
    "--feed",
    "feed",
    type=click.Choice(["synthetic", "capture", "live"]),
    default=None,
    help="synthetic book from the local feed server (default), a --capture replay, or live Coinbase.",
)
@click.option(
    "--capture",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="A recorded capture for the local feed server to replay (implies --feed capture).",
)
@click.option(
    "--timestamps",
    type=click.Choice(["original", "now"]),
    default="original",
    show_default=True,
    help="With --capture: its exchange times as recorded, or moved so each connection starts now.",
)
@click.option(
    "--symbols",
    default=None,
    help="Comma-separated products [default: BTC-USD,ETH-USD; with --capture, the capture's].",
)
@click.option("--topic-prefix", default="qw", show_default=True, help="Topic namespace.")
@click.option(
    "--bootstrap-servers",
    default=None,
    help="Use this running Kafka-compatible broker instead of starting the local one.",
)
@click.option("--kafka-port", type=int, default=9092, show_default=True)
@click.option("--mlflow-port", type=int, default=5000, show_default=True)
@click.option("--feed-port", type=int, default=8765, show_default=True)
@click.option("--dash-port", type=int, default=8050, show_default=True)
@click.option("--webhook-port", type=int, default=8091, show_default=True, help="Inference's MLflow webhook receiver.")
@click.option(
    "--metrics-port-base",
    type=int,
    default=9101,
    show_default=True,
    help="/metrics + /health of ingest, book, labeler, inference, lake-sink on BASE..BASE+4.",
)
@click.option(
    "--free-ports", "pick_free_ports", is_flag=True, help="Pick free ports for everything instead (printed at start)."
)
@click.option(
    "--bootstrap-interval",
    type=float,
    default=45.0,
    show_default=True,
    help="Seconds between attempts to train a first champion while there is none.",
)
@click.option(
    "--bootstrap-model",
    type=click.Choice(["lr", "xgb", "best"]),
    default="lr",
    show_default=True,
    help="What the first champion is trained as (quotewatch train --model).",
)
def command(
    run_dir: Path,
    feed: str | None,
    capture: Path | None,
    timestamps: str,
    symbols: str | None,
    topic_prefix: str,
    bootstrap_servers: str | None,
    kafka_port: int,
    mlflow_port: int,
    feed_port: int,
    dash_port: int,
    webhook_port: int,
    metrics_port_base: int,
    pick_free_ports: bool,
    bootstrap_interval: float,
    bootstrap_model: str,
) -> None:
    """The whole system on 127.0.0.1 without Docker, until Ctrl-C: Kafka, MLflow, the feed, every
    service and the dashboard (http://127.0.0.1:8050); a first model is trained and promoted once
    the lake has data. Logs: RUN_DIR/logs/<process>.log.
    """
    mode: FeedMode = "capture" if capture is not None else (feed or "synthetic")  # type: ignore[assignment]
    if mode == "capture" and capture is None:
        raise click.BadParameter("--feed capture needs --capture FILE", param_hint="--capture")
    metrics_ports = {name: metrics_port_base + index for index, name in enumerate(STREAM_SERVICES)}
    if pick_free_ports:
        kafka_port, mlflow_port, feed_port, dash_port, webhook_port, *rest = free_ports(5 + len(STREAM_SERVICES))
        metrics_ports = dict(zip(STREAM_SERVICES, rest, strict=True))
    capture_feed = "coinbase-advanced"
    products: tuple[str, ...] = ("BTC-USD", "ETH-USD")
    if capture is not None:
        try:
            recorded = read_capture(capture)
        except CaptureError as exc:
            raise click.BadParameter(str(exc), param_hint="--capture") from exc
        capture_feed, products = recorded.feed, recorded.symbols
    if symbols is not None:
        products = tuple(part.strip().upper() for part in symbols.split(",") if part.strip())
    config = StackConfig(
        run_dir=run_dir,
        feed=mode,
        capture=capture,
        capture_timestamps=timestamps,  # type: ignore[arg-type]  # click.Choice guarantees the literal
        capture_feed=capture_feed,
        symbols=products,
        topic_prefix=topic_prefix,
        bootstrap_servers=bootstrap_servers,
        kafka_port=kafka_port,
        mlflow_port=mlflow_port,
        feed_port=feed_port,
        dash_port=dash_port,
        webhook_port=webhook_port,
        metrics_ports=metrics_ports,
        bootstrap_interval=bootstrap_interval,
        bootstrap_model=bootstrap_model,  # type: ignore[arg-type]  # click.Choice guarantees the literal
    )
    shutdown = ShutdownSignal().install()
    click.echo(f"QuoteWatch demo: dashboard {config.dashboard_url}, MLflow {config.mlflow_url}, state {run_dir}")
    sys.exit(LocalStack(config, shutdown).run())
