"""The quality report's data: discovery of captures, the synced-only exclusions, and honest "not enough data"."""

from __future__ import annotations

from pathlib import Path

from msgspec.structs import replace

from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import RECONNECTING, control_text
from quotewatch.quality import datasets
from quotewatch.quality.evaluate import QualitySettings, evaluate
from quotewatch.services.trainer.training import TrainingOptions
from tests.helpers import shared_data_dir

SECOND = 1_000_000_000


def test_discovery_takes_every_capture_present_and_marks_other_venues(tmp_path: Path) -> None:
    real = shared_data_dir()
    coinbase = tmp_path / "coinbase"
    coinbase.mkdir()
    for path in real.iterdir():
        (coinbase / path.name).symlink_to(path)
    (tmp_path / "kraken").mkdir()
    (tmp_path / "kraken" / "book.jsonl").write_text("{}\n")
    found = datasets.discover(tmp_path)
    names = sorted(p.name for p in real.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    assert [s.path.name for s in found.sources if s.path is not None] == names
    assert len(names) >= 3
    assert found.skipped_venues == ["kraken"]
    by_name = {s.name: s for s in found.sources}
    described = by_name["exchange_level2_BTC-USD_2018-04-17_gdax-orderbook-ml"].description
    assert described.startswith("`exchange_level2_BTC-USD_2018-04-17_gdax-orderbook-ml.jsonl` (2.8 MB")
    assert "source: `timothyyu/gdax-orderbook-ml`" in described
    assert "commit `e7425f16cb5526ba7485496673f788ecc6dac440`" in described, "the bullet's continuation lines"
    assert datasets.discover(tmp_path / "missing").sources == []


def test_the_2018_capture_is_not_enough_data_and_says_how_many_positives() -> None:
    source = next(
        s for s in datasets.discover(shared_data_dir().parent).sources if s.name.startswith("exchange_level2_BTC")
    )
    dataset = datasets.load(source, tick_ms=100, delta_ms=500, symbols=("BTC-USD",))
    assert (dataset.rows, dataset.positives) == (5_986, 24)
    excluded = dataset.exclusions
    assert excluded.labelled == 5_986
    assert excluded.reasons == {datasets.PAST_THE_END: 5}, "the last Δ of the capture: no tick at t + Δ"
    result = evaluate(dataset, TrainingOptions(delta_ms=500), QualitySettings())
    assert not result.evaluated
    assert result.verdict == "not enough data"
    assert result.not_enough.startswith("24 positive labels in 5986 labelled ticks (about 4 best-quote changes)")


def test_a_reconnect_is_a_gap_and_the_ticks_whose_horizon_crosses_it_are_left_out() -> None:
    """Two connections 3 s apart: the ticks of the last Δ before the drop have no label, and why is counted."""
    config = SyntheticConfig(symbols=("BTC-USD",), seed=3, rate=100.0)
    first = list(synthetic_raw_frames(FEED_ADVANCED, config, 20 * SECOND, connection_id="one"))
    last = first[-1].ts_init
    dropped = replace(
        first[-1],
        ts_event=last + 1,
        ts_init=last + 1,
        kind="DISCONNECTED",
        frame_index=-1,
        text=control_text(RECONNECTING, "connection closed"),
    )
    later = SyntheticConfig(symbols=("BTC-USD",), seed=4, rate=100.0, start_ns=config.start_ns + 23 * SECOND)
    second = list(synthetic_raw_frames(FEED_ADVANCED, later, 20 * SECOND, connection_id="two"))
    engine = datasets._LedgerEngine(100, 500)
    engine.run_raw([*first, dropped, *second])
    labels = engine.label_table().synced_only()
    labelled = set(zip(labels.symbol.tolist(), labels.t_event.tolist(), strict=True))
    excluded = datasets.exclusions(engine, labelled, 500)
    assert excluded.gaps["RECONNECT"] == 3, "each connection's start, and the drop"
    assert excluded.unsynced_seconds > 2.0, "from the drop to the second connection's snapshot"
    reasons = set(excluded.reasons)
    assert reasons <= {datasets.UNSYNCED, datasets.RESYNC, datasets.PAST_THE_END, datasets.SKIPPED}
    assert (
        excluded.reasons[datasets.UNSYNCED] + excluded.reasons[datasets.RESYNC] + excluded.reasons[datasets.SKIPPED]
        >= 4
    ), "the ticks of the last Δ of the first connection"
    assert excluded.labelled + sum(excluded.reasons.values()) == excluded.feature_ticks
    assert 0 < excluded.share < 0.05
