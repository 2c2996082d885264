"""The champion's live lift over the rolling-frequency baseline, with a block-bootstrap interval, and its alarm.

Pure code over plain values (no I/O, no clock): inference feeds it the champion's joined
(symbol, t, y, p) rows of the live-metrics window and the event time of the newest label.

**The lift** (:func:`live_lift`): the champion's ROC AUC minus the AUC of the ``rolling change
frequency`` baseline (:mod:`quotewatch.domain.ml.evaluation`: the frequency of y = 1 among the
labels of t' in [t − Δ − W, t − Δ] of the symbol, so computable at t from labels already known;
shrunk towards the window's base rate by one pseudo-observation, as no training window exists
live) on the same rows, with the moving-block bootstrap interval of
:func:`quotewatch.domain.ml.statistics.bootstrap` (paired resamples, Politis-White block length
floored at the label horizon): the same statistics the quality report and the promotion gate use.

**Bounded cost** (:class:`LiftMonitor`): a bootstrap of a 1,000-row window costs tens of ms, so it
runs at most once per ``every_ms`` of label event time, never per label or per dashboard poll;
between runs the last result is served.

**The alarm**: the lift's point estimate has been below zero at every computation since event
time ``negative_since_ns``; ``flagged`` once that lasts ``alarm_ms``. Demotion stays a human decision
(the MLflow UI); the flag only says so, on the dashboard and in ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quotewatch.domain.ml import evaluation, statistics

NS_PER_MS = 1_000_000
CHAMPION = "champion"


@dataclass(frozen=True, slots=True)
class LiveLift:
    """One computation of the lift on a window of joined rows."""

    rows: int
    champion_auc: float | None
    baseline_auc: float | None
    lift: statistics.Interval
    block_length: int
    resamples: int


def live_lift(
    symbols: Sequence[str],
    t: Sequence[int],
    y: Sequence[int],
    p: Sequence[float],
    *,
    delta_ms: int,
    tick_ms: int,
    window_ms: int = 10_000,
    resamples: int = 200,
    seed: int = 0,
) -> LiveLift:
    """The champion's AUC lift over the rolling-frequency baseline on rows (symbol, t, y, p).

    Rows may come in any order; they are sorted by (t, symbol) for the block bootstrap.
    """
    t_array = np.asarray(t, dtype=np.int64)
    order = np.lexsort((np.asarray(symbols, dtype=str), t_array))
    sym = np.asarray(symbols, dtype=str)[order]
    times = t_array[order]
    outcomes = np.asarray(y, dtype=np.int64)[order]
    scores = np.asarray(p, dtype=np.float64)[order]
    if outcomes.size == 0:
        return LiveLift(0, None, None, statistics.Interval(None), 0, 0)
    fit = evaluation.BaselineFit(
        base_rate=float(outcomes.mean()),
        p_after_change=float(outcomes.mean()),
        p_after_no_change=float(outcomes.mean()),
        delta_ms=delta_ms,
        window_ms=window_ms,
    )
    baseline = evaluation.baseline_probabilities(fit, sym, times, outcomes)[evaluation.BASELINE_ROLLING_FREQUENCY]
    length = statistics.block_length(
        [outcomes, scores, baseline], minimum=statistics.horizon_rows(times, delta_ms, tick_ms)
    )
    result = statistics.bootstrap(
        outcomes,
        {CHAMPION: scores},
        {evaluation.BASELINE_ROLLING_FREQUENCY: baseline},
        block_length=length,
        resamples=resamples,
        seed=seed,
    )
    return LiveLift(
        rows=result.rows,
        champion_auc=result.metrics[CHAMPION]["roc_auc"].estimate,
        baseline_auc=result.metrics[evaluation.BASELINE_ROLLING_FREQUENCY]["roc_auc"].estimate,
        lift=result.lifts[CHAMPION],
        block_length=result.block_length,
        resamples=result.resamples,
    )


class LiftMonitor:
    """When to recompute the live lift, the last result, and the below-zero alarm.

    Who calls it: inference, after each synced label, with the label's event time
    (:meth:`due`, then :meth:`record` with a fresh :func:`live_lift` when due).

    Args:
        every_ms: least label event time between two computations.
        alarm_ms: how long the lift must stay below zero before :attr:`flagged`.
    """

    def __init__(self, every_ms: int, alarm_ms: int) -> None:
        if every_ms <= 0 or alarm_ms <= 0:
            raise ValueError("every_ms and alarm_ms must be positive")
        self.every_ns = every_ms * NS_PER_MS
        self.alarm_ns = alarm_ms * NS_PER_MS
        self.last: LiveLift | None = None
        self.computed_at_ns: int | None = None
        self.negative_since_ns: int | None = None
        self.computations = 0

    def due(self, now_ns: int) -> bool:
        """Whether a computation is due at label event time ``now_ns``."""
        return self.computed_at_ns is None or now_ns - self.computed_at_ns >= self.every_ns

    def record(self, now_ns: int, lift: LiveLift) -> None:
        """A lift computed at label event time ``now_ns``."""
        self.last = lift
        self.computed_at_ns = now_ns
        self.computations += 1
        estimate = lift.lift.estimate
        if estimate is None or estimate >= 0:
            self.negative_since_ns = None
        elif self.negative_since_ns is None:
            self.negative_since_ns = now_ns

    def reset(self) -> None:
        """Forget the history (a new champion version)."""
        self.last = None
        self.computed_at_ns = None
        self.negative_since_ns = None

    @property
    def flagged(self) -> bool:
        """The lift has been below zero for at least ``alarm_ms`` of label event time."""
        return (
            self.negative_since_ns is not None
            and self.computed_at_ns is not None
            and self.computed_at_ns - self.negative_since_ns >= self.alarm_ns
        )
