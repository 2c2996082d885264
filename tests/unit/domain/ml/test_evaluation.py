"""Offline metrics against scikit-learn, and the naive baselines against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from quotewatch.domain.ml import evaluation as ev

MS = 1_000_000

outcomes_and_probabilities = st.integers(min_value=1, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n),
    )
)


@given(outcomes_and_probabilities)
def test_metrics_equal_scikit_learn(data: tuple[list[int], list[float]]) -> None:
    y, p = data
    scores = ev.score(y, p)
    assert scores.n == len(y)
    assert scores.base_rate == pytest.approx(np.mean(y))
    assert scores.brier == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    assert scores.log_loss == pytest.approx(skm.log_loss(y, p, labels=[0, 1]), rel=1e-12)
    if len(set(y)) == 2:
        assert scores.brier == pytest.approx(skm.brier_score_loss(y, p))
        assert scores.roc_auc == pytest.approx(skm.roc_auc_score(y, p))
        decisions = (np.array(p) >= 0.5).astype(int)
        assert scores.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y, decisions))
    else:
        assert scores.roc_auc is None


@given(
    st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])), min_size=2, max_size=300)
)
def test_roc_auc_with_many_ties_equals_scikit_learn(pairs: list[tuple[int, float]]) -> None:
    # Few distinct scores: most rows sit in tie groups, which the rank sum shares out.
    y = [outcome for outcome, _ in pairs]
    p = [probability for _, probability in pairs]
    if len(set(y)) < 2:
        assert ev.roc_auc(y, p) is None
    else:
        assert ev.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), rel=1e-12, abs=1e-15)


def test_roc_auc_of_a_large_window_equals_scikit_learn() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200_000)
    p = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.2, y.size), 0, 1), 3)  # many ties, some at 0 and 1
    assert ev.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), rel=1e-12)


def test_roc_auc_refuses_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        ev.roc_auc([0, 1], [0.1, math.nan])


def test_tied_scores_count_one_half() -> None:
    assert ev.roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)


def test_one_class_balanced_accuracy_is_that_class_recall() -> None:
    assert ev.balanced_accuracy([1, 1, 1, 1], [0.9, 0.8, 0.2, 0.6]) == 0.75
    assert ev.balanced_accuracy([], []) is None


def test_invalid_inputs_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="2 outcomes but 3 probabilities"):
        ev.score([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="outcomes must be 0 or 1"):
        ev.score([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite and within"):
        ev.score([0, 1], [0.1, math.nan])
    with pytest.raises(ValueError, match="finite and within"):
        ev.score([0, 1], [0.1, 1.5])


def test_log_loss_is_finite_for_certain_wrong_predictions() -> None:
    loss = ev.log_loss([1, 0], [0.0, 1.0])
    assert loss is not None
    assert math.isfinite(loss)
    assert loss == -math.log(np.finfo(np.float64).eps)


@pytest.mark.parametrize(
    "p",
    [
        [0.0, 1.0, 0.0, 1.0],  # certain and right or wrong
        [1e-17, 1 - 1e-17, 1e-300, 5e-324],  # inside the clip on both sides
        [2.220446049250313e-16, 1 - 2.220446049250313e-16, 1e-15, 1 - 1e-15],  # at and just past eps
        [0.3, 0.999999999999999, 1e-16, 0.5],
    ],
)
def test_log_loss_clips_as_scikit_learn_does_at_exactly_zero_and_one(p: list[float]) -> None:
    for y in ([1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]):
        assert ev.log_loss(y, p) == skm.log_loss(y, p, labels=[0, 1]), (y, p)
        assert ev.score(y, p).log_loss == skm.log_loss(y, p, labels=[0, 1])


def test_finite_items_skip_undefined_metrics() -> None:
    scores = ev.score([1, 1], [0.5, 0.7])
    items = scores.finite_items("test_")
    assert "test_roc_auc" not in items
    assert items["test_base_rate"] == 1.0
    assert items["test_n"] == 2.0


# -- baselines --------------------------------------------------------------------------------------


def grid(symbol: str, ticks: int) -> tuple[list[str], list[int]]:
    return [symbol] * ticks, [k * 100 * MS for k in range(ticks)]


def test_previous_label_is_the_label_of_t_minus_delta_of_the_same_symbol() -> None:
    a_sym, a_t = grid("A", 8)
    b_sym, b_t = grid("B", 8)
    y_a = [1, 0, 0, 0, 0, 1, 0, 0]
    y_b = [0, 0, 0, 0, 0, 0, 0, 1]
    symbols, t, y = a_sym + b_sym, a_t + b_t, y_a + y_b
    previous = ev.previous_label(symbols, t, y, delta_ms=500)
    # Δ = 5 ticks: row k of A sees A's label k - 5; the first 5 rows of each symbol have none.
    assert np.isnan(previous[:5]).all()
    assert previous[5:8].tolist() == [1.0, 0.0, 0.0]
    assert np.isnan(previous[8:13]).all()
    assert previous[13:16].tolist() == [0.0, 0.0, 0.0]


def test_previous_label_needs_the_exact_tick_not_a_neighbour() -> None:
    previous = ev.previous_label(["A", "A"], [0, 600 * MS], [1, 0], delta_ms=500)
    assert np.isnan(previous).all()


@given(st.lists(st.integers(0, 1), min_size=1, max_size=80), st.integers(1, 6), st.integers(1, 20))
def test_rolling_counts_equal_a_direct_count(y: list[int], delta_ticks: int, window_ticks: int) -> None:
    symbols, t = grid("A", len(y))
    sums, counts = ev.rolling_counts(symbols, t, y, delta_ms=delta_ticks * 100, window_ms=window_ticks * 100)
    for k in range(len(y)):
        known = [y[j] for j in range(len(y)) if k - delta_ticks - window_ticks <= j <= k - delta_ticks]
        assert counts[k] == len(known)
        assert sums[k] == sum(known)


def test_baselines_use_only_labels_known_at_t() -> None:
    symbols, t = grid("A", 40)
    y = [k % 2 for k in range(40)]
    fit = ev.fit_baselines(symbols, t, y, delta_ms=200, window_ms=1000)
    assert fit.base_rate == 0.5
    # Δ = 2 ticks: the label of t - Δ has the same parity as t's, so it predicts y perfectly.
    assert fit.p_after_change == 1.0
    assert fit.p_after_no_change == 0.0
    p = ev.baseline_probabilities(fit, symbols, t, y)
    changed = p[ev.BASELINE_CHANGED_LAST_DELTA]
    assert changed[:2].tolist() == [0.5, 0.5]  # nothing known yet: the base rate
    assert changed[2:].tolist() == [float(v) for v in y[2:]]
    assert (p[ev.BASELINE_BASE_RATE] == 0.5).all()
    rolling = p[ev.BASELINE_ROLLING_FREQUENCY]
    assert rolling[0] == 0.5
    # t = 12: labels of ticks 0..10 are known (11 labels, 5 positive), shrunk by one pseudo-count.
    assert rolling[12] == pytest.approx((5 + 0.5) / (11 + 1))
    # A label changed after t must not change the baselines at t (no look-ahead).
    later = list(y)
    later[30] = 1 - later[30]
    p_later = ev.baseline_probabilities(fit, symbols, t, later)
    for name in ev.BASELINES:
        assert np.array_equal(p_later[name][:32], p[name][:32])


def test_fit_baselines_refuses_no_labels() -> None:
    with pytest.raises(ValueError, match="no labels"):
        ev.fit_baselines([], [], [], delta_ms=500)
