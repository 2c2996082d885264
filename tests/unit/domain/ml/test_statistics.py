"""Walk-forward folds, the Politis-White block length, the moving-block bootstrap and its paired lifts."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from quotewatch.domain.ml import evaluation, statistics
from quotewatch.domain.ml.statistics import (
    BEST_MODEL,
    Interval,
    block_length,
    bootstrap,
    horizon_rows,
    moving_block_counts,
    politis_white_length,
    walk_forward_folds,
    weighted_auc,
)

MS = 1_000_000


# -- walk-forward ---------------------------------------------------------------------------------


def test_walk_forward_folds_are_consecutive_expanding_and_keep_the_gap() -> None:
    folds = walk_forward_folds(0, 999, folds=4, gap_ns=20, initial_train_fraction=0.4)
    assert [(f.test_start_ns, f.test_end_ns) for f in folds] == [(400, 550), (550, 700), (700, 850), (850, 1000)]
    assert all(f.train_start_ns == 0 and f.train_end_ns == f.test_start_ns - 20 and f.gap_ns == 20 for f in folds)
    t = np.arange(1000, dtype=np.int64)
    tested = np.zeros(1000, dtype=int)
    for fold in folds:
        train, test = fold.train_mask(t), fold.test_mask(t)
        assert not (train & test).any()
        assert t[train].max() + 20 < t[test].min() + 1  # the last training tick is gap before the test window
        tested += test
    assert (tested[400:] == 1).all(), "the test windows tile the end, each tick once"
    assert (tested[:400] == 0).all(), "the initial training stretch is never tested"


@pytest.mark.parametrize(("folds", "gap", "fraction"), [(0, 1, 0.4), (3, -1, 0.4), (3, 1, 0.0), (3, 1, 1.0)])
def test_walk_forward_rejects_nonsense(folds: int, gap: int, fraction: float) -> None:
    with pytest.raises(ValueError, match=r"fold|gap|fraction"):
        walk_forward_folds(0, 100, folds=folds, gap_ns=gap, initial_train_fraction=fraction)


# -- block length ---------------------------------------------------------------------------------


def ar1(phi: float, n: int, seed: int) -> NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=n)
    x = np.empty(n)
    x[0] = noise[0] / np.sqrt(1 - phi**2)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + noise[i]
    return x


def test_politis_white_finds_the_theoretical_block_length_of_an_ar1() -> None:
    """For AR(1) with coefficient phi the optimal circular-block length is (6 phi^2 n / (1 - phi^2)^2)^(1/3).

    (g = sum |k| gamma_k = 2 phi / ((1 - phi)^2 (1 - phi^2)), sigma^2 = 1 / (1 - phi)^2, D = 4/3 sigma^4,
    b = (2 g^2 n / D)^(1/3).) phi = 0.9, n = 20,000: 139 rows.
    """
    n, phi = 20_000, 0.9
    theory = (6 * phi**2 * n / (1 - phi**2) ** 2) ** (1 / 3)
    estimates = [politis_white_length(ar1(phi, n, seed)) for seed in range(3)]
    assert theory == pytest.approx(139.1, abs=0.1)
    for estimate in estimates:
        assert estimate is not None
        assert 0.6 * theory < estimate < 1.6 * theory


def test_block_length_takes_the_most_persistent_series_and_the_horizon_floor() -> None:
    rng = np.random.default_rng(1)
    white = rng.normal(size=5_000)
    persistent = ar1(0.95, 5_000, 2)
    short = politis_white_length(white)
    assert short is not None
    assert short < 5
    longest = block_length([white, persistent])
    assert longest == block_length([persistent]) > 20
    assert block_length([white], minimum=25) == 25
    assert block_length([np.zeros(100), np.ones(3)], minimum=5) == 5, "undefined series are skipped"


def test_horizon_rows_counts_symbols_sharing_a_tick() -> None:
    one = np.arange(100, dtype=np.int64) * 100 * MS
    assert horizon_rows(one, delta_ms=500, tick_ms=100) == 5
    two = np.repeat(one, 2)
    assert horizon_rows(two, delta_ms=500, tick_ms=100) == 10


# -- resampling and weighted metrics ------------------------------------------------------------------


def test_a_moving_block_resample_is_n_rows_of_whole_blocks() -> None:
    rng = np.random.default_rng(3)
    for n, length in ((100, 7), (50, 50), (10, 1)):
        counts = moving_block_counts(n, length, rng)
        assert counts.sum() == n
        assert counts.shape == (n,)
    assert (moving_block_counts(50, 50, rng) == 1).all(), "one block of the whole window is the window"
    # Blocks of 10 of 1,000 rows: the resampled rows come in runs; rows 0 and n-1 are each in one start only.
    hits = np.zeros(1_000)
    for _ in range(400):
        hits += moving_block_counts(1_000, 10, rng)
    assert hits[500] > 5 * hits[0], "edge rows are under-sampled by a moving-block bootstrap, middle rows are not"
    with pytest.raises(ValueError, match="block length"):
        moving_block_counts(10, 11, rng)


def test_weighted_auc_is_the_auc_of_the_expanded_sample_ties_included() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=300)
    p = np.round(rng.random(300), 1)  # many ties
    ranked = statistics._Ranked.of(p)
    assert weighted_auc(ranked, y, np.ones(300, dtype=np.int64)) == pytest.approx(evaluation.roc_auc(y, p), abs=1e-15)
    weights = rng.integers(0, 4, size=300)
    expanded = np.repeat(np.arange(300), weights)
    assert weighted_auc(ranked, y, weights) == pytest.approx(evaluation.roc_auc(y[expanded], p[expanded]), abs=1e-15)
    assert weighted_auc(ranked, np.ones(300, dtype=np.int64), weights) is None


# -- the bootstrap -------------------------------------------------------------------------------------


def dependent_sample(n: int, seed: int, signal: float) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Labels from a persistent latent state, and a model that sees the state with noise."""
    rng = np.random.default_rng(seed)
    state = ar1(0.97, n, seed)
    y = (state + rng.normal(scale=1.0, size=n) > 0).astype(np.int64)
    p = 1 / (1 + np.exp(-(signal * state + rng.normal(size=n))))
    return y, p


def test_point_estimates_are_the_plain_metrics_of_the_rows() -> None:
    y, p = dependent_sample(2_000, 5, 1.0)
    result = bootstrap(y, {"m": p}, {"base": np.full(2_000, y.mean())}, block_length=50, resamples=50)
    plain = evaluation.score(y, p)
    got = result.metrics["m"]
    assert got["roc_auc"].estimate == pytest.approx(plain.roc_auc, abs=1e-12)
    assert got["brier"].estimate == pytest.approx(plain.brier, abs=1e-12)
    assert got["log_loss"].estimate == pytest.approx(plain.log_loss, abs=1e-12)
    assert got["balanced_accuracy"].estimate == pytest.approx(plain.balanced_accuracy, abs=1e-12)
    assert plain.roc_auc is not None
    assert result.lifts["m"].estimate == pytest.approx(plain.roc_auc - 0.5, abs=1e-12)
    for interval in got.values():
        assert interval.low is not None
        assert interval.high is not None
        assert interval.low <= interval.high


def test_blocks_widen_the_interval_of_dependent_data() -> None:
    """Resampling single rows of an autocorrelated series understates its variance; blocks do not."""
    y, p = dependent_sample(4_000, 6, 1.0)
    base = {"base": np.full(y.size, 0.5)}

    def width(length: int) -> float:
        interval = bootstrap(y, {"m": p}, base, block_length=length, resamples=300, seed=1).metrics["m"]["brier"]
        assert interval.low is not None
        assert interval.high is not None
        return interval.high - interval.low

    chosen = block_length([y, p, (p - y) ** 2])
    assert chosen > 10
    assert width(chosen) > 2 * width(1)


def test_the_lift_is_paired_identical_curves_have_a_lift_of_exactly_zero() -> None:
    y, p = dependent_sample(3_000, 7, 1.0)
    result = bootstrap(y, {"same": p}, {"baseline": p.copy()}, block_length=60, resamples=200)
    lift = result.lifts["same"]
    assert (lift.estimate, lift.low, lift.high) == (0.0, 0.0, 0.0)
    assert not lift.above(0.0), "a model equal to the baseline does not beat it"
    auc = result.metrics["same"]["roc_auc"]
    assert auc.low is not None
    assert auc.high is not None
    assert auc.high - auc.low > 0.02, "while its AUC is uncertain"


def test_a_model_that_sees_the_state_beats_a_baseline_that_does_not_and_noise_does_not() -> None:
    y, informed = dependent_sample(6_000, 8, 3.0)
    rng = np.random.default_rng(9)
    noise = rng.random(y.size)
    baselines = {"base rate": np.full(y.size, y.mean()), "noise": rng.random(y.size)}
    length = block_length([y, informed, (informed - y) ** 2], minimum=5)
    result = bootstrap(y, {"informed": informed, "noise model": noise}, baselines, block_length=length, resamples=300)
    assert result.lifts["informed"].above(0.10)
    assert not result.lifts["noise model"].above(0.0)
    assert result.lifts[BEST_MODEL].above(0.10)
    assert result.best_baseline in baselines
    assert result.blocks >= statistics.MIN_BLOCKS


def test_too_few_blocks_or_positives_give_no_interval() -> None:
    y, p = dependent_sample(200, 10, 1.0)
    short = bootstrap(y, {"m": p}, {"b": np.full(200, 0.5)}, block_length=50)
    assert short.resamples == 0
    assert not short.metrics["m"]["roc_auc"].has_interval
    assert short.metrics["m"]["roc_auc"].estimate is not None, "the point estimate is still given"
    assert "fewer than 10" in short.notes[0]
    rare = np.zeros(2_000, dtype=np.int64)
    rare[[100, 101, 102]] = 1  # one change: most resamples miss it
    result = bootstrap(rare, {"m": np.linspace(0, 1, 2_000)}, {"b": np.full(2_000, 0.01)}, block_length=20)
    assert result.metrics["m"]["brier"].has_interval
    assert not result.metrics["m"]["roc_auc"].has_interval
    assert not result.lifts["m"].has_interval
    assert not result.lifts["m"].above()


def test_the_bootstrap_is_reproducible_and_checks_its_input() -> None:
    y, p = dependent_sample(1_000, 11, 1.0)
    first = bootstrap(y, {"m": p}, {"b": np.full(1_000, 0.5)}, block_length=20, resamples=100, seed=3)
    again = bootstrap(y, {"m": p}, {"b": np.full(1_000, 0.5)}, block_length=20, resamples=100, seed=3)
    assert first.metrics == again.metrics
    assert first.lifts == again.lifts
    with pytest.raises(ValueError, match="probabilities"):
        bootstrap(y, {"m": p * 2}, {}, block_length=10)
    with pytest.raises(ValueError, match="outcomes"):
        bootstrap(y[:-1], {"m": p}, {}, block_length=10)


def test_interval_above() -> None:
    assert Interval(0.2, 0.01, 0.3).above(0.0)
    assert not Interval(0.2, -0.01, 0.3).above(0.0)
    assert not Interval(0.2).above(0.0), "no interval, no claim"
