"""Live metrics: the join of predictions with late (or early) labels, and rolling metrics equal to offline ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotewatch.domain.ml import evaluation as ev
from quotewatch.domain.ml.live_metrics import LiveMetricsTracker, ModelKey

CHAMPION = ModelKey("quotewatch", "3", "CHAMPION")
CHALLENGER = ModelKey("quotewatch", "4", "CHALLENGER")


def offline(pairs: list[tuple[int, float]]) -> ev.Scores:
    return ev.score([y for y, _ in pairs], [p for _, p in pairs])


@settings(max_examples=40)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]), st.booleans()), max_size=120),
    st.integers(1, 50),
)
def test_rolling_metrics_equal_offline_metrics_on_the_same_window(
    ticks: list[tuple[int, float, bool]], window: int
) -> None:
    """Tied scores on purpose: tree models give few distinct probabilities."""
    tracker = LiveMetricsTracker(window=window)
    joined: list[tuple[int, float]] = []
    for t, (label, p, label_first) in enumerate(ticks):
        if label_first:
            assert tracker.add_label("BTC-USD", t, label) == 0
            tracker.add_predictions("BTC-USD", t, [(CHAMPION, p)])
        else:
            tracker.add_predictions("BTC-USD", t, [(CHAMPION, p)])
            assert tracker.add_label("BTC-USD", t, label) == 1
        joined.append((label, p))
    summary = tracker.summary()
    if not ticks:
        assert summary == ()
        return
    (record,) = summary
    expected = offline(joined[-window:])
    assert tracker.window_pairs(CHAMPION) == joined[-window:]
    assert record.n_labels == len(ticks)
    assert record.auc == (pytest.approx(expected.roc_auc) if expected.roc_auc is not None else None)
    assert record.brier == pytest.approx(expected.brier, abs=1e-12)
    assert record.balanced_accuracy == pytest.approx(expected.balanced_accuracy, abs=1e-12)
    assert record.base_rate == pytest.approx(expected.base_rate, abs=1e-12)


def test_constant_scores_have_auc_one_half() -> None:
    tracker = LiveMetricsTracker(window=10)
    for t, label in enumerate([0, 1, 0, 1, 1]):
        tracker.add_predictions("A", t, [(CHAMPION, 0.5)])
        tracker.add_label("A", t, label)
    assert tracker.summary()[0].auc == 0.5


def test_a_label_joins_every_model_of_its_tick_and_champion_comes_first() -> None:
    tracker = LiveMetricsTracker()
    tracker.add_predictions("A", 1, [(CHAMPION, 0.9), (CHALLENGER, 0.2)])
    tracker.add_predictions("B", 1, [(CHAMPION, 0.1), (CHALLENGER, 0.8)])
    assert tracker.add_label("A", 1, 1) == 2
    assert tracker.add_label("B", 1, 0) == 2
    assert tracker.add_label("C", 1, 0) == 0, "no prediction yet: the label waits"
    summary = tracker.summary()
    assert [(r.model_role, r.model_version) for r in summary] == [("CHAMPION", "3"), ("CHALLENGER", "4")]
    assert summary[0].auc == 1.0
    assert summary[1].auc == 0.0
    assert tracker.joined == 4


def test_only_labels_synced_over_the_horizon_count() -> None:
    tracker = LiveMetricsTracker()
    tracker.add_predictions("A", 1, [(CHAMPION, 0.9), (CHALLENGER, 0.2)])
    assert tracker.add_label("A", 1, 1, synced=False) == 0, "a resync inside [t, t + Δ]: nothing joins"
    assert tracker.excluded_unsynced == 2
    assert tracker.add_label("A", 2, 0, synced=False) == 0, "the unsynced label arrives first"
    tracker.add_predictions("A", 2, [(CHAMPION, 0.4)])
    assert tracker.excluded_unsynced == 3
    tracker.add_predictions("A", 3, [(CHAMPION, 0.7)])
    assert tracker.add_label("A", 3, 1) == 1
    assert tracker.joined == 1
    assert [(r.model_role, r.n_labels) for r in tracker.summary()] == [("CHAMPION", 1)]


def test_buffers_are_bounded_and_drops_are_counted() -> None:
    tracker = LiveMetricsTracker(buffer_max=3)
    for t in range(5):
        tracker.add_predictions("A", t, [(CHAMPION, 0.5)])
    assert tracker.dropped_predictions == 2
    assert tracker.add_label("A", 0, 1) == 0, "the oldest predictions were dropped"
    assert tracker.add_label("A", 4, 1) == 1
    for t in range(10, 15):
        tracker.add_label("B", t, 1)
    assert tracker.dropped_labels == 3, "A0 and B10, B11 made room for B12..B14"


def test_only_the_most_recent_models_are_tracked() -> None:
    tracker = LiveMetricsTracker(max_models=2)
    for version in range(4):
        model = ModelKey("m", str(version), "CHAMPION")
        tracker.add_predictions("A", version, [(model, 0.5)])
        tracker.add_label("A", version, 1)
    assert [r.model_version for r in tracker.summary()] == ["3", "2"]


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        LiveMetricsTracker(window=0)


def test_summary_is_cached_until_the_next_join() -> None:
    tracker = LiveMetricsTracker()
    tracker.add_predictions("A", 1, [(CHAMPION, 0.5)])
    tracker.add_label("A", 1, 1)
    first = tracker.summary()
    assert tracker.summary() is first
    tracker.add_predictions("A", 2, [(CHAMPION, 0.5)])
    assert tracker.summary() is first, "a prediction without a label changes no metric"
    tracker.add_label("A", 2, 0)
    assert tracker.summary() is not first
    base_rate = tracker.summary()[0].base_rate
    assert base_rate is not None
    assert np.isclose(base_rate, 0.5)
