"""The backtest engine runs what the services run: the same records as their stream tasks, fed record by record."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from quotewatch.core.clock import FakeClock
from quotewatch.core.records import BookTop, MarketEvent, RawFrame, Record
from quotewatch.core.runtime import InRecord
from quotewatch.core.topics import CATALOG, TopicNames
from quotewatch.domain.market.features import FEATURE_NAMES, FEATURE_SPEC_ID
from quotewatch.domain.ml.registry import LoadedModel
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.captures import read_capture
from quotewatch.domain.venue.coinbase import FEED_EXCHANGE
from quotewatch.services.book.main import BookTask
from quotewatch.services.labeler.main import LabelerTask
from quotewatch.services.replay.engine import BacktestEngine, prediction_records, score_model
from tests.helpers import shared_data_dir
from tests.records import checked

TOPICS = TopicNames("qw")
CAPTURE = "exchange_level2_BTC-USD_2018-04-17_gdax-orderbook-ml.jsonl"


def partition_of(symbol: str) -> int:
    return sum(symbol.encode()) % CATALOG["md.events"].partitions


def services_outputs(raws: list[RawFrame]) -> dict[str, list[Record]]:
    """Events, top-3, features and labels the ingest (topic mode), book and labeler tasks give, per partition."""
    from quotewatch.services.ingest.topic_mode import NormaliseTask

    normalise = NormaliseTask(TOPICS, FakeClock())
    events = [
        checked(out.value, MarketEvent)
        for offset, raw in enumerate(raws)
        for out in normalise.process(InRecord(TOPICS.md_raw, 0, offset, raw.feed, raw, 0))
        if out.topic == TOPICS.md_events
    ]
    book = BookTask(TOPICS, 100, FakeClock())
    labeler = LabelerTask(TOPICS, 500, 100)
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    out: dict[str, list[Record]] = defaultdict(list)
    for event in events:  # each symbol's partition in order, partitions interleaved: what the services see
        partition = partition_of(event.symbol)
        offset = offsets[(TOPICS.md_events, partition)]
        offsets[(TOPICS.md_events, partition)] += 1
        for record in book.process(InRecord(TOPICS.md_events, partition, offset, event.symbol, event, 0)):
            out[record.topic].append(record.value)
            if isinstance(record.value, BookTop):
                top_offset = offsets[(TOPICS.book_top3, partition)]
                offsets[(TOPICS.book_top3, partition)] += 1
                top = InRecord(TOPICS.book_top3, partition, top_offset, record.key, record.value, 0)
                out[TOPICS.labels].extend(label.value for label in labeler.process(top))
    out[TOPICS.md_events] = list(events)
    return out


@pytest.mark.parametrize("source", ["capture", "synthetic"])
def test_the_engine_gives_the_records_of_the_services_stream_tasks(source: str) -> None:
    if source == "capture":
        raws = list(read_capture(shared_data_dir() / CAPTURE).raw_frames())
    else:
        config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD", "SOL-USD"), seed=4)
        raws = list(synthetic_raw_frames(FEED_EXCHANGE, config, 60 * 1_000_000_000))
    engine = BacktestEngine(100, 500, keep_records=True).run_raw(raws)
    services = services_outputs(raws)
    assert engine.events == services[TOPICS.md_events]
    assert engine.book_tops == services[TOPICS.book_top3]
    assert engine.feature_records == services[TOPICS.features]
    assert engine.label_records == services[TOPICS.labels]
    counts = engine.counts
    assert counts.feature_vectors == len(engine.feature_records) > 100
    assert counts.labels == len(engine.label_records) > 100
    assert (counts.raw_records, counts.bad_events, counts.bad_tops) == (len(raws), 0, 0)

    table = engine.feature_table()
    assert table.values.shape == (counts.feature_vectors, len(FEATURE_NAMES))
    assert table.values.tolist() == [list(r.values) for r in engine.feature_records]
    assert table.t.tolist() == [r.ts_event for r in engine.feature_records]
    assert table.symbol.tolist() == [r.symbol for r in engine.feature_records]
    labels = engine.label_table()
    assert list(
        zip(labels.symbol.tolist(), labels.t_event.tolist(), labels.label.tolist(), labels.synced.tolist(), strict=True)
    ) == [(r.symbol, r.t_event, r.label, r.synced_over_horizon) for r in engine.label_records]
    synced = labels.synced_only()
    assert synced.t_event.tolist() == [r.t_event for r in engine.label_records if r.synced_over_horizon]


class _Ramp:
    """A 'model' whose p is a fixed function of the first feature (NaN on every 7th row)."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = (np.arange(x.shape[0]) % 10) / 10.0
        p[::7] = np.nan
        return np.stack([1 - p, p], axis=1)


def test_scoring_skips_other_specs_and_invalid_outputs_as_inference_falls_back_there() -> None:
    config = SyntheticConfig(seed=9)
    engine = BacktestEngine(100, 500, keep_records=True).run_raw(
        synthetic_raw_frames(FEED_EXCHANGE, config, 20 * 1_000_000_000)
    )
    table = engine.feature_table()
    model = LoadedModel("m", "3", "sklearn", _Ramp(), FEATURE_SPEC_ID, FEATURE_NAMES)
    scores = score_model(table, model, "CHAMPION")
    rows = table.t.size
    assert scores.invalid_outputs == len(range(0, rows, 7))
    assert scores.spec_mismatches == 0
    assert int(scores.scored.sum()) == rows - scores.invalid_outputs
    records = prediction_records(engine, scores)
    assert len(records) == int(scores.scored.sum())
    assert {(r.model_name, r.model_version, r.model_role) for r in records} == {("m", "3", "CHAMPION")}

    other = LoadedModel("m", "4", "sklearn", _Ramp(), "another-spec", FEATURE_NAMES)
    assert score_model(table, other, "CHALLENGER").spec_mismatches == rows
    assert not score_model(table, other, "CHALLENGER").scored.any()
