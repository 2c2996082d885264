"""``run_backtest`` end to end without a broker: sources, the report, record files, the lake output, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from quotewatch.cli import main
from quotewatch.core.config import BacktestSettings
from quotewatch.core.lake import read_dataset
from quotewatch.core.records import FeatureVector, Label, Prediction
from quotewatch.core.serde import AvroSerde
from quotewatch.domain.market import features as spec
from quotewatch.domain.ml.evaluation import BASELINES
from quotewatch.domain.ml.registry import LoadedModel
from quotewatch.domain.venue.captures import read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.replay.backtest import read_records, run_backtest
from quotewatch.services.replay.engine import BacktestEngine, input_lookahead_ns
from quotewatch.services.replay.sources import SourceSpec, Window, parse_time, synthetic_raw_records
from tests.helpers import shared_data_dir
from tests.unit.services.replay.test_sources import write_dataset

CAPTURE = "advanced_trade_level2_BTC-USD_ETH-USD_2026-08-09_cryptofeed.jsonl.gz"
MS = 1_000_000


def settings() -> BacktestSettings:
    return BacktestSettings(mlflow_tracking_uri=None)


def lr_model(seed: int = 3) -> LoadedModel:
    """The trainer's LR fitted on 10 minutes of the synthetic market."""
    from quotewatch.services.trainer.training import TrainingOptions, build_training_set, fit_model, records_frame

    raws = synthetic_raw_records(seed, 1 / 6, ("BTC-USD",), 100, Window())
    engine = BacktestEngine(100, 500, keep_records=True).run_raw(raws)
    data = build_training_set(records_frame(engine.feature_records), records_frame(engine.label_records))
    model, _ = fit_model("lr", data.x, data.y, TrainingOptions(delta_ms=500))
    return LoadedModel("lr", "1", "sklearn", model, spec.FEATURE_SPEC_ID, spec.FEATURE_NAMES)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return lr_model()


def test_a_capture_backtest_reports_models_and_baselines_and_writes_plots_records_and_a_lake(
    tmp_path: Path, model: LoadedModel
) -> None:
    capture = shared_data_dir() / CAPTURE
    start = parse_time("2026-08-09T21:06:00Z")
    result = run_backtest(
        settings(),
        SourceSpec("capture", path=capture),
        Window(start, None),
        [model],
        output_dir=tmp_path / "out",
        records_dir=tmp_path / "records",
        lake_out=(str(tmp_path / "lake"), "bt"),
    )
    evaluation = result.evaluation
    assert evaluation is not None
    assert list(evaluation.scores) == ["lr v1", *(f"baseline: {name}" for name in BASELINES)]
    assert evaluation.t.min() >= start
    assert evaluation.baseline_fit_in_sample is False  # 12 s of labels before --from, both classes
    assert 0 < evaluation.scores["lr v1"].n == evaluation.y.size
    for name in ("roc.png", "calibration.png", "table.md", "metrics.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["scores"]["lr v1"]["n"] == evaluation.y.size
    assert metrics["counts"]["ticks"] == result.engine.counts.ticks

    # The record files decode to what the engine made (and re-encode with the topic serde).
    features = read_records(tmp_path / "records" / "features.avro", FeatureVector)
    assert features == result.engine.feature_records
    predictions = read_records(tmp_path / "records" / "predictions.avro", Prediction)
    assert len(predictions) == len(features)
    assert [p.p_change for p in predictions] == result.models[0].p.tolist()
    serde = AvroSerde()
    for record in predictions[:5]:
        assert serde.decode(serde.encode("x.predictions", record), "x.predictions") == record

    # The lake output reads back as the trainer reads it.
    lake = read_dataset(str(tmp_path / "lake"), "bt.features", columns=["symbol", "ts_event", "values"])
    assert len(lake) == len(features)
    assert sorted(zip(lake.symbol, lake.ts_event, strict=True)) == sorted((f.symbol, f.ts_event) for f in features)
    labels = read_dataset(str(tmp_path / "lake"), "bt.labels", columns=["label"])
    assert len(labels) == result.engine.counts.labels


def test_a_lake_backtest_from_raw_frames_or_stored_events_equals_the_capture_backtest(
    tmp_path: Path, model: LoadedModel
) -> None:
    capture = shared_data_dir() / CAPTURE
    raws = list(read_capture(capture).raw_frames())
    write_dataset(tmp_path, "qw.md.raw", raws, "feed", lambda r: 0)
    events, _ = Normaliser().process_all(raws)
    write_dataset(tmp_path, "qw.md.events", events, "symbol", lambda r: 0 if r.symbol == "BTC-USD" else 2)
    window = Window(parse_time("2026-08-09T21:06:00Z"), parse_time("2026-08-09T21:06:10Z"))
    from_lake = run_backtest(settings().model_copy(update={"lake_uri": str(tmp_path)}), SourceSpec("lake", "qw"),
                             window, [model], records_dir=tmp_path / "a")  # fmt: skip
    from_events = run_backtest(settings().model_copy(update={"lake_uri": str(tmp_path)}), SourceSpec("lake", "qw"),
                               window, [model], records_dir=tmp_path / "c", events=True)  # fmt: skip
    from_file = run_backtest(
        settings(), SourceSpec("capture", path=capture), window, [model], records_dir=tmp_path / "b"
    )
    assert from_lake.start is not None
    assert from_lake.start.connection_id == f"capture:{read_capture(capture).stem}"
    for name in ("book.top3", "features", "labels", "predictions"):
        expected = read_records(tmp_path / "b" / f"{name}.avro")
        assert read_records(tmp_path / "a" / f"{name}.avro") == expected, name
        assert read_records(tmp_path / "c" / f"{name}.avro") == expected, f"{name} from the stored events"
    in_window = [e for e in events if window.extended(input_lookahead_ns(500)).before_end(e.ts_init)]
    assert (from_events.engine.counts.raw_records, from_events.engine.counts.events) == (0, len(in_window))
    assert from_events.engine.counts.events == from_file.engine.counts.events
    assert from_lake.evaluation is not None
    assert from_file.evaluation is not None
    assert from_lake.evaluation.as_dict() == from_file.evaluation.as_dict()


def test_windows_split_in_two_score_the_rows_of_the_whole_and_stop_their_records_at_to(tmp_path: Path) -> None:
    """The label of a tick just before --to is known Δ later: the backtest reads on past --to
    (and emits nothing from --to on), so no tick near the split is lost."""
    capture = shared_data_dir() / "exchange_level2_ticker_matches_10products_2021-04-17_cryptofeed.jsonl"
    a, b, c = (parse_time(f"2021-04-17T16:{moment}Z") for moment in ("43:42", "43:52", "44:02"))

    def rows(window: Window, records: Path) -> Any:
        result = run_backtest(
            settings(), SourceSpec("capture", path=capture), window, [], records_dir=records, log_mlflow=False
        )
        assert result.evaluation is not None
        return result.evaluation

    whole, left, right = (
        rows(Window(a, c), tmp_path / "ac"),
        rows(Window(a, b), tmp_path / "ab"),
        rows(Window(b, c), tmp_path / "bc"),
    )
    key = lambda e: Counter(zip(e.t.tolist(), e.y.tolist(), strict=True))  # noqa: E731
    assert key(whole) == key(left) + key(right)
    assert whole.y.size == left.y.size + right.y.size > 1900
    assert left.t.max() == b - 100 * MS  # the last tick before --to is scored...
    labels = read_records(tmp_path / "ab" / "labels.avro", Label)
    assert max(label.t_event for label in labels) == b - 100 * MS  # ...with the label made after --to
    for name in ("book.top3", "features", "predictions"):
        assert all(record.ts_event < b for record in read_records(tmp_path / "ab" / f"{name}.avro")), name
    # Per symbol, the records of [A, B) are the start of those of [A, C).
    for name in ("book.top3", "features", "labels"):
        first, longer = read_records(tmp_path / "ab" / f"{name}.avro"), read_records(tmp_path / "ac" / f"{name}.avro")
        for symbol in {record.symbol for record in longer}:
            mine = [record for record in first if record.symbol == symbol]
            assert mine == [record for record in longer if record.symbol == symbol][: len(mine)], (name, symbol)
        assert 0 < len(first) < len(longer), name


def test_baselines_fit_in_sample_when_nothing_is_known_before_the_window(model: LoadedModel) -> None:
    result = run_backtest(settings(), SourceSpec("synthetic", seed=8, hours=1 / 60), Window(), [model])
    evaluation = result.evaluation
    assert evaluation is not None
    assert evaluation.baseline_fit_in_sample
    assert any("in-sample" in note for note in evaluation.notes)
    assert evaluation.scores["baseline: base_rate"].brier == pytest.approx(
        float(np.mean((evaluation.y - evaluation.y.mean()) ** 2))
    )


def test_the_cli_runs_a_synthetic_backtest_and_refuses_models_without_a_registry(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        main,
        ["backtest", "--source", "synthetic:2:0.01", "--output", str(tmp_path), "--no-progress"],
        env={"MLFLOW_TRACKING_URI": ""},
    )
    assert out.exit_code == 0, out.output
    assert "baseline: changed_last_delta" in out.output
    assert (tmp_path / "roc.png").exists()
    refused: Any = runner.invoke(
        main, ["backtest", "--source", "synthetic:2:0.01", "--model", "models:/x/1"], env={"MLFLOW_TRACKING_URI": ""}
    )
    assert refused.exit_code == 1
    assert "--model needs MLFLOW_TRACKING_URI" in refused.output
