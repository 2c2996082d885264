"""The Coinbase adapter: scalar parsing, message parsers, trade sides, subscribe messages."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sortedcontainers import SortedDict

from quotewatch.core.records import BookSnapshot, BookUpdate, Trade
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.domain.venue.coinbase import (
    ExchangeMessageError,
    InvalidFieldError,
    MalformedFrameError,
    Parsed,
    UnknownMessageError,
    decimal_e8,
    format_time_ns,
    parse_time_ns,
)
from quotewatch.domain.venue.coinbase_advanced import parse_advanced_message
from quotewatch.domain.venue.coinbase_auth import ExchangeCredentials, exchange_signature
from quotewatch.domain.venue.coinbase_exchange import parse_exchange_message
from quotewatch.domain.venue.coinbase_feeds import subscribe_messages
from tests.helpers import shared_data_dir
from tests.records import plain


def _body(parsed: Parsed) -> BookSnapshot | BookUpdate | Trade:
    """The body of a parsed SNAPSHOT, UPDATE or TRADE (asserted present)."""
    assert parsed.body is not None, f"a parsed {parsed.kind} without its body"
    return parsed.body


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2018-04-17T00:55:04.358Z", 1_523_926_504_358_000_000),
        ("2021-04-17T16:43:37.075687Z", 1_618_677_817_075_687_000),
        ("2026-08-09T21:05:48.228568804Z", 1_786_309_548_228_568_804),
        ("2026-08-09T21:05:48Z", 1_786_309_548_000_000_000),
        ("2026-08-09T21:05:48.5+00:00", 1_786_309_548_500_000_000),
    ],
)
def test_timestamps_parse_exactly_to_ns(text: str, ns: int) -> None:
    assert parse_time_ns(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-08-09",
        "2026-08-09T21:05:48.1234567890Z",
        "2026-13-09T21:05:48Z",
        "2026-08-09T21:05:48+01:00",
        "2263-01-01T00:00:00Z",  # past int64 ns: no record could carry it
        "1600-01-01T00:00:00Z",
        5,
        None,
    ],
)
def test_bad_timestamps_are_value_errors(text: object) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        parse_time_ns(text)


@given(st.integers(min_value=0, max_value=4_000_000_000 * 10**9))
def test_format_time_is_the_inverse_of_parse(ns: int) -> None:
    assert parse_time_ns(format_time_ns(ns, 9)) == ns


def test_decimal_strings_give_the_same_key_whatever_the_padding() -> None:
    assert decimal_e8("8041.33000000") == decimal_e8("8041.33") == 804_133_000_000
    for bad in ["-1", "1e5", "abc", "0.000000001", 1.5, None, "99999999999999999999"]:
        with pytest.raises(ValueError, match=r"price|decimal"):
            decimal_e8(bad, "price")


def test_exchange_l2update_and_snapshot() -> None:
    update = parse_exchange_message(
        {
            "type": "l2update",
            "product_id": "BTC-USD",
            "time": "2018-04-17T00:55:04.358Z",
            "changes": [["buy", "8041.33000000", "0"], ["sell", "8042.9", "1.5"]],
        }
    )
    assert [(e.kind, e.symbol, e.ts_event) for e in update.events] == [("UPDATE", "BTC-USD", 1_523_926_504_358_000_000)]
    assert plain(_body(update.events[0])) == {
        "changes": [
            {"side": "BID", "price_e8": 804_133_000_000, "size_e8": 0},
            {"side": "ASK", "price_e8": 804_290_000_000, "size_e8": 150_000_000},
        ]
    }
    snapshot = parse_exchange_message(
        {"type": "snapshot", "product_id": "ETH-USD", "bids": [["10", "1"]], "asks": [["11", "2"]]}
    )
    assert snapshot.confirmed == ("ETH-USD",)
    assert snapshot.events[0].ts_event == -1  # no time in the message: the normaliser uses ts_init
    assert plain(_body(snapshot.events[0])) == {
        "bids": [{"price_e8": 1_000_000_000, "size_e8": 100_000_000}],
        "asks": [{"price_e8": 1_100_000_000, "size_e8": 200_000_000}],
    }


def test_exchange_match_aggressor_is_the_opposite_of_the_maker_side() -> None:
    base = {
        "type": "match",
        "trade_id": 41766821,
        "size": "0.1552",
        "price": "8042.9",
        "product_id": "BTC-USD",
        "sequence": 5693130267,
        "time": "2018-04-17T00:55:11.045000Z",
    }
    buy_maker = parse_exchange_message({**base, "side": "buy"})
    assert plain(_body(buy_maker.events[0])) == {
        "trade_id": "41766821",
        "aggressor_side": "SELL",
        "price_e8": 804_290_000_000,
        "size_e8": 15_520_000,
    }
    assert buy_maker.sequence == 5693130267
    sell_maker = parse_exchange_message({**base, "side": "sell"}).events[0].body
    assert isinstance(sell_maker, Trade)
    assert sell_maker.aggressor_side == "BUY"


def test_advanced_market_trades_side_is_the_maker_side_in_the_recorded_capture() -> None:
    """The evidence behind ADVANCED_AGGRESSOR: trades at the offer are buyer-initiated, yet say SELL."""
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith("advanced_trade"))
    books: dict[str, dict[str, SortedDict]] = {}
    at_ask: dict[str, int] = {}
    at_bid: dict[str, int] = {}
    for line in read_capture(path).lines:
        message = json.loads(line)
        if message["channel"] == "l2_data":
            for event in message["events"]:
                book = books.setdefault(event["product_id"], {"bid": SortedDict(), "offer": SortedDict()})
                for u in event["updates"]:
                    if Decimal(u["new_quantity"]) == 0:
                        book[u["side"]].pop(Decimal(u["price_level"]), None)
                    else:
                        book[u["side"]][Decimal(u["price_level"])] = Decimal(u["new_quantity"])
        elif message["channel"] == "market_trades":
            parsed = parse_advanced_message(message)
            raw_trades = [t for e in message["events"] if e["type"] == "update" for t in e["trades"]]
            assert len(parsed.events) == len(raw_trades)
            for trade, event in zip(raw_trades, parsed.events, strict=True):
                trade_book = books.get(trade["product_id"])
                if not trade_book or not trade_book["bid"] or not trade_book["offer"]:
                    continue
                price = Decimal(trade["price"])
                if price >= trade_book["offer"].peekitem(0)[0]:
                    at_ask[trade["side"]] = at_ask.get(trade["side"], 0) + 1
                    assert isinstance(event.body, Trade)
                    assert event.body.aggressor_side == "BUY"
                elif price <= trade_book["bid"].peekitem(-1)[0]:
                    at_bid[trade["side"]] = at_bid.get(trade["side"], 0) + 1
                    assert isinstance(event.body, Trade)
                    assert event.body.aggressor_side == "SELL"
    assert at_ask == {"SELL": 48}
    assert at_bid == {"BUY": 23}


def test_advanced_l2_data_event_time_is_the_latest_update_time() -> None:
    parsed = parse_advanced_message(
        {
            "channel": "l2_data",
            "timestamp": "2026-08-09T21:05:48.505350477Z",
            "sequence_num": 14,
            "events": [
                {
                    "type": "update",
                    "product_id": "BTC-USD",
                    "updates": [
                        {
                            "side": "bid",
                            "event_time": "2026-08-09T21:05:48.210883Z",
                            "price_level": "1",
                            "new_quantity": "0",
                        },
                        {
                            "side": "offer",
                            "event_time": "2026-08-09T21:05:48.21089Z",
                            "price_level": "2",
                            "new_quantity": "3",
                        },
                    ],
                }
            ],
        }
    )
    assert parsed.sequence == 14
    assert parsed.events[0].ts_event == parse_time_ns("2026-08-09T21:05:48.210890Z")
    assert plain(_body(parsed.events[0])) == {
        "changes": [
            {"side": "BID", "price_e8": 100_000_000, "size_e8": 0},
            {"side": "ASK", "price_e8": 200_000_000, "size_e8": 300_000_000},
        ]
    }


def test_advanced_subscriptions_confirm_level2_products_only() -> None:
    parsed = parse_advanced_message(
        {
            "channel": "subscriptions",
            "timestamp": "2026-08-09T21:05:48.629627857Z",
            "sequence_num": 24,
            "events": [{"subscriptions": {"level2": ["BTC-USD", "ETH-USD"], "market_trades": ["SOL-USD"]}}],
        }
    )
    assert parsed.confirmed == ("BTC-USD", "ETH-USD")


def l2_bid_update(event_time: str, price_level: str) -> dict[str, Any]:
    """An Advanced ``l2_data`` frame with one bid update."""
    update = {"side": "bid", "event_time": event_time, "price_level": price_level, "new_quantity": "1"}
    return {
        "channel": "l2_data",
        "sequence_num": 1,
        "timestamp": "2026-08-09T21:05:48Z",
        "events": [{"type": "update", "product_id": "BTC-USD", "updates": [update]}],
    }


@pytest.mark.parametrize(
    ("message", "error", "book_affected"),
    [
        ([1, 2], MalformedFrameError, True),
        ({"no": "channel"}, MalformedFrameError, True),
        (
            {"channel": "mystery", "sequence_num": 1, "timestamp": "2026-08-09T21:05:48Z", "events": []},
            UnknownMessageError,
            False,
        ),
        ({"type": "error", "message": "failure to subscribe"}, ExchangeMessageError, False),
        (
            {
                "channel": "l2_data",
                "sequence_num": 1,
                "timestamp": "2026-08-09T21:05:48Z",
                "events": [{"type": "update"}],
            },
            InvalidFieldError,
            True,
        ),
        (
            {"channel": "l2_data", "sequence_num": 2**63, "timestamp": "2026-08-09T21:05:48Z", "events": []},
            InvalidFieldError,
            True,
        ),
        (
            {
                "channel": "market_trades",
                "sequence_num": 1,
                "timestamp": "2026-08-09T21:05:48Z",
                "events": [{"type": "update", "trades": [{}]}],
            },
            InvalidFieldError,
            False,
        ),
    ],
)
def test_advanced_rejections_say_whether_the_book_is_affected(
    message: object, error: type[Exception], book_affected: bool
) -> None:
    with pytest.raises(error) as info:
        parse_advanced_message(message)
    assert info.value.book_affected is book_affected  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "message", [l2_bid_update("2026-08-09T21:05:48Z", "1,5"), l2_bid_update("2263-01-01T00:00:00Z", "1")]
)
def test_an_advanced_book_event_that_does_not_parse_fails_its_product_not_the_frame(message: dict[str, Any]) -> None:
    parsed = parse_advanced_message(message)
    assert parsed.events == []
    (error,) = parsed.failed
    assert isinstance(error, InvalidFieldError)
    assert (error.symbol, error.book_affected) == ("BTC-USD", True)


def test_a_multi_product_l2_data_frame_with_one_bad_event_keeps_the_other_products() -> None:
    good = {"side": "offer", "event_time": "2026-08-09T21:05:48.1Z", "price_level": "2", "new_quantity": "3"}
    bad = {"side": "bid", "event_time": "2026-08-09T21:05:48.2Z", "price_level": "1,5", "new_quantity": "1"}
    message: dict[str, Any] = {
        "channel": "l2_data",
        "sequence_num": 7,
        "timestamp": "2026-08-09T21:05:48.3Z",
        "events": [
            {"type": "update", "product_id": "ETH-USD", "updates": [good]},
            {"type": "update", "product_id": "BTC-USD", "updates": [good]},
            {"type": "update", "product_id": "BTC-USD", "updates": [bad]},
            {"type": "snapshot", "product_id": "SOL-USD", "updates": [good]},
        ],
    }
    parsed = parse_advanced_message(message)
    # BTC-USD's events are all dropped (its book is out of sync from the bad one); the others stand.
    assert [(e.kind, e.symbol) for e in parsed.events] == [("UPDATE", "ETH-USD"), ("SNAPSHOT", "SOL-USD")]
    assert parsed.confirmed == ("SOL-USD",)
    assert [(e.symbol, e.book_affected) for e in parsed.failed] == [("BTC-USD", True)]
    # A bad event that names no product fails the whole frame.
    message["events"].append({"type": "update", "updates": [good]})
    with pytest.raises(InvalidFieldError) as info:
        parse_advanced_message(message)
    assert info.value.book_affected


@pytest.mark.parametrize(
    ("message", "error", "book_affected"),
    [
        ("text", MalformedFrameError, True),
        ({"product_id": "BTC-USD"}, MalformedFrameError, True),
        ({"type": "full_channel_thing"}, UnknownMessageError, False),
        (
            {"type": "error", "message": "Failed to subscribe", "reason": "level2 requires authentication"},
            ExchangeMessageError,
            False,
        ),
        (
            {
                "type": "l2update",
                "product_id": "BTC-USD",
                "time": "2018-04-17T00:55:04Z",
                "changes": [["up", "1", "1"]],
            },
            InvalidFieldError,
            True,
        ),
        ({"type": "l2update", "product_id": "BTC-USD", "changes": []}, InvalidFieldError, True),
        ({"type": "snapshot", "product_id": "BTC-USD", "bids": [["1"]], "asks": []}, InvalidFieldError, True),
        (
            {"type": "match", "product_id": "BTC-USD", "side": "buy", "time": "2018-04-17T00:55:04Z"},
            InvalidFieldError,
            False,
        ),
    ],
)
def test_exchange_rejections_say_whether_the_book_is_affected(
    message: object, error: type[Exception], book_affected: bool
) -> None:
    with pytest.raises(error) as info:
        parse_exchange_message(message)
    assert info.value.book_affected is book_affected  # type: ignore[attr-defined]


def test_ignored_types_are_understood_not_rejected() -> None:
    assert parse_exchange_message({"type": "ticker", "product_id": "BTC-USD"}).ignored
    assert parse_exchange_message({"type": "last_match", "product_id": "BTC-USD"}).ignored
    assert parse_advanced_message({"channel": "candles", "sequence_num": 3}).ignored


def test_advanced_subscribes_one_channel_per_message() -> None:
    messages = subscribe_messages("coinbase-advanced", ["BTC-USD", "ETH-USD"])
    assert messages == [
        {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"], "channel": channel}
        for channel in ("level2", "heartbeats", "market_trades")
    ]


def test_exchange_subscribes_to_level2_batch_without_credentials() -> None:
    assert subscribe_messages("coinbase-exchange", ["BTC-USD"]) == [
        {"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["level2_batch", "matches", "heartbeat"]}
    ]


def test_exchange_authenticated_subscribe_signs_get_users_self_verify() -> None:
    secret = base64.b64encode(b"a secret of some length").decode()
    credentials = ExchangeCredentials(key="k", secret_b64=secret, passphrase="p")
    (message,) = subscribe_messages("coinbase-exchange", ["BTC-USD"], credentials=credentials, timestamp="1700000000")
    expected = base64.b64encode(
        hmac.new(b"a secret of some length", b"1700000000GET/users/self/verify", hashlib.sha256).digest()
    ).decode()
    assert message == {
        "type": "subscribe",
        "product_ids": ["BTC-USD"],
        "channels": ["level2", "matches", "heartbeat"],
        "signature": expected,
        "key": "k",
        "passphrase": "p",
        "timestamp": "1700000000",
    }
    assert exchange_signature(secret, "1700000000") == expected
    assert "secret" not in repr(credentials)
    with pytest.raises(ValueError, match="base64"):
        exchange_signature("not base64!", "1")
