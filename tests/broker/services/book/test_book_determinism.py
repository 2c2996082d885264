"""Book + labeler on the real broker: outputs are the pure pipeline's, and two runs are byte-identical.

Each run produces the same MarketEvents into ``<prefix>.md.events`` of its own namespace and runs
the real :class:`BookTask` and :class:`LabelerTask` in :class:`StreamProcessor` (exactly-once
transactions) until every expected record is committed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from quotewatch.core.clock import SystemClock
from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin
from quotewatch.core.records import MarketEvent
from quotewatch.core.topics import TopicNames
from quotewatch.domain.venue.captures import read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.book.main import BookTask
from quotewatch.services.labeler.main import LabelerTask
from tests.broker.services.book.streams import DELTA_MS, TICK_MS, expected_outputs, produce_events, running
from tests.helpers import read_topic, shared_data_dir, wait_for
from tests.records import plain
from tests.unit.services.book.market_events import synthetic_feed


def count(settings: CommonSettings, topic: str) -> int:
    """Committed records of ``topic`` (sum over partitions of the high watermark is not enough
    with transactions; read them)."""
    return len(read_topic(settings, topic, decode=False, timeout=60))


def run_book_and_labeler(settings: CommonSettings, events: list[MarketEvent]) -> dict[str, list[Any]]:
    names = TopicNames(settings.topic_prefix)
    ensure_topics(make_admin(settings), settings.topic_prefix)
    tops, vectors, labels = expected_outputs(events)
    produce_events(settings, events)
    with ExitStack() as stack:
        stack.enter_context(running(settings, "book", BookTask(names, TICK_MS, SystemClock()), names.md_events))
        stack.enter_context(running(settings, "labeler", LabelerTask(names, DELTA_MS, TICK_MS), names.book_top3))
        wait_for(lambda: count(settings, names.features) >= len(vectors), timeout=120, message="all features")
        wait_for(lambda: count(settings, names.labels) >= labels, timeout=120, message="all labels")
    result: dict[str, list[Any]] = {}
    for topic in (names.book_top3, names.features, names.labels):
        raw = read_topic(settings, topic, decode=False)
        suffix = topic.removeprefix(settings.topic_prefix + ".")
        result[suffix] = sorted((r["_partition"], r["_offset"], r["_key"], r["_raw"]) for r in raw)
    assert len(result["book.top3"]) == len(tops)
    assert len(result["features"]) == len(vectors)
    assert len(result["labels"]) == labels
    # Decoded, each partition holds exactly the pure pipeline's records for its symbols, in order.
    decoded = read_topic(settings, names.features)
    for partition in {r["_partition"] for r in decoded}:
        got = [{k: v for k, v in r.items() if not k.startswith("_")} for r in decoded if r["_partition"] == partition]
        symbols = {r["symbol"] for r in got}
        assert got == [plain(v) for v in vectors if v.symbol in symbols]
    assert not read_topic(settings, names.dlq, timeout=10), "no dead letters"
    return result


@pytest.mark.parametrize(
    "source",
    ["capture", "synthetic"],
)
def test_two_runs_over_the_same_events_are_byte_identical(
    source: str, make_settings: Callable[..., CommonSettings], topic_prefix: str
) -> None:
    if source == "capture":
        path: Path = shared_data_dir() / "exchange_level2_ticker_matches_10products_2021-04-17_cryptofeed.jsonl"
        events, _ = Normaliser().process_all(read_capture(path).raw_frames())
    else:
        events = synthetic_feed(2024, symbols=("BTC-USD", "ETH-USD", "SOL-USD"), count=3000)
    first = run_book_and_labeler(make_settings(topic_prefix=topic_prefix + "a"), events)
    second = run_book_and_labeler(make_settings(topic_prefix=topic_prefix + "b"), events)
    assert len(first["features"]) > 500
    assert len(first["labels"]) > 300
    for suffix in ("book.top3", "features", "labels"):
        assert [r[2:] for r in first[suffix]] == [r[2:] for r in second[suffix]], suffix
        assert [r[0] for r in first[suffix]] == [r[0] for r in second[suffix]], f"{suffix}: same partitions"
