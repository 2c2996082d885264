"""Book changes lost from a real capture: no tick after the loss is emitted as synced.

The 2026 Advanced Trade capture is replayed whole and with one ``l2_data`` frame dropped (a
``SEQUENCE_JUMP``) or made unreadable (a ``PARSE_ERROR``) through the real normaliser, book pipeline
and labeler. Every BookTop, FeatureVector and label the damaged replay emits must equal the whole
replay's at the same tick (``ts_init`` aside): from the lost update on the book is incomplete, and
nothing built from it may be emitted as synced. The cut frames sit where the frames around them have out-of-order times:

- 161 (BTC-USD, updates at 21:05:52.108713) is revealed by 162, an ETH-USD frame sent at
  52.208889 whose own updates are at 51.982039: a GAP at the revealing frame's time closed the
  ETH-USD ticks 52.0-52.2 before ETH-USD's own updates of 51.98-52.08 were applied;
- 162 (ETH-USD, updates at 51.982039) comes after 161 (BTC-USD at 52.108713): a GAP at the latest
  time of the connection (52.108713) closed the ETH-USD ticks 52.0 and 52.1 from a book without 162.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import msgspec
import pytest

from quotewatch.core.records import BookTop, FeatureVector, MarketEvent, RawFrame
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler
from quotewatch.domain.venue.captures import Capture, capture_files, read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from tests.helpers import shared_data_dir

TICK_MS = 100
DELTA_MS = 500
Key = tuple[str, int]


class Replay:
    """The normalised events and everything the book pipeline and the labeler emit for them."""

    def __init__(self, raws: Iterator[RawFrame]) -> None:
        self.events, _ = Normaliser().process_all(raws)
        pipeline = BookPipeline(TICK_MS)
        labeler = Labeler(DELTA_MS, TICK_MS)
        self.tops: dict[Key, BookTop] = {}
        self.features: dict[Key, FeatureVector] = {}
        self.labels: dict[Key, int] = {}
        for event in self.events:
            for output in pipeline.process(event):
                top = output.book_top
                key = (top.symbol, top.ts_event)
                assert key not in self.tops
                self.tops[key] = top
                if output.features is not None:
                    self.features[key] = output.features
                label = labeler.process(top)
                if label is not None:
                    self.labels[(label.symbol, label.t_event)] = label.label

    def gaps(self, reason: str) -> dict[str, MarketEvent]:
        return {e.symbol: e for e in self.events if e.kind == "GAP" and e.gap is not None and e.gap.reason == reason}


def _without_ts_init(record: BookTop | FeatureVector) -> BookTop | FeatureVector:
    # ts_init is the receive time of the input that closed the tick: the cut moves it, not the tick.
    return msgspec.structs.replace(record, ts_init=0)


@pytest.fixture(scope="module")
def capture() -> Capture:
    (path,) = (p for p in capture_files(shared_data_dir()) if p.name.startswith("advanced_trade_level2_"))
    return read_capture(path)


@pytest.fixture(scope="module")
def whole(capture: Capture) -> Replay:
    return Replay(capture.raw_frames())


def _with_lines(capture: Capture, lines: Sequence[str], recv_ns: Sequence[int]) -> Capture:
    return replace(capture, lines=tuple(lines), recv_ns=tuple(recv_ns))


def _dropped(capture: Capture, index: int) -> Capture:
    lines, recv = list(capture.lines), list(capture.recv_ns)
    del lines[index], recv[index]
    return _with_lines(capture, lines, recv)


def _unreadable(capture: Capture, index: int) -> Capture:
    lines = list(capture.lines)
    assert '"new_quantity":"' in lines[index]
    lines[index] = lines[index].replace('"new_quantity":"', '"new_quantity":"x', 1)  # a bad field, envelope intact
    return _with_lines(capture, lines, capture.recv_ns)


BOTH = frozenset({"BTC-USD", "ETH-USD"})
CASES = {
    # A lost frame could have been either symbol's: both get a GAP.
    "drop 161 (BTC-USD), revealed by an ETH-USD frame sent later than its updates": (
        161,
        _dropped,
        "SEQUENCE_JUMP",
        BOTH,
    ),
    "drop 162 (ETH-USD), older than the BTC-USD frame before it": (162, _dropped, "SEQUENCE_JUMP", BOTH),
    # An unreadable event that names its product fails that product only.
    "unreadable 161 with a readable timestamp": (161, _unreadable, "PARSE_ERROR", frozenset({"BTC-USD"})),
    "unreadable 162 with a readable timestamp": (162, _unreadable, "PARSE_ERROR", frozenset({"ETH-USD"})),
}


@pytest.mark.parametrize(("index", "damage", "reason", "gapped"), CASES.values(), ids=CASES.keys())
def test_no_tick_after_lost_book_changes_differs_from_the_whole_capture(
    capture: Capture, whole: Replay, index: int, damage: Any, reason: str, gapped: frozenset[str]
) -> None:
    assert f'"sequence_num":{index},' in capture.lines[index]
    assert '"channel":"l2_data"' in capture.lines[index]
    damaged = Replay(damage(capture, index).raw_frames())

    gaps = damaged.gaps(reason)
    assert set(gaps) == gapped
    assert damaged.tops, "the ticks before the loss are still emitted"

    wrong_tops = [k for k, top in damaged.tops.items() if _without_ts_init(top) != _without_ts_init(whole.tops[k])]
    assert wrong_tops == []
    assert all(_without_ts_init(f) == _without_ts_init(whole.features[k]) for k, f in damaged.features.items())
    wrong_labels = [k for k, label in damaged.labels.items() if whole.labels[k] != label]
    assert wrong_labels == []
    for symbol, gap in gaps.items():
        # The GAP is at the symbol's last good event: not a time that closes ticks past it.
        before = [e.ts_event for e in damaged.events[: damaged.events.index(gap)] if e.symbol == symbol]
        assert gap.ts_event == max(before)
        assert all(t < gap.ts_event for s, t in damaged.tops if s == symbol)


def test_the_whole_capture_has_no_gap_after_the_connection_start(whole: Replay) -> None:
    """The oracle: the whole replay is synced throughout (its ticks are the right ones)."""
    assert [e.gap.reason for e in whole.events if e.gap is not None] == ["RECONNECT", "RECONNECT"]
    assert len(whole.tops) > 400
