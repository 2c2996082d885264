"""The synthetic market: deterministic, a realistic book, protocol-correct, and partly predictable."""

from __future__ import annotations

import pytest

from quotewatch.domain.simulation.synthetic import SyntheticConfig, SyntheticMarket, synthetic_raw_frames
from quotewatch.domain.venue.normaliser import Normaliser
from tests.unit.domain.venue.test_normaliser_golden import books_from_events

S = 1_000_000_000


def test_the_same_seed_gives_the_same_log_and_another_seed_does_not() -> None:
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=11, rate=500)
    first = [r.text for r in synthetic_raw_frames("coinbase-advanced", config, 3 * S)]
    again = [r.text for r in synthetic_raw_frames("coinbase-advanced", config, 3 * S)]
    other = [
        r.text
        for r in synthetic_raw_frames(
            "coinbase-advanced", SyntheticConfig(symbols=config.symbols, seed=12, rate=500), 3 * S
        )
    ]
    assert first == again
    assert first != other


def test_adding_a_symbol_does_not_change_the_others() -> None:
    one = SyntheticMarket(SyntheticConfig(symbols=("BTC-USD",), seed=5))
    two = SyntheticMarket(SyntheticConfig(symbols=("BTC-USD", "SOL-USD"), seed=5))
    end = one.config.start_ns + 5 * S
    assert [b for b in one.advance(end)] == [b for b in two.advance(end) if b.symbol == "BTC-USD"]


@pytest.mark.parametrize("feed", ["coinbase-advanced", "coinbase-exchange"])
def test_the_protocol_messages_rebuild_exactly_the_markets_book(feed: str) -> None:
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=2, rate=1000)
    raws = list(synthetic_raw_frames(feed, config, 10 * S))
    events, rejects = Normaliser().process_all(raws)
    assert rejects == []
    reference = SyntheticMarket(config)
    reference.advance(config.start_ns + 10 * S)
    books = books_from_events(events)
    for symbol in config.symbols:
        assert books[symbol].synced
        assert books[symbol].as_dict() == reference.book(symbol)
        assert books[symbol].crossed == 0
        assert books[symbol].unknown_deletes == 0
        assert len(books[symbol].bids) >= config.depth
        assert len(books[symbol].asks) >= config.depth
    kinds = {e.kind for e in events}
    assert kinds == {"STATUS", "GAP", "SNAPSHOT", "UPDATE", "TRADE", "HEARTBEAT", "CLOCK"}
    clocks = [e.ts_event for e in events if e.kind == "CLOCK" and e.symbol == "BTC-USD"]
    assert clocks == [config.start_ns + (i + 1) * 100_000_000 for i in range(len(clocks))]
    assert len(clocks) == 100


def test_the_rate_is_level_updates_per_second_per_symbol_on_average() -> None:
    config = SyntheticConfig(symbols=("ETH-USD",), seed=4, rate=300)
    market = SyntheticMarket(config)
    market.advance(config.start_ns + 200 * S)
    per_second = market.level_updates / 200
    assert 0.5 * config.rate < per_second < 2.0 * config.rate
    assert market.trades > 0


def test_quote_changes_are_partly_predictable_from_the_book() -> None:
    """A thin touch changes more often within 500 ms, and the book's imbalance tells the direction."""
    config = SyntheticConfig(symbols=("BTC-USD",), seed=9, rate=200)
    market = SyntheticMarket(config)
    inner = market._markets["BTC-USD"]
    samples = []
    t = config.start_ns
    for _ in range(6000):
        t += 100_000_000
        market.advance(t)
        bid, ask = inner.best_bid, inner.best_ask
        samples.append((bid, ask, inner.bids[bid], inner.asks[ask]))
    thin = {True: [0, 0], False: [0, 0]}
    direction = {"ask up": 0, "bid down": 0}
    for now, later in zip(samples, samples[5:], strict=False):
        bid, ask, bid_size, ask_size = now
        changed = (later[0], later[1]) != (bid, ask)
        is_thin = min(bid_size, ask_size) < 2_000_000
        thin[is_thin][0] += changed
        thin[is_thin][1] += 1
        if bid_size > 3 * ask_size:
            direction["ask up"] += later[1] > ask
            direction["bid down"] += later[0] < bid
    p_thin = thin[True][0] / thin[True][1]
    p_thick = thin[False][0] / thin[False][1]
    assert 0.2 < p_thick < p_thin - 0.1 < 0.95, (p_thin, p_thick)
    assert direction["ask up"] > 1.5 * direction["bid down"], direction


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one symbol"):
        SyntheticConfig(symbols=())
    with pytest.raises(ValueError, match="positive"):
        SyntheticConfig(rate=0)
    with pytest.raises(ValueError, match="unknown feed"):
        next(synthetic_raw_frames("kraken", SyntheticConfig(), S))
