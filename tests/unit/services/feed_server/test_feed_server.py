"""The feed server over real sockets: subscribe semantics of both protocols and each fault."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from quotewatch.domain.simulation.synthetic import SyntheticConfig
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.domain.venue.coinbase import parse_time_ns
from quotewatch.domain.venue.coinbase_auth import ExchangeCredentials
from quotewatch.domain.venue.coinbase_feeds import subscribe_messages
from quotewatch.services.feed_server.server import (
    CaptureSource,
    FaultPlan,
    FeedServer,
    FeedServerError,
    SyntheticSource,
    parse_speed,
)
from tests.helpers import shared_data_dir

SYMBOLS = ("BTC-USD", "ETH-USD")


def synthetic(protocol: str, faults: FaultPlan | None = None, **options: Any) -> FeedServer:
    return FeedServer(
        protocol,  # type: ignore[arg-type]  # advanced|exchange
        SyntheticSource(SyntheticConfig(symbols=SYMBOLS, seed=3, rate=2000.0)),
        faults=faults,
        heartbeat_interval=0.2,
        **options,
    )


def run(server: FeedServer, client: Callable[[str], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        await server.start()
        try:
            return await client(server.url)
        finally:
            await server.stop()

    return asyncio.run(main())


async def collect(ws: ClientConnection, count: int | None = None, seconds: float = 2.0) -> list[Any]:
    """Frames (decoded when JSON, else the text) until ``count`` frames, ``seconds`` or the close."""
    frames: list[Any] = []
    deadline = time.monotonic() + seconds
    while (count is None or len(frames) < count) and time.monotonic() < deadline:
        try:
            text = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        except (TimeoutError, ConnectionClosed):
            break
        try:
            frames.append(json.loads(text))
        except ValueError:
            frames.append(text)
    return frames


async def subscribed(url: str, protocol: str, **kwargs: Any) -> ClientConnection:
    ws = await connect(url, max_size=2**26, close_timeout=0.2)
    for message in subscribe_messages(f"coinbase-{protocol}", list(SYMBOLS), **kwargs):
        await ws.send(json.dumps(message))
    return ws


def test_advanced_sends_only_subscribed_channels_and_products_snapshot_first() -> None:
    async def client(url: str) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": ["ETH-USD"], "channel": "level2"}))
            return await collect(ws, seconds=1.0)

    frames = run(synthetic("advanced"), client)
    assert [f["sequence_num"] for f in frames] == list(range(len(frames)))
    # Coinbase's order on Advanced Trade: the snapshot, then the subscription's acknowledgement.
    assert frames[0]["channel"] == "l2_data"
    assert frames[0]["events"][0]["type"] == "snapshot"
    assert len(frames[0]["events"][0]["updates"]) > 300  # a deep book
    assert frames[1]["channel"] == "subscriptions"
    assert frames[1]["events"][0]["subscriptions"] == {"level2": ["ETH-USD"]}
    rest = frames[2:]
    assert len(rest) > 5
    assert {f["channel"] for f in rest} == {"l2_data"}  # no trades, no heartbeats: not subscribed
    assert {e["product_id"] for f in rest for e in f["events"]} == {"ETH-USD"}
    assert {e["type"] for f in rest for e in f["events"]} == {"update"}


def test_advanced_takes_one_channel_per_subscribe_message() -> None:
    async def client(url: str) -> list[Any]:
        async with connect(url, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["level2"]}))
            return await collect(ws, count=1)

    (error,) = run(synthetic("advanced"), client)
    assert error["type"] == "error"
    assert "one channel per subscribe message" in error["message"]


def test_a_connection_without_a_subscribe_is_closed_after_the_timeout() -> None:
    async def client(url: str) -> tuple[float, int | None]:
        started = time.monotonic()
        async with connect(url, close_timeout=0.2) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            return time.monotonic() - started, info.value.rcvd.code if info.value.rcvd else None

    elapsed, code = run(synthetic("advanced", subscribe_timeout=0.5), client)
    assert 0.4 < elapsed < 3.0
    assert code == 1008


def test_exchange_heartbeats_matches_and_level2_batch() -> None:
    async def client(url: str) -> list[Any]:
        async with await subscribed(url, "exchange") as ws:
            return await collect(ws, seconds=1.0)

    frames = run(synthetic("exchange"), client)
    assert frames[0] == {
        "type": "subscriptions",
        "channels": [
            {"name": "level2_batch", "product_ids": list(SYMBOLS)},
            {"name": "matches", "product_ids": list(SYMBOLS)},
            {"name": "heartbeat", "product_ids": list(SYMBOLS)},
        ],
    }
    assert [f["type"] for f in frames[1:3]] == ["snapshot", "snapshot"]
    kinds = {f["type"] for f in frames[3:]}
    assert kinds == {"l2update", "match", "heartbeat"}


def test_exchange_level2_needs_a_valid_signature() -> None:
    secret = base64.b64encode(b"the exchange secret").decode()

    async def client(url: str) -> list[list[Any]]:
        out = []
        for credentials in (
            ExchangeCredentials("key", base64.b64encode(b"another secret").decode(), "pass"),
            ExchangeCredentials("key", secret, "pass"),
        ):
            async with await subscribed(
                url, "exchange", credentials=credentials, timestamp=str(int(time.time()))
            ) as ws:
                out.append(await collect(ws, count=2, seconds=1.0))
        async with connect(url, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["level2"]}))
            out.append(await collect(ws, count=1))
        return out

    wrong, right, unsigned = run(synthetic("exchange", exchange_api_secret=secret), client)
    assert wrong[0]["type"] == "error"
    assert wrong[0]["reason"] == "invalid signature"
    assert right[0]["channels"][0] == {"name": "level2", "product_ids": list(SYMBOLS)}
    assert right[1]["type"] == "snapshot"
    assert "requires authentication" in unsigned[0]["reason"]


def test_unknown_products_are_refused() -> None:
    async def client(url: str) -> list[Any]:
        async with connect(url, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": ["DOGE-USD"], "channel": "level2"}))
            return await collect(ws, count=1)

    (error,) = run(synthetic("advanced"), client)
    assert "unknown product ids ['DOGE-USD']" in error["message"]


def test_drop_after_n_frames_aborts_the_connection() -> None:
    async def client(url: str) -> tuple[list[Any], bool]:
        ws = await subscribed(url, "advanced")
        frames = await collect(ws, seconds=3.0)
        closed_abnormally = ws.close_code == 1006
        await ws.close()
        return frames, closed_abnormally

    frames, abnormal = run(synthetic("advanced", FaultPlan(drop_after=25)), client)
    assert len(frames) == 25
    assert abnormal


def test_skip_sequence_drops_one_book_update() -> None:
    async def client(url: str) -> list[Any]:
        async with await subscribed(url, "advanced") as ws:
            return await collect(ws, count=60)

    frames = run(synthetic("advanced", FaultPlan(skip_sequence_after=20)), client)
    sequences = [f["sequence_num"] for f in frames]
    jumps = [(a, b) for a, b in itertools.pairwise(sequences) if b != a + 1]
    assert len(jumps) == 1
    assert jumps[0][1] == jumps[0][0] + 2


def test_malformed_replaces_one_book_update_with_a_truncated_frame() -> None:
    async def client(url: str) -> list[Any]:
        async with await subscribed(url, "exchange") as ws:
            return await collect(ws, count=60)

    frames = run(synthetic("exchange", FaultPlan(malformed_after=10)), client)
    broken = [(i, f) for i, f in enumerate(frames) if isinstance(f, str)]
    assert len(broken) == 1
    index, text = broken[0]
    assert index >= 10
    assert text.startswith('{"type":"l2update"')


def test_silent_after_n_frames_sends_nothing_more_but_keeps_the_socket_open() -> None:
    async def client(url: str) -> tuple[list[Any], bool]:
        async with await subscribed(url, "exchange") as ws:
            frames = await collect(ws, seconds=1.5)
            return frames, ws.close_code is None

    frames, still_open = run(synthetic("exchange", FaultPlan(silent_after=15)), client)
    assert len(frames) == 15
    assert still_open


def test_delay_holds_frames_back() -> None:
    async def client(url: str) -> list[float]:
        async with await subscribed(url, "advanced") as ws:
            arrivals = []
            for _ in range(12):
                await ws.recv()
                arrivals.append(time.monotonic())
            return arrivals

    arrivals = run(synthetic("advanced", FaultPlan(delay_after=8, delay_ms=400, delay_frames=2)), client)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(g >= 0.35 for g in gaps) == 2


def test_faults_hit_only_the_first_connections() -> None:
    async def client(url: str) -> list[int]:
        counts = []
        for _ in range(2):
            ws = await subscribed(url, "advanced")
            counts.append(len(await collect(ws, seconds=0.8)))
            await ws.close()
        return counts

    first, second = run(synthetic("advanced", FaultPlan(drop_after=5, connections=1)), client)
    assert first == 5
    assert second > 5


def test_capture_replay_renumbers_sequences_and_filters_products() -> None:
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith("advanced_trade"))
    capture = read_capture(path)

    async def client(url: str) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": ["ETH-USD"], "channel": "level2"}))
            frames = await collect(ws, seconds=1.5)
            return frames

    frames = run(FeedServer("advanced", CaptureSource(capture, speed=None)), client)
    assert [f["sequence_num"] for f in frames] == list(range(len(frames)))
    book = [f for f in frames if f["channel"] == "l2_data"]
    assert {e["product_id"] for f in book for e in f["events"]} == {"ETH-USD"}
    eth_in_capture = sum(1 for line in capture.lines if '"l2_data"' in line and '"product_id":"ETH-USD"' in line)
    assert len(book) == eth_in_capture


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(FeedServerError, match="skip-sequence needs --protocol advanced"):
        synthetic("exchange", FaultPlan(skip_sequence_after=3))
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith("advanced_trade"))
    with pytest.raises(FeedServerError, match="serve it with the matching --protocol"):
        FeedServer("exchange", CaptureSource(read_capture(path), None))
    assert parse_speed("max") is None
    assert parse_speed("1x") == 1.0
    assert parse_speed("20x") == 20.0
    with pytest.raises(FeedServerError):
        parse_speed("fast")


def _exchange_times(frame: Any) -> list[int]:
    """Every exchange time in a frame (envelope, updates, trades), as ns."""
    found: list[int] = []
    if isinstance(frame, dict):
        for key, value in frame.items():
            if key in ("timestamp", "time", "event_time") and isinstance(value, str):
                found.append(parse_time_ns(value))
            else:
                found.extend(_exchange_times(value))
    elif isinstance(frame, list):
        for item in frame:
            found.extend(_exchange_times(item))
    return found


@pytest.mark.parametrize("protocol", ["advanced", "exchange"])
def test_capture_timestamps_are_the_recorded_ones_by_default_and_move_to_now_on_request(protocol: str) -> None:
    prefix = "advanced_trade" if protocol == "advanced" else "exchange_level2_BTC-USD_2018"
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith(prefix))
    capture = read_capture(path)
    products = list(capture.symbols)

    async def client(url: str) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            for message in subscribe_messages(f"coinbase-{protocol}", products):
                await ws.send(json.dumps(message))
            return await collect(ws, count=400, seconds=120.0)  # count-bound: both runs see the same 400 frames

    original = run(FeedServer(protocol, CaptureSource(capture, speed=None)), client)  # type: ignore[arg-type]
    before = time.time_ns()
    moved = run(FeedServer(protocol, CaptureSource(capture, None, "now")), client)  # type: ignore[arg-type]
    after = time.time_ns()
    recorded = [t for line in capture.lines[:2000] for t in _exchange_times(json.loads(line))]
    original_times = [t for f in original for t in _exchange_times(f) if not _server_own(f)]
    assert original_times
    assert set(original_times) <= set(recorded), "served as recorded"
    moved_times = [t for f in moved for t in _exchange_times(f) if not _server_own(f)]
    assert len(moved_times) == len(original_times)
    shifts = {m - o for m, o in zip(moved_times, original_times, strict=True)}
    assert len(shifts) == 1, "one offset per connection: the spacing is unchanged"
    shift = shifts.pop()
    assert shift % 1_000_000 == 0
    first = next(min(ts) for line in capture.lines if (ts := _exchange_times(json.loads(line))))
    assert before - 1_000_000 <= first + shift <= after, "the connection's replay starts now"
    # Besides the times, every message is unchanged (precision of each time included).
    for o, m in zip(original, moved, strict=True):
        if not _server_own(o):
            assert _without_times(o) == _without_times(m)
            assert _time_texts_lengths(o) == _time_texts_lengths(m)


def _server_own(frame: Any) -> bool:
    """Frames the server makes itself (subscriptions, heartbeats), not the capture's."""
    return isinstance(frame, dict) and (
        frame.get("channel") in ("subscriptions", "heartbeats") or frame.get("type") in ("subscriptions", "heartbeat")
    )


def _without_times(frame: Any) -> Any:
    if isinstance(frame, dict):
        return {
            k: (None if k in ("timestamp", "time", "event_time") else _without_times(v))
            for k, v in frame.items()
            if k != "sequence_num"
        }
    if isinstance(frame, list):
        return [_without_times(v) for v in frame]
    return frame


def _time_texts_lengths(frame: Any) -> list[int]:
    if isinstance(frame, dict):
        return [
            n
            for k, v in frame.items()
            for n in (
                [len(v)] if k in ("timestamp", "time", "event_time") and isinstance(v, str) else _time_texts_lengths(v)
            )
        ]
    if isinstance(frame, list):
        return [n for v in frame for n in _time_texts_lengths(v)]
    return []


def test_an_unknown_timestamps_mode_is_a_clear_error() -> None:
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith("advanced_trade"))
    with pytest.raises(FeedServerError, match="--timestamps must be one of original, now"):
        CaptureSource(read_capture(path), None, "later")  # type: ignore[arg-type]  # the point of the test
