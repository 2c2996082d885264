"""Model evaluation for y(t) = "the best bid or ask changes within Δ": metrics and naive baselines.

Pure functions over arrays and plain label records (no I/O, no clock). The trainer scores its
test window with them, the backtest reports them, and inference's live metrics are tested
against them.

**Metrics** of probabilities ``p`` against outcomes ``y`` in {0, 1}: ROC AUC (None when the
window holds one class only), Brier score, log loss, balanced accuracy of ``p >= 0.5`` and the
base rate (mean of ``y``).

**Naive baselines** every model must beat; each is computable at time t from labels already
known at t (a label for t' is known at t' + Δ):

- ``base rate``: the training base rate, a constant;
- ``changed in the last Δ``: did the quote change between t − Δ and t? That is exactly the label
  of t − Δ (known at t). As a probability: the training frequency of y = 1 after a change /
  after no change (the base rate where t − Δ has no label, e.g. at the start of a sync epoch);
- ``rolling change frequency``: the frequency of y = 1 among the labels of t' in [t − Δ − W, t − Δ]
  of the same symbol (W = ``window_ms``, default 10 s), shrunk towards the training base rate by
  one pseudo-observation, ``(k + base rate) / (n + 1)``, so it is never exactly 0 or 1 (which a
  log loss punishes without bound); the base rate where no label is known yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from quotewatch.core.records import Label

DECISION_THRESHOLD = 0.5
"""Balanced accuracy scores the decision ``p >= DECISION_THRESHOLD``."""
LOG_LOSS_EPSILON = float(np.finfo(np.float64).eps)
"""The log loss clips p and 1 - p to [eps, 1 - eps], eps the machine epsilon of float64 (2.2e-16).

scikit-learn's convention (``sklearn.metrics.log_loss`` of the pinned 1.9 clips each class's
probability at the epsilon of the probabilities' dtype): a certain wrong prediction costs
-log(eps) = 36.04.
"""
NS_PER_MS = 1_000_000

BASELINE_BASE_RATE = "base_rate"
BASELINE_CHANGED_LAST_DELTA = "changed_last_delta"
BASELINE_ROLLING_FREQUENCY = "rolling_change_frequency"
BASELINES = (BASELINE_BASE_RATE, BASELINE_CHANGED_LAST_DELTA, BASELINE_ROLLING_FREQUENCY)


def _arrays(y: ArrayLike, p: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    y_array = np.asarray(y, dtype=np.int64).ravel()
    p_array = np.asarray(p, dtype=np.float64).ravel()
    if y_array.shape != p_array.shape:
        raise ValueError(f"{y_array.size} outcomes but {p_array.size} probabilities")
    if y_array.size and not np.isin(y_array, (0, 1)).all():
        raise ValueError("outcomes must be 0 or 1")
    return y_array, p_array


def base_rate(y: ArrayLike) -> float | None:
    """The fraction of positives, or None for no outcomes."""
    y_array = np.asarray(y, dtype=np.float64).ravel()
    return float(y_array.mean()) if y_array.size else None


def roc_auc(y: ArrayLike, p: ArrayLike) -> float | None:
    """Area under the ROC curve (ties count one half), or None unless both classes occur."""
    y_array, p_array = _arrays(y, p)
    if not np.isfinite(p_array).all():
        raise ValueError("probabilities must be finite")
    return _roc_auc(y_array, p_array)


def _roc_auc(y: NDArray[np.int64], p: NDArray[np.float64]) -> float | None:
    # The Mann-Whitney form: the AUC is the probability that a positive outranks a negative, ties
    # one half, i.e. (R - P(P+1)/2) / (P N) with R the sum of the positives' ranks, tied scores
    # sharing the mean of their ranks. A tie group holding ranks s+1..e adds k (s+e+1)/2 for its
    # k positives; 2R is summed in integers, so the only rounding is the final division (the same
    # value as scikit-learn's trapezoids, which round at every step, within 1e-15). One sort and
    # no input checks: 5-10x faster than roc_auc_score on a day of ticks.
    positives = int(np.count_nonzero(y))
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(p)  # any order within a tie group: the group is summed as a whole
    ranked = p[order]
    starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
    ends = np.append(starts[1:], y.size)
    positives_in_group = np.add.reduceat(y[order], starts)
    twice_rank_sum = int(np.dot(positives_in_group, starts + ends + 1))
    return (twice_rank_sum - positives * (positives + 1)) / (2 * positives * negatives)


def brier(y: ArrayLike, p: ArrayLike) -> float | None:
    """Mean squared error of the probabilities, or None for no outcomes."""
    y_array, p_array = _arrays(y, p)
    return _brier(y_array, p_array)


def _brier(y: NDArray[np.int64], p: NDArray[np.float64]) -> float | None:
    if y.size == 0:
        return None
    return float(np.mean((p - y) ** 2))


def log_loss(y: ArrayLike, p: ArrayLike) -> float | None:
    """Mean negative log-likelihood (natural log), probabilities clipped as sklearn does; None for no outcomes."""
    y_array, p_array = _arrays(y, p)
    return _log_loss(y_array, p_array)


def _log_loss(y: NDArray[np.int64], p: NDArray[np.float64]) -> float | None:
    if y.size == 0:
        return None
    # As sklearn: the probability of each class (p, 1 - p), each clipped, and the log of the observed one.
    observed = np.where(y == 1, p, 1.0 - p)
    return float(-np.mean(np.log(np.clip(observed, LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON))))


def balanced_accuracy(y: ArrayLike, p: ArrayLike, threshold: float = DECISION_THRESHOLD) -> float | None:
    """Mean of the recalls of both classes for the decision ``p >= threshold``.

    With one class only it is that class's recall (sklearn's convention); None for no outcomes.
    """
    y_array, p_array = _arrays(y, p)
    return _balanced_accuracy(y_array, p_array, threshold)


def _balanced_accuracy(y: NDArray[np.int64], p: NDArray[np.float64], threshold: float) -> float | None:
    if y.size == 0:
        return None
    decision = p >= threshold
    recalls = [float(np.mean(decision[y == cls] == bool(cls))) for cls in (0, 1) if np.any(y == cls)]
    return float(np.mean(recalls))


@dataclass(frozen=True, slots=True)
class Scores:
    """The metrics of one set of probabilities on one window."""

    n: int
    base_rate: float | None
    roc_auc: float | None
    brier: float | None
    log_loss: float | None
    balanced_accuracy: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def finite_items(self, prefix: str = "") -> dict[str, float]:
        """The defined metrics as ``{prefix + name: value}`` (for MLflow, which rejects None)."""
        return {
            f"{prefix}{name}": float(value)
            for name, value in self.as_dict().items()
            if value is not None and math.isfinite(float(value))
        }


def score(y: ArrayLike, p: ArrayLike, threshold: float = DECISION_THRESHOLD) -> Scores:
    """Every metric of ``p`` against ``y``.

    Raises:
        ValueError: shapes differ, an outcome is not 0/1, or a probability is not finite in [0, 1].
    """
    y_array, p_array = _arrays(y, p)
    if p_array.size and (not np.isfinite(p_array).all() or p_array.min() < 0 or p_array.max() > 1):
        raise ValueError("probabilities must be finite and within [0, 1]")
    return Scores(
        n=int(y_array.size),
        base_rate=base_rate(y_array),
        roc_auc=_roc_auc(y_array, p_array),
        brier=_brier(y_array, p_array),
        log_loss=_log_loss(y_array, p_array),
        balanced_accuracy=_balanced_accuracy(y_array, p_array, threshold),
    )


# -- naive baselines ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BaselineFit:
    """What the baselines learn from the training window (frequencies only)."""

    base_rate: float
    p_after_change: float
    p_after_no_change: float
    delta_ms: int
    window_ms: int


def label_arrays(labels: Sequence[Label]) -> tuple[NDArray[np.str_], NDArray[np.int64], NDArray[np.int64]]:
    """(symbol, t_event, label) arrays of ``Label`` records."""
    symbols = np.array([label.symbol for label in labels], dtype=np.str_)
    t_event = np.array([label.t_event for label in labels], dtype=np.int64)
    y = np.array([label.label for label in labels], dtype=np.int64)
    return symbols, t_event, y


def previous_label(symbols: ArrayLike, t_event: ArrayLike, y: ArrayLike, delta_ms: int) -> NDArray[np.float64]:
    """For each row (symbol, t): the label of (symbol, t − Δ), or NaN where there is none.

    This is "did the best quote change in the last Δ" as known at t.
    """
    sym = np.asarray(symbols).astype(str)
    t = np.asarray(t_event, dtype=np.int64)
    labels = np.asarray(y, dtype=np.float64)
    result = np.full(t.shape, np.nan)
    delta_ns = int(delta_ms) * NS_PER_MS
    for symbol in np.unique(sym):
        rows = np.flatnonzero(sym == symbol)
        order = rows[np.argsort(t[rows], kind="stable")]
        times = t[order]
        wanted = times - delta_ns
        position = np.searchsorted(times, wanted)
        found = (position < times.size) & (times[np.minimum(position, times.size - 1)] == wanted)
        result[order[found]] = labels[order[position[found]]]
    return result


def rolling_counts(
    symbols: ArrayLike, t_event: ArrayLike, y: ArrayLike, delta_ms: int, window_ms: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """For each row (symbol, t): (sum, count) of the labels of t' in [t − Δ − W, t − Δ] of the symbol."""
    sym = np.asarray(symbols).astype(str)
    t = np.asarray(t_event, dtype=np.int64)
    labels = np.asarray(y, dtype=np.float64)
    sums = np.zeros(t.shape, dtype=np.float64)
    counts = np.zeros(t.shape, dtype=np.int64)
    delta_ns, window_ns = int(delta_ms) * NS_PER_MS, int(window_ms) * NS_PER_MS
    for symbol in np.unique(sym):
        rows = np.flatnonzero(sym == symbol)
        order = rows[np.argsort(t[rows], kind="stable")]
        times = t[order]
        cumulative = np.concatenate(([0.0], np.cumsum(labels[order])))
        high = np.searchsorted(times, times - delta_ns, side="right")
        low = np.searchsorted(times, times - delta_ns - window_ns, side="left")
        sums[order] = cumulative[high] - cumulative[low]
        counts[order] = high - low
    return sums, counts


def fit_baselines(
    symbols: ArrayLike, t_event: ArrayLike, y: ArrayLike, delta_ms: int, window_ms: int = 10_000
) -> BaselineFit:
    """Learn the baselines' frequencies from a training window of labels.

    Raises:
        ValueError: no labels.
    """
    labels = np.asarray(y, dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no labels to fit the baselines on")
    rate = float(labels.mean())
    previous = previous_label(symbols, t_event, labels, delta_ms)
    after_change = labels[previous == 1]
    after_no_change = labels[previous == 0]
    return BaselineFit(
        base_rate=rate,
        p_after_change=float(after_change.mean()) if after_change.size else rate,
        p_after_no_change=float(after_no_change.mean()) if after_no_change.size else rate,
        delta_ms=int(delta_ms),
        window_ms=int(window_ms),
    )


def baseline_probabilities(
    fit: BaselineFit, symbols: ArrayLike, t_event: ArrayLike, y: ArrayLike
) -> dict[str, NDArray[np.float64]]:
    """Each baseline's p for every row (symbol, t) of a label table.

    ``y`` is needed because the baselines at t use the labels known by t (those of t' ≤ t − Δ);
    pass the whole label history (training window included) and select the rows to score.
    """
    t = np.asarray(t_event, dtype=np.int64)
    previous = previous_label(symbols, t, y, fit.delta_ms)
    changed = np.where(
        np.isnan(previous), fit.base_rate, np.where(previous == 1, fit.p_after_change, fit.p_after_no_change)
    )
    sums, counts = rolling_counts(symbols, t, y, fit.delta_ms, fit.window_ms)
    return {
        BASELINE_BASE_RATE: np.full(t.shape, fit.base_rate),
        BASELINE_CHANGED_LAST_DELTA: changed,
        BASELINE_ROLLING_FREQUENCY: (sums + fit.base_rate) / (counts + 1),
    }
