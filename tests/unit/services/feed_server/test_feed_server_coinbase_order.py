"""The feed server in Coinbase's order (ack after the snapshots), slow snapshots, odd control frames, CDP JWTs."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import connect

from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.domain.venue.coinbase_auth import cdp_websocket_jwt
from quotewatch.domain.venue.coinbase_feeds import subscribe_messages
from quotewatch.services.feed_server.server import CaptureSource, FaultPlan, FeedServer, FeedServerError
from tests.helpers import shared_data_dir
from tests.unit.services.feed_server.test_feed_server import SYMBOLS, collect, run, synthetic

KEY_NAME = "organizations/test-org/apiKeys/test-key"


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_advanced_acknowledges_level2_after_every_snapshot_and_heartbeats_at_once() -> None:
    async def client(url: str) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            for message in subscribe_messages("coinbase-advanced", list(SYMBOLS)):
                await ws.send(json.dumps(message))
            return await collect(ws, seconds=1.0)

    frames = run(synthetic("advanced"), client)
    acks = [i for i, f in enumerate(frames) if f["channel"] == "subscriptions"]
    snapshots = {
        e["product_id"]: i
        for i, f in enumerate(frames)
        if f["channel"] == "l2_data"
        for e in f["events"]
        if e["type"] == "snapshot"
    }
    assert set(snapshots) == set(SYMBOLS)
    first_ack = frames[acks[0]]["events"][0]["subscriptions"]
    assert first_ack == {"level2": list(SYMBOLS)}
    assert acks[0] > max(snapshots.values())  # confirmed after both snapshots
    later = [frames[i]["events"][0]["subscriptions"] for i in acks[1:]]
    assert later[-1] == {"level2": list(SYMBOLS), "heartbeats": ["heartbeats"], "market_trades": list(SYMBOLS)}


def test_a_capture_replay_acknowledges_level2_after_the_captures_snapshots() -> None:
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith("advanced_trade"))
    capture = read_capture(path)

    async def client(url: str) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": list(SYMBOLS), "channel": "level2"}))
            return await collect(ws, seconds=2.0)

    frames = run(FeedServer("advanced", CaptureSource(capture, speed=None)), client)
    (ack,) = [i for i, f in enumerate(frames) if f["channel"] == "subscriptions"]
    snapshot_at = [
        i for i, f in enumerate(frames) if f["channel"] == "l2_data" and f["events"][0]["type"] == "snapshot"
    ]
    assert len(snapshot_at) == 2
    assert ack == max(snapshot_at) + 1  # right after the last snapshot, as in the capture's own order
    assert frames[ack]["events"][0]["subscriptions"] == {"level2": list(SYMBOLS)}


def test_slow_snapshots_arrive_in_fragments_never_silent_for_long() -> None:
    plan = FaultPlan(snapshot_fragment_ms=50, snapshot_fragment_bytes=2048, connections=0)

    async def client(url: str) -> tuple[list[Any], float]:
        started = time.monotonic()
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channel": "level2"}))
            frames = await collect(ws, count=2, seconds=10.0)
            return frames, time.monotonic() - started

    server = synthetic("advanced", plan)
    (snapshot, ack), elapsed = run(server, client)
    assert snapshot["events"][0]["type"] == "snapshot"  # reassembled whole by the client
    size = len(json.dumps(snapshot))
    assert size > 10 * 2048
    assert elapsed > (size // 2048 - 1) * 0.05 * 0.8  # the fragments were paced
    assert ack["channel"] == "subscriptions"
    assert server.connections[0].fragmented_snapshots == 1


def test_odd_control_frames_have_an_empty_timestamp_and_an_undocumented_field() -> None:
    async def client(url: str) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            for message in subscribe_messages("coinbase-advanced", ["BTC-USD"]):
                await ws.send(json.dumps(message))
            return await collect(ws, seconds=0.8)

    frames = run(synthetic("advanced", FaultPlan(odd_control_frames=True, connections=0)), client)
    acks = [f for f in frames if f["channel"] == "subscriptions"]
    heartbeats = [f for f in frames if f["channel"] == "heartbeats"]
    assert acks
    assert heartbeats
    assert all(f["timestamp"] == "" and "x_undocumented" in f for f in acks)
    assert all(f["timestamp"] != "" and "x_undocumented" in f for f in heartbeats)
    assert all("x_undocumented" not in f for f in frames if f["channel"] == "l2_data")


def test_require_jwt_accepts_a_valid_token_and_refuses_a_wrong_key_or_none() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    wrong = ec.generate_private_key(ec.SECP256R1())

    def token(signer: ec.EllipticCurvePrivateKey) -> str:
        return cdp_websocket_jwt(KEY_NAME, signer, now_seconds=int(time.time()), nonce=secrets.token_hex(16))

    async def attempt(url: str, signer: ec.EllipticCurvePrivateKey | None) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            message: dict[str, Any] = {"type": "subscribe", "product_ids": ["BTC-USD"], "channel": "level2"}
            if signer is not None:
                message["jwt"] = token(signer)
            await ws.send(json.dumps(message))
            return await collect(ws, count=2, seconds=1.0)

    async def client(url: str) -> list[list[Any]]:
        return [await attempt(url, signer) for signer in (key, wrong, None)]

    server = synthetic("advanced", cdp_public_key=public_pem(key))
    good, bad, missing = run(server, client)
    assert [f["channel"] for f in good] == ["l2_data", "subscriptions"]
    assert bad[0]["type"] == "error"
    assert "authentication failed: invalid jwt: Signature verification failed" in bad[0]["message"]
    assert "authentication failed: no jwt" in missing[0]["message"]
    assert [c.authenticated for c in server.connections] == [1, 0, 0]
    assert [len(c.auth_failures) for c in server.connections] == [0, 1, 1]


def test_require_jwt_is_advanced_only() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(FeedServerError, match="--require-jwt needs --protocol advanced"):
        synthetic("exchange", cdp_public_key=public_pem(key))


def test_the_feed_server_resends_a_snapshot_on_a_book_resubscription() -> None:
    """A per-product resync: unsubscribe + subscribe level2 on the same connection gives a fresh snapshot."""

    async def client(url: str) -> list[Any]:
        async with connect(url, max_size=2**26, close_timeout=0.2) as ws:
            await ws.send(json.dumps({"type": "subscribe", "product_ids": list(SYMBOLS), "channel": "level2"}))
            await collect(ws, seconds=0.3)
            for kind in ("unsubscribe", "subscribe"):
                await ws.send(json.dumps({"type": kind, "product_ids": ["ETH-USD"], "channel": "level2"}))
            await asyncio.sleep(0)
            return await collect(ws, seconds=0.5)

    frames = run(synthetic("advanced"), client)
    snapshots = [
        e["product_id"] for f in frames if f["channel"] == "l2_data" for e in f["events"] if e["type"] == "snapshot"
    ]
    assert snapshots == ["ETH-USD"]
    acks = [f["events"][0]["subscriptions"] for f in frames if f["channel"] == "subscriptions"]
    assert acks[-1] == {"level2": ["BTC-USD", "ETH-USD"]}
