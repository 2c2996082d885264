"""Training from DataFrames: the join, the time split with its gap, the fits, the gate."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import pytest

from quotewatch.domain.market import features as feature_spec
from quotewatch.domain.ml import evaluation as ev
from quotewatch.domain.ml.evaluation import Scores
from quotewatch.domain.ml.models import positive_probability
from quotewatch.domain.ml.statistics import Interval
from quotewatch.services.trainer.gate import UnscoredChampion, champion_of_another_spec, gate
from quotewatch.services.trainer.training import (
    GateThresholds,
    TrainingDataError,
    TrainingOptions,
    build_training_set,
    records_frame,
    time_split,
    train,
)
from tests.unit.services.trainer.market_data import DELTA_MS, synthetic_ticks

MS = 1_000_000


def frames(seconds: int = 300) -> tuple[pd.DataFrame, pd.DataFrame]:
    features, labels = synthetic_ticks(seconds)
    return records_frame(features), records_frame(labels)


def small_frames(
    ticks: int, labels_of: list[int] | None = None, spec: str = "spec-a"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    feature_rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    for k in range(ticks):
        t = k * 100 * MS
        feature_rows.append({"symbol": "A", "ts_event": t, "feature_spec_id": spec, "values": rng.normal(size=3)})
        label = labels_of[k] if labels_of is not None else int(k % 3 == 0)
        label_rows.append({"symbol": "A", "t_event": t, "ts_event": t + 500 * MS, "label": label})
    return pd.DataFrame(feature_rows), pd.DataFrame(label_rows)


def test_join_on_symbol_and_t_keeps_each_tick_once_and_one_spec() -> None:
    features, labels = small_frames(10)
    duplicated = pd.concat([features, features.iloc[:3]], ignore_index=True)
    other_spec = features.iloc[:2].assign(feature_spec_id="spec-old", ts_event=lambda f: f.ts_event + 10_000 * MS)
    unlabeled = features.iloc[:1].assign(ts_event=99_000 * MS)
    data = build_training_set(pd.concat([duplicated, other_spec, unlabeled], ignore_index=True), labels)
    assert data.feature_spec_id == "spec-a"
    assert data.dropped_other_spec == 2
    assert len(data.y) == 10
    assert data.t.tolist() == sorted(data.t.tolist())
    assert data.x.shape == (10, 3)
    assert data.feature_names == ("x0", "x1", "x2")
    np.testing.assert_array_equal(data.x[4], features.iloc[4]["values"])


def test_only_labels_synced_over_the_horizon_are_learnt() -> None:
    features, labels = small_frames(10)
    flags = [True, False, None, True, False, True, True, True, True, True]  # None: a row from before the flag
    data = build_training_set(features, labels.assign(synced_over_horizon=pd.array(flags, dtype="boolean")))
    assert data.t.tolist() == [k * 100 * MS for k in (0, 2, 3, 5, 6, 7, 8, 9)]
    assert len(build_training_set(features, labels).y) == 10, "no flag column: every label counts"


def test_real_feature_vectors_get_the_spec_names() -> None:
    features, labels = frames(30)
    data = build_training_set(features, labels)
    assert data.feature_spec_id == feature_spec.FEATURE_SPEC_ID
    assert data.feature_names == feature_spec.FEATURE_NAMES


def test_join_errors_are_clear() -> None:
    features, labels = small_frames(5)
    with pytest.raises(TrainingDataError, match="lack column"):
        build_training_set(features.drop(columns=["values"]), labels)
    with pytest.raises(TrainingDataError, match="nothing to train on"):
        build_training_set(features.iloc[:0], labels)
    with pytest.raises(TrainingDataError, match="has a label"):
        build_training_set(features, labels.assign(t_event=labels.t_event + 50 * MS))


@pytest.mark.parametrize("gap_ms", [None, 100, 2000])
def test_split_is_by_time_with_a_gap_of_at_least_delta(gap_ms: int | None) -> None:
    data = build_training_set(*small_frames(2000))
    options = TrainingOptions(delta_ms=DELTA_MS, gap_ms=gap_ms, min_train_rows=10, min_test_rows=10)
    split = time_split(data, options)
    gap_ns = max(gap_ms or DELTA_MS, DELTA_MS) * MS
    assert split.gap_ns == gap_ns
    last_train, first_test = data.t[split.train].max(), data.t[split.test].min()
    # A training label is known at t + Δ: it must be known before the test window starts.
    assert last_train + DELTA_MS * MS < first_test
    assert first_test - last_train >= gap_ns
    assert not (split.train & split.test).any()
    assert split.test.sum() == pytest.approx(0.25 * len(data.y), abs=2)


def test_split_refuses_too_little_data_and_one_class() -> None:
    with pytest.raises(TrainingDataError, match="too little data"):
        time_split(build_training_set(*small_frames(100)), TrainingOptions(delta_ms=DELTA_MS))
    ones_at_the_end = [0] * 300 + [1] * 100
    with pytest.raises(TrainingDataError, match="training window has one class only"):
        time_split(
            build_training_set(*small_frames(400, ones_at_the_end)),
            TrainingOptions(delta_ms=DELTA_MS, min_train_rows=10, min_test_rows=10),
        )


@pytest.fixture(scope="module")
def trained() -> Any:
    data = build_training_set(*frames())
    return train(data, TrainingOptions(delta_ms=DELTA_MS, xgb_n_estimators=60, xgb_threads=1))


def test_both_models_learn_and_the_scores_are_those_of_their_own_predictions(trained: Any) -> None:
    result = trained
    assert set(result.candidates) == {"lr", "xgb"}
    y_test = result.y_test
    for candidate in result.candidates.values():
        assert candidate.p_test.shape == y_test.shape
        # p_test is what the registered model serves: the model's p through its calibrator.
        assert candidate.calibrator is not None
        assert candidate.params["calibration"] == candidate.calibrator.method
        raw = positive_probability(candidate.model, result.x_test)
        np.testing.assert_array_equal(candidate.p_test, candidate.calibrator.apply(raw))
        assert candidate.scores == ev.score(y_test, candidate.p_test)
        assert candidate.lift.has_interval
        assert candidate.block_length >= 5
        assert candidate.scores.roc_auc is not None
        assert candidate.scores.roc_auc > 0.6
    lr = result.candidates["lr"]
    assert list(lr.model.named_steps) == ["scaler", "logistic"], "the scaler ships inside the model"
    best_baseline_auc = max(s.roc_auc for s in result.baselines.values() if s.roc_auc is not None)
    assert result.best("auc").scores.roc_auc > best_baseline_auc
    assert result.baselines[ev.BASELINE_BASE_RATE].roc_auc == 0.5


def test_training_is_deterministic(trained: Any) -> None:
    again = train(trained.data, TrainingOptions(delta_ms=DELTA_MS, xgb_n_estimators=60, xgb_threads=1))
    for kind in ("lr", "xgb"):
        np.testing.assert_array_equal(again.candidates[kind].p_test, trained.candidates[kind].p_test)


def test_calibration_is_chosen_on_the_training_window_only(trained: Any) -> None:
    """Flipping every test label changes the test scores, not the calibrator nor the model."""
    data = trained.data
    flipped = dataclasses.replace(data, y=np.where(trained.split.test, 1 - data.y, data.y))
    options = TrainingOptions(delta_ms=DELTA_MS, xgb_n_estimators=60, xgb_threads=1)
    again = train(flipped, options, kinds=("lr",))
    assert again.candidates["lr"].calibrator == trained.candidates["lr"].calibrator
    assert again.candidates["lr"].calibration_note == trained.candidates["lr"].calibration_note
    assert again.candidates["lr"].scores != trained.candidates["lr"].scores


def test_baselines_only_use_training_labels_for_their_frequencies(trained: Any) -> None:
    fit = trained.baseline_fit
    data = trained.data
    train_labels = data.labels[data.labels.t_event < trained.split.train_end_ns]
    assert fit.base_rate == pytest.approx(train_labels.label.mean())


def scores(auc: float | None, brier: float, log_loss: float = 0.3) -> Scores:
    return Scores(n=100, base_rate=0.2, roc_auc=auc, brier=brier, log_loss=log_loss, balanced_accuracy=0.6)


BASELINES = {ev.BASELINE_BASE_RATE: scores(0.5, 0.16), ev.BASELINE_CHANGED_LAST_DELTA: scores(0.62, 0.15)}
CLEAR_LIFT = Interval(0.08, 0.06, 0.10)
"""An AUC lift of +0.08 over the best baseline whose 95 % interval is [+0.06, +0.10]."""


def test_gate_passes_a_candidate_that_beats_baselines_and_champion() -> None:
    decision = gate(
        scores(0.70, 0.12), BASELINES, scores(0.66, 0.13), GateThresholds(min_auc_lift=0.05), "7", lift=CLEAR_LIFT
    )
    assert decision.passed
    assert decision.reasons == (
        "AUC 0.7000 vs the best naive baseline (changed_last_delta AUC 0.6200): lift +0.0800, 95 % interval "
        "[+0.0600, +0.1000]",
        "beats champion v7 on test auc: 0.7000 vs 0.6600",
    )


def test_gate_reads_the_lower_bound_of_the_lift_not_the_point_estimate() -> None:
    """+0.08 is above the required +0.05, but the interval reaches down to +0.03: not shown at 95 %."""
    uncertain = Interval(0.08, 0.03, 0.13)
    decision = gate(scores(0.70, 0.12), BASELINES, None, GateThresholds(min_auc_lift=0.05), lift=uncertain)
    assert not decision.passed
    assert decision.reasons == (
        "AUC lift +0.0800 over the best naive baseline (changed_last_delta AUC 0.6200) has a 95 % lower bound of "
        "+0.0300, not above +0.0500",
    )
    assert gate(scores(0.70, 0.12), BASELINES, None, GateThresholds(min_auc_lift=0.02), lift=uncertain).passed
    # The default threshold 0: the interval must exclude 0.
    assert not gate(scores(0.70, 0.12), BASELINES, None, GateThresholds(), lift=Interval(0.08, -0.01, 0.15)).passed


def test_gate_refuses_a_lift_without_an_interval() -> None:
    decision = gate(scores(0.90, 0.12), BASELINES, None, GateThresholds(), lift=Interval(0.28))
    assert not decision.passed
    assert decision.reasons == (
        "AUC lift +0.2800 over the best naive baseline (changed_last_delta AUC 0.6200) has no 95 % interval: too few "
        "test rows or positives to tell it from chance",
    )


def test_gate_refuses_a_worse_model_and_says_why() -> None:
    decision = gate(
        scores(0.64, 0.17),
        BASELINES,
        scores(0.66, 0.13),
        GateThresholds(min_auc=0.55, min_auc_lift=0.05),
        "7",
        lift=Interval(0.02, -0.01, 0.05),
    )
    assert not decision.passed
    assert decision.reasons == (
        "AUC lift +0.0200 over the best naive baseline (changed_last_delta AUC 0.6200) has a 95 % lower bound of "
        "-0.0100, not above +0.0500",
        "test Brier 0.1700 is not below 1 x the base-rate Brier (0.160000)",
        "does not beat champion v7 on test auc: 0.6400 vs 0.6600",
    )


def test_gate_on_a_lower_is_better_metric_and_without_champion() -> None:
    thresholds = GateThresholds(metric="log_loss")
    lift = CLEAR_LIFT
    assert gate(
        scores(0.7, 0.1, log_loss=0.25), BASELINES, scores(0.7, 0.1, log_loss=0.3), thresholds, lift=lift
    ).passed
    refused = gate(scores(0.7, 0.1, log_loss=0.35), BASELINES, scores(0.7, 0.1, log_loss=0.3), thresholds, lift=lift)
    assert refused.reasons == ("does not beat the champion on test log_loss: 0.3500 vs 0.3000",)
    assert gate(scores(0.7, 0.1), BASELINES, None, thresholds, lift=lift).reasons[-1] == "no champion to beat"
    assert not gate(scores(None, 0.1), BASELINES, None, thresholds, lift=Interval(None)).passed


# -- feature-spec upgrades and champions that cannot be scored -----------------------------------------


def upgraded_frames(
    old_ticks: int = 600, new_ticks: int = 400, old_spec: str = "spec-old", new_spec: str = "spec-new"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A lake across a feature-spec upgrade: ``old_ticks`` of the old spec (3 values), then the new (4).

    The label is learnable from the first value, so a model beats the naive baselines.
    """
    rng = np.random.default_rng(1)
    feature_rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    for k in range(old_ticks + new_ticks):
        t = k * 100 * MS
        upgraded = k >= old_ticks
        values = rng.normal(size=4 if upgraded else 3)
        spec = new_spec if upgraded else old_spec
        feature_rows.append({"symbol": "A", "ts_event": t, "feature_spec_id": spec, "values": values})
        label_rows.append({"symbol": "A", "t_event": t, "ts_event": t + 500 * MS, "label": int(values[0] > 0.3)})
    return pd.DataFrame(feature_rows), pd.DataFrame(label_rows)


def test_the_training_set_is_of_the_spec_of_the_newest_vectors_not_the_most_frequent() -> None:
    features, labels = upgraded_frames(old_ticks=600, new_ticks=400)
    data = build_training_set(features, labels)
    assert (data.feature_spec_id, data.current_feature_spec_id) == ("spec-new", "spec-new")
    assert data.dropped_other_spec == 600
    assert data.x.shape == (400, 4)
    older = build_training_set(features, labels, feature_spec_id="spec-old")
    assert (older.feature_spec_id, older.current_feature_spec_id) == ("spec-old", "spec-new")
    assert older.x.shape == (600, 3)


def test_when_specs_share_the_newest_instant_the_one_that_appeared_last_wins() -> None:
    old, labels = small_frames(100, spec="z-old")
    new = pd.DataFrame(
        [{"symbol": "A", "ts_event": t, "feature_spec_id": "a-new", "values": np.zeros(4)} for t in old.ts_event[60:]]
    )
    data = build_training_set(pd.concat([old, new], ignore_index=True), labels)
    assert data.current_feature_spec_id == data.feature_spec_id == "a-new"


UNLOADABLE = UnscoredChampion("7", "champion v7 exists but cannot be loaded (503)", replaceable=False)
RETIRED = UnscoredChampion("7", "champion v7 uses a spec the stream no longer carries", replaceable=True)


def test_gate_refuses_when_a_champion_exists_but_could_not_be_scored_and_may_be_better() -> None:
    good = scores(0.70, 0.12)
    assert gate(good, BASELINES, None, GateThresholds(), None, lift=CLEAR_LIFT).passed, "the thresholds alone pass"
    decision = gate(good, BASELINES, UNLOADABLE, GateThresholds(), "7", lift=CLEAR_LIFT)
    assert not decision.passed
    assert decision.reasons == (UNLOADABLE.reason,)


def test_gate_judges_on_the_thresholds_alone_a_champion_that_cannot_serve() -> None:
    decision = gate(scores(0.70, 0.12), BASELINES, RETIRED, GateThresholds(), "7", lift=CLEAR_LIFT)
    assert decision.passed
    assert decision.reasons[-1] == RETIRED.reason
    below = Interval(-0.07, -0.09, -0.05)
    assert not gate(scores(0.55, 0.12), BASELINES, RETIRED, GateThresholds(), "7", lift=below).passed, (
        "below a baseline"
    )


@pytest.fixture(scope="module")
def upgraded() -> Any:
    """A candidate of the new spec, trained after the upgrade (test window to 99.9 s)."""
    return train(build_training_set(*upgraded_frames()), TrainingOptions(delta_ms=DELTA_MS), kinds=("lr",))


def test_a_champion_of_the_spec_the_stream_left_is_replaced_on_the_thresholds(upgraded: Any) -> None:
    verdict = champion_of_another_spec("7", "spec-old", 59_900 * MS, upgraded)
    assert verdict.replaceable
    assert verdict.reason == (
        "champion v7 uses feature spec spec-old, the candidate spec-new, so they cannot be compared; the stream has "
        "moved on to spec-new (the newest vectors are of that spec, and the candidate's data run to "
        "1970-01-01T00:01:39.900+00:00, past champion v7's, which end at 1970-01-01T00:00:59.900+00:00), so "
        "champion v7 scores no live vector: the candidate replaces it on the thresholds alone"
    )
    assert gate(
        upgraded.best("auc").scores, upgraded.baselines, verdict, GateThresholds(), "7", lift=upgraded.best("auc").lift
    ).passed


def test_a_champion_with_data_as_new_as_the_candidates_is_not_replaced_by_another_spec(upgraded: Any) -> None:
    """E.g. trained with --to before the champion's data: the stream may carry the champion's spec."""
    verdict = champion_of_another_spec("7", "spec-newer", 99_900 * MS, upgraded)
    assert not verdict.replaceable
    assert "the candidate's data end at 1970-01-01T00:01:39.900+00:00, not after champion v7's" in verdict.reason
    assert "the champion stays" in verdict.reason
    assert not gate(
        upgraded.best("auc").scores, upgraded.baselines, verdict, GateThresholds(), "7", lift=upgraded.best("auc").lift
    ).passed


def test_a_champion_of_another_spec_without_a_data_window_is_not_replaced(upgraded: Any) -> None:
    verdict = champion_of_another_spec("7", "spec-old", None, upgraded)
    assert not verdict.replaceable
    assert "has no data window (tag quotewatch.test_window_ns)" in verdict.reason
    assert "move the alias by hand if spec-old is retired" in verdict.reason


def test_a_candidate_of_an_older_spec_than_the_streams_does_not_replace_a_champion_of_another_spec() -> None:
    features, labels = upgraded_frames(old_ticks=1000, new_ticks=100)
    older = train(build_training_set(features, labels, "spec-old"), TrainingOptions(delta_ms=DELTA_MS), kinds=("lr",))
    verdict = champion_of_another_spec("7", "spec-new", 0, older)
    assert not verdict.replaceable
    assert "not the one the stream carries now (spec-new, that of the newest vectors)" in verdict.reason


def test_a_champion_without_a_feature_spec_can_serve_nothing_and_is_replaceable(upgraded: Any) -> None:
    verdict = champion_of_another_spec("7", None, None, upgraded)
    assert verdict.replaceable
    assert verdict.reason.startswith("champion v7 declares no feature spec")
