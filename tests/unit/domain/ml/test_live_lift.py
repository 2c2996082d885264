"""The champion's live lift over the rolling-frequency baseline, and the below-zero alarm, on a manual clock."""

from __future__ import annotations

import numpy as np
import pytest

from quotewatch.domain.ml import evaluation, statistics
from quotewatch.domain.ml.live_lift import LiftMonitor, LiveLift, live_lift

MS = 1_000_000
DELTA_MS = 500
TICK_MS = 100


def rows(n: int, informative: bool, seed: int = 0) -> tuple[list[str], list[int], list[int], list[float]]:
    """n ticks of one symbol: y in slow regimes (rate 0.05 or 0.6 for 200 ticks, so the rolling frequency
    is informative); p tracks y when ``informative``, else noise."""
    rng = np.random.default_rng(seed)
    rate = np.where((np.arange(n) // 200) % 2 == 0, 0.05, 0.6)
    y = (rng.uniform(size=n) < rate).astype(int)
    p = np.clip(0.15 + 0.7 * y + rng.normal(0, 0.1, n), 0.01, 0.99) if informative else rng.uniform(0.01, 0.99, n)
    return ["BTC-USD"] * n, [k * TICK_MS * MS for k in range(n)], y.tolist(), p.tolist()


def test_the_lift_is_the_champion_auc_minus_the_rolling_frequency_auc_on_the_same_rows() -> None:
    symbols, t, y, p = rows(1000, informative=True)
    result = live_lift(symbols, t, y, p, delta_ms=DELTA_MS, tick_ms=TICK_MS, window_ms=10_000, resamples=100)
    fit = evaluation.BaselineFit(float(np.mean(y)), float(np.mean(y)), float(np.mean(y)), DELTA_MS, 10_000)
    baseline = evaluation.baseline_probabilities(fit, symbols, t, y)[evaluation.BASELINE_ROLLING_FREQUENCY]
    assert result.champion_auc == pytest.approx(evaluation.roc_auc(y, p))
    assert result.baseline_auc == pytest.approx(evaluation.roc_auc(y, baseline.tolist()))
    assert result.champion_auc is not None
    assert result.baseline_auc is not None
    estimate, low, high = result.lift.estimate, result.lift.low, result.lift.high
    assert estimate == pytest.approx(result.champion_auc - result.baseline_auc)
    assert estimate is not None
    assert low is not None
    assert high is not None
    assert low < estimate < high
    assert low > 0, "an informative champion beats the rolling frequency"
    assert result.block_length >= DELTA_MS // TICK_MS, "blocks never shorter than the label horizon"
    assert (result.rows, result.resamples) == (1000, 100)
    shuffled = np.random.default_rng(1).permutation(1000)
    again = live_lift(
        [symbols[i] for i in shuffled],
        [t[i] for i in shuffled],
        [y[i] for i in shuffled],
        [p[i] for i in shuffled],
        delta_ms=DELTA_MS,
        tick_ms=TICK_MS,
        window_ms=10_000,
        resamples=100,
    )
    assert again == result, "rows are put in time order before the block bootstrap"


def test_a_noise_champion_has_a_negative_lift_and_an_empty_window_none() -> None:
    result = live_lift(*rows(1000, informative=False), delta_ms=DELTA_MS, tick_ms=TICK_MS, resamples=100)
    estimate = result.lift.estimate
    assert estimate is not None
    assert estimate < 0
    empty = live_lift([], [], [], [], delta_ms=DELTA_MS, tick_ms=TICK_MS)
    assert (empty.rows, empty.lift.estimate) == (0, None)


def lift_of(estimate: float | None) -> LiveLift:
    return LiveLift(100, 0.5, 0.5, statistics.Interval(estimate, None, None), 5, 0)


def test_the_monitor_computes_at_most_once_per_interval_and_flags_a_lasting_negative_lift() -> None:
    monitor = LiftMonitor(every_ms=10_000, alarm_ms=60_000)
    now = 1_700_000_000_000 * MS  # a manual clock: label event times
    assert monitor.due(now)
    monitor.record(now, lift_of(-0.02))
    assert monitor.negative_since_ns == now
    assert not monitor.due(now + 9_999 * MS), "bounded cost: not before every_ms"
    for step in range(1, 6):
        assert monitor.due(now + step * 10_000 * MS)
        monitor.record(now + step * 10_000 * MS, lift_of(-0.01))
        assert not monitor.flagged, f"{step * 10} s below zero is less than the 60 s window"
    monitor.record(now + 60_000 * MS, lift_of(-0.01))
    assert monitor.flagged
    monitor.record(now + 70_000 * MS, lift_of(0.01))
    assert not monitor.flagged, "one non-negative lift clears it"
    assert monitor.negative_since_ns is None
    monitor.record(now + 80_000 * MS, lift_of(None))
    assert monitor.negative_since_ns is None, "an undefined lift is no evidence of a negative one"
    monitor.record(now + 90_000 * MS, lift_of(-0.5))
    monitor.reset()
    assert (monitor.last, monitor.negative_since_ns, monitor.flagged) == (None, None, False)
    with pytest.raises(ValueError, match="positive"):
        LiftMonitor(every_ms=0, alarm_ms=1)
