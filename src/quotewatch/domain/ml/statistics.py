"""Honest statistics for y(t) models: walk-forward splits, block-bootstrap intervals, the lift verdict.

Pure functions over arrays (no I/O, no clock). The quality report (``quotewatch quality``) and the
trainer's promotion gate both judge a model here, so "beats the baseline" means the same thing in
both places.

**Walk-forward** (:func:`walk_forward_folds`): the time range is cut into an initial training
stretch and ``folds`` consecutive test windows of equal length; fold k trains on everything before
its test window minus a gap (expanding window) and tests on its window. The gap is at least Δ, so
no training label (known at t + Δ) looks into the test window. The test windows tile the end of
the range, so their out-of-sample predictions, stitched together, form one contiguous series that
is evaluated as a whole (each row scored by the model of its own fold).

**Moving-block bootstrap** (Künsch 1989). Ticks are autocorrelated: consecutive labels share most
of their horizon (y(t) and y(t + TICK) look at overlapping stretches [t, t + Δ]), and the features
average over windows of up to 5 s. Resampling single rows would treat 18,000 ticks as 18,000
independent observations and give intervals that are far too narrow. A resample is instead made
of blocks of ``block_length`` consecutive rows (in time order) drawn with replacement from the
``n - block_length + 1`` possible starts, concatenated and cut to ``n`` rows. Every statistic of
one resample (each curve's AUC, Brier, log loss, balanced accuracy, and the lifts) is computed on
the **same** resampled rows, so differences between a model and a baseline are paired: what they
share (a quiet hour, a burst of changes) cancels instead of widening the lift's interval.
Intervals are percentile intervals of ``resamples`` resamples (default 1,000; seeded, so a
report is reproducible). A metric that is undefined in more than 1 % of the resamples (an AUC
when a resample holds one class) has no interval: too few positives for a statement.

**Block length** (:func:`block_length`): the Politis-White automatic rule (Politis & White 2004,
with the correction of Patton, Politis & White 2009), as implemented by ``arch``
(``arch.bootstrap.optimal_block_length``, the circular-bootstrap column: the moving-block and the
circular block bootstrap have the same MSE-optimal block length). It estimates from the sample
autocovariances the block length that minimises the mean squared error of the bootstrap variance
of a series' mean. The metrics are smooth functions of per-row terms (y, p, (p - y)^2), so the
rule is applied to each of those series and the **longest** length is used: a block long enough
for the most persistent series is long enough for the others (too long costs a little
efficiency; too short understates the variance). Two floors: the label horizon (Δ / TICK ticks,
times the rows per tick when several symbols share a tick), because labels within one horizon
are overlapping by construction whatever the sample autocorrelation says; and 1. A window that
holds fewer than :data:`MIN_BLOCKS` blocks gets no interval (``not enough data``).

**The lift** over the best naive baseline: in every resample, the model's AUC minus the highest
baseline AUC of that resample (the best baseline is re-chosen in each resample, so the choice is
part of the uncertainty); "the best model" likewise takes the highest model AUC of each resample.
A model **beats the baselines at 95 %** when the lower bound of its lift's 95 % interval is above
0 (:meth:`Interval.above`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from quotewatch.domain.ml.evaluation import DECISION_THRESHOLD, LOG_LOSS_EPSILON

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1_000
MIN_BLOCKS = 10
"""A window must hold at least this many blocks for a bootstrap interval to mean anything."""
MAX_UNDEFINED_SHARE = 0.01
"""An interval needs the metric defined in at least 99 % of the resamples."""
METRICS = ("roc_auc", "brier", "log_loss", "balanced_accuracy")
BEST_MODEL = "best model"


# -- walk-forward -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fold:
    """One walk-forward split on the tick time t (ns).

    Train on ``[train_start_ns, train_end_ns)``, test on ``[test_start_ns, test_end_ns)``.
    """

    index: int
    train_start_ns: int
    train_end_ns: int
    test_start_ns: int
    test_end_ns: int

    @property
    def gap_ns(self) -> int:
        return self.test_start_ns - self.train_end_ns

    def train_mask(self, t: NDArray[np.int64]) -> NDArray[np.bool_]:
        return (t >= self.train_start_ns) & (t < self.train_end_ns)

    def test_mask(self, t: NDArray[np.int64]) -> NDArray[np.bool_]:
        return (t >= self.test_start_ns) & (t < self.test_end_ns)


def walk_forward_folds(
    start_ns: int, end_ns: int, *, folds: int, gap_ns: int, initial_train_fraction: float = 0.4
) -> list[Fold]:
    """``folds`` consecutive test windows over the last ``1 - initial_train_fraction`` of ``[start_ns, end_ns]``.

    Fold k (from 0) tests on the k-th window and trains on ``[start_ns, test_start - gap_ns)``
    (expanding window). The last window ends just after ``end_ns`` (inclusive of the last tick).

    Raises:
        ValueError: no folds, a negative gap, a fraction outside (0, 1), or an empty range.
    """
    if folds < 1:
        raise ValueError(f"need at least one fold, not {folds}")
    if gap_ns < 0:
        raise ValueError(f"the gap must not be negative ({gap_ns} ns)")
    if not 0.0 < initial_train_fraction < 1.0:
        raise ValueError(f"initial_train_fraction must be in (0, 1), not {initial_train_fraction}")
    if end_ns <= start_ns:
        raise ValueError("the time range is empty")
    stop = end_ns + 1
    first_test = start_ns + int((stop - start_ns) * initial_train_fraction)
    width = (stop - first_test) / folds
    edges = [first_test + round(width * k) for k in range(folds)] + [stop]
    return [
        Fold(
            index=k,
            train_start_ns=start_ns,
            train_end_ns=edges[k] - gap_ns,
            test_start_ns=edges[k],
            test_end_ns=edges[k + 1],
        )
        for k in range(folds)
    ]


# -- block length -----------------------------------------------------------------------------------


def politis_white_length(series: ArrayLike) -> float | None:
    """The Politis-White block length of one series (circular/moving-block bootstrap), or None.

    None for a series too short (< 10 values) or without variation, where the rule is undefined.
    """
    x = np.asarray(series, dtype=np.float64).ravel()
    if x.size < 10 or not np.isfinite(x).all() or np.ptp(x) == 0:
        return None
    from arch.bootstrap import optimal_block_length

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(optimal_block_length(x)["circular"].iloc[0])
    return value if math.isfinite(value) and value > 0 else None


def block_length(series: Sequence[ArrayLike], *, minimum: int = 1) -> int:
    """The moving-block length for rows in time order: the longest Politis-White length of ``series``.

    Rounded up, and never below ``minimum`` (the label horizon in rows: see the module doc).
    """
    lengths = [length for s in series if (length := politis_white_length(s)) is not None]
    return max(int(minimum), 1, *(math.ceil(length) for length in lengths))


def horizon_rows(t: NDArray[np.int64], delta_ms: int, tick_ms: int) -> int:
    """The label horizon Δ / TICK in rows of a table sorted by t (times the mean rows per tick)."""
    ticks = max(1, delta_ms // tick_ms)
    if t.size == 0:
        return ticks
    rows_per_tick = t.size / max(1, np.unique(t).size)
    return max(1, math.ceil(ticks * rows_per_tick))


# -- resampling ------------------------------------------------------------------------------------


def moving_block_counts(n: int, length: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """How often each of ``n`` rows appears in one moving-block resample of ``n`` rows."""
    if not 1 <= length <= n:
        raise ValueError(f"block length {length} must be within [1, {n}]")
    blocks = math.ceil(n / length)
    starts = rng.integers(0, n - length + 1, size=blocks)
    rows = (starts[:, None] + np.arange(length)[None, :]).ravel()[:n]
    return np.bincount(rows, minlength=n).astype(np.int64)


# -- weighted metrics (a resample = integer weights on the original rows) ----------------------------


@dataclass(frozen=True)
class _Ranked:
    """A curve's rows sorted by p, with its tie groups: the AUC of any weighting in O(n)."""

    order: NDArray[np.intp]
    starts: NDArray[np.intp]

    @classmethod
    def of(cls, p: NDArray[np.float64]) -> _Ranked:
        order = np.argsort(p, kind="stable")
        ranked = p[order]
        starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
        return cls(order, starts)


def weighted_auc(ranked: _Ranked, y: NDArray[np.int64], weights: NDArray[np.int64]) -> float | None:
    """The AUC of the rows repeated ``weights`` times (ties one half), or None without both classes.

    Equal to :func:`quotewatch.domain.ml.evaluation.roc_auc` of the expanded sample, in integers:
    for each tie group g, its positives outrank every negative of the lower groups and tie with
    its own negatives.
    """
    w = weights[ranked.order]
    positives = np.add.reduceat(w * y[ranked.order], ranked.starts)
    negatives = np.add.reduceat(w, ranked.starts) - positives
    total_positive, total_negative = int(positives.sum()), int(negatives.sum())
    if total_positive == 0 or total_negative == 0:
        return None
    below = np.cumsum(negatives) - negatives
    twice = int(np.dot(positives, 2 * below + negatives))
    return twice / (2 * total_positive * total_negative)


def _weighted_scores(
    ranked: _Ranked,
    y: NDArray[np.int64],
    squared: NDArray[np.float64],
    losses: NDArray[np.float64],
    correct: NDArray[np.bool_],
    weights: NDArray[np.int64],
) -> dict[str, float | None]:
    total = weights.sum()
    positive_weight = int(np.dot(weights, y))
    negative_weight = int(total - positive_weight)
    recalls = []
    if positive_weight:
        recalls.append(float(np.dot(weights, correct & (y == 1))) / positive_weight)
    if negative_weight:
        recalls.append(float(np.dot(weights, correct & (y == 0))) / negative_weight)
    return {
        "roc_auc": weighted_auc(ranked, y, weights),
        "brier": float(np.dot(weights, squared)) / total,
        "log_loss": float(np.dot(weights, losses)) / total,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
    }


# -- intervals -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate (on the original rows) and its percentile bootstrap interval.

    ``low``/``high`` are None when there is no interval (too few blocks, or the statistic undefined
    in too many resamples); ``estimate`` is None when it is undefined on the original rows.
    """

    estimate: float | None
    low: float | None = None
    high: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def above(self, threshold: float = 0.0) -> bool:
        """True when the whole interval lies above ``threshold`` (its lower bound is greater)."""
        return self.low is not None and self.low > threshold

    def as_dict(self) -> dict[str, float | None]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass
class BootstrapResult:
    """Every curve's metrics with intervals, and the AUC lifts over the best baseline, on one window."""

    rows: int
    block_length: int
    resamples: int
    confidence: float
    metrics: dict[str, dict[str, Interval]]
    """Curve name -> metric name (:data:`METRICS`) -> interval."""
    lifts: dict[str, Interval]
    """Model name (and :data:`BEST_MODEL`) -> AUC lift over the best baseline."""
    best_baseline: str | None
    """The baseline with the highest AUC on the original rows."""
    notes: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> float:
        return self.rows / self.block_length if self.block_length else 0.0


def _percentile(values: list[float | None], estimate: float | None, confidence: float) -> Interval:
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    if estimate is None or not values or defined.size < (1.0 - MAX_UNDEFINED_SHARE) * len(values):
        return Interval(estimate)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(defined, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high))


def _lift(model_auc: float | None, baseline_aucs: Sequence[float | None]) -> float | None:
    defined = [auc for auc in baseline_aucs if auc is not None]
    if model_auc is None or not defined:
        return None
    return model_auc - max(defined)


def bootstrap(
    y: ArrayLike,
    models: Mapping[str, ArrayLike],
    baselines: Mapping[str, ArrayLike],
    *,
    block_length: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> BootstrapResult:
    """Metrics with moving-block bootstrap intervals for every curve, and the paired AUC lifts.

    Args:
        y: outcomes (0/1) of the rows, **in time order**.
        models, baselines: name -> p per row (same rows). Lifts are computed for each model (and
            for the best model of each resample, :data:`BEST_MODEL`) over the best baseline.
        block_length: rows per block (:func:`block_length`).

    Raises:
        ValueError: shapes differ, or an outcome is not 0/1, or a probability is not finite in [0, 1].
    """
    outcomes = np.asarray(y, dtype=np.int64).ravel()
    n = outcomes.size
    if n and not np.isin(outcomes, (0, 1)).all():
        raise ValueError("outcomes must be 0 or 1")
    curves: dict[str, NDArray[np.float64]] = {}
    for name, p in {**models, **baselines}.items():
        array = np.asarray(p, dtype=np.float64).ravel()
        if array.shape != outcomes.shape:
            raise ValueError(f"{name}: {array.size} probabilities for {n} outcomes")
        if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
            raise ValueError(f"{name}: probabilities must be finite and within [0, 1]")
        curves[name] = array
    prepared = {
        name: (
            _Ranked.of(p),
            (p - outcomes) ** 2,
            -np.log(np.clip(np.where(outcomes == 1, p, 1.0 - p), LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON)),
            (p >= DECISION_THRESHOLD) == (outcomes == 1),
        )
        for name, p in curves.items()
    }

    def scores(weights: NDArray[np.int64]) -> dict[str, dict[str, float | None]]:
        return {name: _weighted_scores(r, outcomes, sq, ll, ok, weights) for name, (r, sq, ll, ok) in prepared.items()}

    def lifts(of: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
        base = [of[name]["roc_auc"] for name in baselines]
        out = {name: _lift(of[name]["roc_auc"], base) for name in models}
        model_aucs = [auc for name in models if (auc := of[name]["roc_auc"]) is not None]
        out[BEST_MODEL] = _lift(max(model_aucs), base) if model_aucs else None
        return out

    length = max(1, min(int(block_length), max(n, 1)))
    original = scores(np.ones(n, dtype=np.int64)) if n else {}
    original_lifts = lifts(original) if n else {}
    notes: list[str] = []
    enough = n > 0 and n / length >= MIN_BLOCKS
    samples: list[dict[str, dict[str, float | None]]] = []
    sample_lifts: list[dict[str, float | None]] = []
    if enough:
        rng = np.random.default_rng(seed)
        for _ in range(resamples):
            of = scores(moving_block_counts(n, length, rng))
            samples.append(of)
            sample_lifts.append(lifts(of))
    else:
        notes.append(f"{n} rows hold {n / length:.1f} blocks of {length} rows (fewer than {MIN_BLOCKS}): no intervals")
    metrics = {
        name: {
            metric: _percentile([s[name][metric] for s in samples], original.get(name, {}).get(metric), confidence)
            for metric in METRICS
        }
        for name in curves
    }
    lift_intervals = {
        name: _percentile([s[name] for s in sample_lifts], original_lifts.get(name), confidence)
        for name in [*models, BEST_MODEL]
    }
    baseline_aucs = {name: original[name]["roc_auc"] for name in baselines} if n else {}
    defined = {name: auc for name, auc in baseline_aucs.items() if auc is not None}
    best = max(defined, key=lambda name: defined[name]) if defined else None
    for name, intervals in lift_intervals.items():
        if intervals.estimate is not None and not intervals.has_interval and enough:
            notes.append(f"lift of {name}: AUC undefined in more than {MAX_UNDEFINED_SHARE:.0%} of the resamples")
    return BootstrapResult(n, length, resamples if enough else 0, confidence, metrics, lift_intervals, best, notes)
