"""Snapshot records shaped exactly like ``quotewatch.Snapshot`` for the dashboard's tests and benchmark.

The inference service that produces snapshots is built separately; these records are the input
contract (schemas/quotewatch.Snapshot.avsc), and every one of them is checked by encoding it with
the real serde in the unit tests. The ``quotewatch.MarketEvent`` records below are what the
dashboard's upstream probe reads on ``md.events`` while it has no snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from confluent_kafka import Producer

from quotewatch.core.records import MarketEvent, Snapshot
from quotewatch.core.serde import AvroSerde
from tests.records import typed

FEATURE_NAMES = ["spread_bps", "imbalance_l1", "imbalance_l3", "microprice_offset_bps", "mid_return_1s"]
T0_NS = 1_760_000_000_000_000_000


def level(price: str, size: str) -> dict[str, int]:
    """A BookLevel from decimal strings, exactly (``level("67234.51", "0.5")``)."""
    from quotewatch.core.units import parse_e8

    return {"price_e8": parse_e8(price), "size_e8": parse_e8(size)}


def make_snapshot(
    symbol: str = "BTC-USD",
    *,
    ts_event: int = T0_NS,
    bids: list[dict[str, int]] | None = None,
    asks: list[dict[str, int]] | None = None,
    p_change: float | None = 0.25,
    model: tuple[str, str, str] | None = ("lr-top3", "7", "CHAMPION"),
    challenger_p_change: float | None = None,
    live_metrics: list[dict[str, Any]] | None = None,
    feed_state: str = "SUBSCRIBED",
    updates_per_second: float = 10.0,
    consumer_lag: int = 0,
) -> Snapshot:
    """A complete Snapshot record; ``model=None`` is the state before inference loaded any model.

    Levels and live metrics are given as plain dicts (the Avro datum) and checked by the conversion.
    """
    if bids is None:
        bids = [level("67234.51", "0.5"), level("67234.50", "1.25"), level("67234.00", "2")]
    if asks is None:
        asks = [level("67234.52", "0.75"), level("67235.00", "3"), level("67236.10", "0.01")]
    name, version, role = model if model is not None else (None, None, None)
    if live_metrics is None:
        live_metrics = (
            [
                {
                    "model_name": name,
                    "model_version": version,
                    "model_role": role,
                    "n_labels": 1234,
                    "auc": 0.6512,
                    "brier": 0.1875,
                    "balanced_accuracy": 0.6021,
                    "base_rate": 0.31,
                }
            ]
            if model is not None
            else []
        )
    return typed(
        Snapshot,
        {
            "ts_event": ts_event,
            "ts_init": ts_event + 1_500_000,
            "exchange": "coinbase",
            "symbol": symbol,
            "bids": bids,
            "asks": asks,
            "feature_spec_id": "top3-v1",
            "feature_names": FEATURE_NAMES,
            "feature_values": [0.15, 0.2, -0.1, 0.05, 0.0],
            "p_change": p_change,
            "model_name": name,
            "model_version": version,
            "model_role": role,
            "challenger_p_change": challenger_p_change,
            "live_metrics": live_metrics,
            "feed_state": feed_state,
            "updates_per_second": updates_per_second,
            "consumer_lag": consumer_lag,
        },
    )


def produce_snapshots(
    producer: Producer,
    serde: AvroSerde,
    topic: str,
    records: Iterable[Snapshot],
    timestamp_ms: int | None = None,
) -> None:
    """Produce ``records`` keyed by symbol (as inference does); return once the broker acked them all.

    ``timestamp_ms`` sets the records' broker timestamp (CreateTime), e.g. to write a backlog
    that is already old.
    """
    for record in records:
        producer.produce(
            topic,
            key=record.symbol.encode(),
            value=serde.encode(topic, record),
            timestamp=timestamp_ms if timestamp_ms is not None else 0,  # 0: the producer's clock
        )
    remaining = producer.flush(10)
    assert remaining == 0, f"{remaining} snapshots were not delivered"


def history(symbol: str = "BTC-USD", points: int = 300, *, t0_ns: int = T0_NS, mid: float = 67234.5) -> list[Snapshot]:
    """``points`` snapshots 100 ms apart in event time, p_change and mid moving, for the sparklines."""
    import math

    records = []
    for i in range(points):
        centre = mid + 4 * math.sin(i / 23) + i * 0.01
        bid = f"{math.floor(centre * 100) / 100:.2f}"
        ask = f"{math.floor(centre * 100) / 100 + 0.01:.2f}"
        p = 0.5 + 0.35 * math.sin(i / 11) * math.cos(i / 37)
        records.append(
            make_snapshot(
                symbol,
                ts_event=t0_ns + i * 100_000_000,
                bids=[level(bid, "0.5")],
                asks=[level(ask, "0.25")],
                p_change=round(p, 4),
            )
        )
    return records


def market_event(kind: str, ts_event: int, symbol: str = "BTC-USD", **body: Any) -> MarketEvent:
    """A ``quotewatch.MarketEvent`` of ``kind`` (its body given by keyword as a plain dict: ``status=``,
    ``gap=``, ...; converted and checked by :func:`tests.records.typed`)."""
    record: dict[str, Any] = {
        "ts_event": ts_event,
        "ts_init": ts_event + 5_000_000,
        "exchange": "coinbase",
        "feed": "coinbase-advanced",
        "symbol": symbol,
        "kind": kind,
        "source_sequence": -1,
        "connection_id": "c1",
        "snapshot": None,
        "update": None,
        "trade": None,
        "gap": None,
        "status": None,
    }
    record.update(body)
    return typed(MarketEvent, record)


def status_event(state: str, ts: int, detail: str = "", symbol: str = "BTC-USD") -> MarketEvent:
    return market_event("STATUS", ts, symbol, status={"state": state, "detail": detail})


def gap_event(reason: str, ts: int, detail: str = "", symbol: str = "BTC-USD") -> MarketEvent:
    gap = {"reason": reason, "detail": detail, "expected_sequence": -1, "received_sequence": -1}
    return market_event("GAP", ts, symbol, gap=gap)


def snapshot_event(ts: int, symbol: str = "BTC-USD") -> MarketEvent:
    book = {"bids": [level("67234.51", "0.5")], "asks": [level("67234.52", "0.75")]}
    return market_event("SNAPSHOT", ts, symbol, snapshot=book)


def update_event(ts: int, symbol: str = "BTC-USD") -> MarketEvent:
    changes = [{"side": "BID", "price_e8": level("67234.51", "1")["price_e8"], "size_e8": level("1", "1")["size_e8"]}]
    return market_event("UPDATE", ts, symbol, update={"changes": changes})


def produce_keyed(producer: Producer, serde: AvroSerde, topic: str, records: Iterable[MarketEvent | Snapshot]) -> None:
    """Produce ``records`` (market events or snapshots) keyed by symbol; return once the broker acked them all."""
    for record in records:
        producer.produce(topic, key=record.symbol.encode(), value=serde.encode(topic, record))
    remaining = producer.flush(10)
    assert remaining == 0, f"{remaining} records were not delivered"
