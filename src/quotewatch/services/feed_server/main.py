"""``quotewatch feed serve``: the local Coinbase-protocol feed server from the command line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import click

from quotewatch.core.errors import ConfigError
from quotewatch.core.logging import configure_logging
from quotewatch.domain.simulation.synthetic import SyntheticConfig
from quotewatch.services.feed_server.server import (
    CaptureSource,
    FaultPlan,
    FeedServer,
    FeedServerError,
    SyntheticSource,
    capture_source,
)

logger = logging.getLogger(__name__)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", type=int, default=8765, show_default=True, help="Port (0 = any free port; printed).")
@click.option("--protocol", type=click.Choice(["advanced", "exchange"]), default="advanced", show_default=True)
@click.option("--capture", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Replay this capture.")
@click.option("--speed", default="1x", show_default=True, help="Capture pace: max, 1x or Nx.")
@click.option(
    "--timestamps",
    type=click.Choice(["original", "now"]),
    default="original",
    show_default=True,
    help="Capture exchange times: as recorded, or moved so each connection starts now.",
)
@click.option("--synthetic", is_flag=True, help="Serve the deterministic synthetic market.")
@click.option("--symbols", default="BTC-USD,ETH-USD", show_default=True, help="Synthetic products (comma-separated).")
@click.option("--seed", type=int, default=1, show_default=True, help="Synthetic market seed.")
@click.option("--rate", type=float, default=200.0, show_default=True, help="Synthetic level updates/s per symbol.")
@click.option("--max-updates", type=int, default=None, help="Synthetic: stop the market after N level updates.")
@click.option(
    "--subscribe-timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for a subscribe."
)
@click.option("--drop-after", type=int, default=None, help="Fault: abort the TCP connection after N frames.")
@click.option("--silent-after", type=int, default=None, help="Fault: send nothing more after N frames.")
@click.option(
    "--skip-sequence-after", type=int, default=None, help="Fault (advanced): drop one book update after N frames."
)
@click.option("--malformed-after", type=int, default=None, help="Fault: truncate one book update after N frames.")
@click.option("--delay-after", type=int, default=None, help="Fault: delay frames after N frames.")
@click.option("--delay-ms", type=int, default=0, show_default=True, help="Fault: delay of each delayed frame.")
@click.option("--delay-frames", type=int, default=1, show_default=True, help="Fault: how many frames to delay.")
@click.option(
    "--fault-connections", type=int, default=1, show_default=True, help="Faults hit the first N connections (0 = all)."
)
@click.option(
    "--bad-event-after", type=int, default=None, help="Fault (advanced): one bad product event after N frames."
)
@click.option(
    "--slow-snapshots-ms",
    type=int,
    default=0,
    show_default=True,
    help="Send snapshots in 4 KiB fragments, one every N ms.",
)
@click.option("--odd-control-frames", is_flag=True, help="Acks with an empty timestamp, undocumented fields.")
@click.option(
    "--require-jwt",
    "require_jwt",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Advanced: refuse subscribes without a valid CDP API key JWT (PEM public key file).",
)
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def command(
    host: str,
    port: int,
    protocol: str,
    capture: Path | None,
    speed: str,
    timestamps: str,
    synthetic: bool,
    symbols: str,
    seed: int,
    rate: float,
    max_updates: int | None,
    subscribe_timeout: float,
    drop_after: int | None,
    silent_after: int | None,
    skip_sequence_after: int | None,
    malformed_after: int | None,
    delay_after: int | None,
    delay_ms: int,
    delay_frames: int,
    fault_connections: int,
    bad_event_after: int | None,
    slow_snapshots_ms: int,
    odd_control_frames: bool,
    require_jwt: Path | None,
    log_level: str,
) -> None:
    """Serve Coinbase market data over WebSocket: a capture replay or the synthetic market.

    With COINBASE_API_SECRET set (base64), Exchange level2 subscribes must carry a valid signature.
    """
    configure_logging("feed-server", log_level)
    if synthetic == (capture is not None):
        raise ConfigError("give exactly one of --synthetic and --capture FILE")
    faults = FaultPlan(
        drop_after=drop_after,
        silent_after=silent_after,
        skip_sequence_after=skip_sequence_after,
        malformed_after=malformed_after,
        delay_after=delay_after,
        delay_ms=delay_ms,
        delay_frames=delay_frames,
        bad_event_after=bad_event_after,
        snapshot_fragment_ms=slow_snapshots_ms,
        odd_control_frames=odd_control_frames,
        connections=fault_connections,
    )
    try:
        if capture is not None:
            source: SyntheticSource | CaptureSource = capture_source(capture, speed, timestamps)
        else:
            products = tuple(s.strip().upper() for s in symbols.split(",") if s.strip())
            source = SyntheticSource(SyntheticConfig(symbols=products, seed=seed, rate=rate), max_updates=max_updates)
        server = FeedServer(
            protocol,  # type: ignore[arg-type]  # click.Choice guarantees advanced|exchange
            source,
            host=host,
            port=port,
            faults=faults,
            subscribe_timeout=subscribe_timeout,
            exchange_api_secret=os.environ.get("COINBASE_API_SECRET") or None,
            cdp_public_key=require_jwt.read_text() if require_jwt is not None else None,
        )
    except (FeedServerError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    asyncio.run(_serve(server))


async def _serve(server: FeedServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    click.echo(f"feed server listening on {server.url} ({server.protocol})", err=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
