"""Live metrics: a model's own predictions joined with the labels that arrive Δ later.

Pure state over plain values (no I/O, no clock). Inference feeds it every prediction it emits
and every ``Label`` it consumes; a label joins the predictions of the same (symbol, t). Both
sides wait in bounded buffers, because either may arrive first (labels and features are
different topics); when a buffer is full its oldest entry is dropped and counted.

Per model (name, version, role) it keeps, over the last ``window`` joined labels:

- Brier score, balanced accuracy of ``p >= 0.5`` and the base rate, as river rolling metrics
  (``utils.Rolling`` over ``metrics.MSE``, ``metrics.BalancedAccuracy`` and ``stats.Mean``);
- ROC AUC, computed exactly over the same window (:func:`quotewatch.domain.ml.evaluation.roc_auc`).
  river's ``RollingROCAUC`` is not used because it mishandles tied scores (all-equal scores
  give 0.33 instead of 0.5, river 0.26.1), and ties are the norm for tree models, whose
  probabilities take few distinct values.

**The synced-only rule.** A label whose ``synced_over_horizon`` is false (a GAP or a resync inside
[t, t + Δ]) joins nothing: the predictions of its (symbol, t) are dropped and counted in
:attr:`LiveMetricsTracker.excluded_unsynced`, as the quality report does offline.

The summary is the ``LiveMetrics`` records of the snapshot, so offline metrics on the same
predictions and labels (:mod:`quotewatch.domain.ml.evaluation`) give the same numbers.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from river import metrics, stats, utils

from quotewatch.core.records import LiveMetrics, ModelRole
from quotewatch.domain.ml.evaluation import DECISION_THRESHOLD, roc_auc

ROLE_ORDER = {"CHAMPION": 0, "CHALLENGER": 1, "FALLBACK": 2}
_UNSYNCED = -1
"""The join buffer's mark of an unsynced label: the predictions of its (symbol, t) are excluded."""


@dataclass(frozen=True, slots=True)
class ModelKey:
    """Which model a prediction came from (the fallback uses one key for all its states)."""

    model_name: str
    model_version: str
    model_role: ModelRole


class _ModelWindow:
    """Rolling metrics of one model over its last ``window`` joined labels."""

    def __init__(self, window: int, threshold: float) -> None:
        self.threshold = threshold
        self.n_labels = 0
        self.pairs: deque[tuple[int, float]] = deque(maxlen=window)
        self.keys: deque[tuple[str, int]] = deque(maxlen=window)  # (symbol, t) of each pair
        # river's Rolling wraps a class; its types say `object`, so these are Any.
        self.brier: Any = utils.Rolling(metrics.MSE, window_size=window)
        self.balanced_accuracy: Any = utils.Rolling(metrics.BalancedAccuracy, window_size=window)
        self.base_rate: Any = utils.Rolling(stats.Mean, window_size=window)
        self.last_update = 0

    def update(self, label: int, p: float, sequence: int, key: tuple[str, int]) -> None:
        self.n_labels += 1
        self.pairs.append((label, p))
        self.keys.append(key)
        self.brier.update(label, p)
        self.balanced_accuracy.update(bool(label), p >= self.threshold)
        self.base_rate.update(float(label))
        self.last_update = sequence


class LiveMetricsTracker:
    """Joins predictions with labels and keeps rolling metrics per model.

    Args:
        window: joined labels per model the metrics cover.
        buffer_max: (symbol, t) entries each join buffer holds before dropping the oldest.
        max_models: models tracked at once; the least recently updated is forgotten beyond it.
    """

    def __init__(
        self, window: int = 1000, buffer_max: int = 100_000, max_models: int = 8, threshold: float = DECISION_THRESHOLD
    ) -> None:
        if window <= 0 or buffer_max <= 0 or max_models <= 0:
            raise ValueError("window, buffer_max and max_models must be positive")
        self._window = window
        self._buffer_max = buffer_max
        self._max_models = max_models
        self._threshold = threshold
        self._predictions: OrderedDict[tuple[str, int], list[tuple[ModelKey, float]]] = OrderedDict()
        self._labels: OrderedDict[tuple[str, int], int] = OrderedDict()  # _UNSYNCED: excluded
        self._models: dict[ModelKey, _ModelWindow] = {}
        self._sequence = 0
        self._summary: tuple[LiveMetrics, ...] | None = ()
        self.joined = 0
        self.dropped_predictions = 0
        self.dropped_labels = 0
        self.excluded_unsynced = 0
        """Predictions left out because their label's book was not synced over the horizon."""

    def add_predictions(self, symbol: str, t: int, predictions: Iterable[tuple[ModelKey, float]]) -> None:
        """The predictions emitted for (symbol, t); joins a label that arrived first."""
        entries = list(predictions)
        key = (symbol, t)
        label = self._labels.pop(key, None)
        if label == _UNSYNCED:
            self.excluded_unsynced += len(entries)
            return
        if label is not None:
            self._join(entries, label, key)
            return
        self._predictions.setdefault(key, []).extend(entries)
        while len(self._predictions) > self._buffer_max:
            self._predictions.popitem(last=False)
            self.dropped_predictions += 1

    def add_label(self, symbol: str, t: int, label: int, synced: bool = True) -> int:
        """The label y(t) of (symbol, t); returns how many predictions it joined (0: it waits).

        ``synced``: ``Label.synced_over_horizon``; a false label joins nothing and its
        predictions count in :attr:`excluded_unsynced`.
        """
        key = (symbol, t)
        entries = self._predictions.pop(key, None)
        if not synced:
            if entries is None:
                self._labels[key] = _UNSYNCED
                self._bound_labels()
            else:
                self.excluded_unsynced += len(entries)
            return 0
        if entries is None:
            self._labels[key] = int(label)
            self._bound_labels()
            return 0
        self._join(entries, int(label), key)
        return len(entries)

    def _bound_labels(self) -> None:
        while len(self._labels) > self._buffer_max:
            self._labels.popitem(last=False)
            self.dropped_labels += 1

    def _join(self, entries: list[tuple[ModelKey, float]], label: int, key: tuple[str, int]) -> None:
        for model, p in entries:
            self._sequence += 1
            window = self._models.get(model)
            if window is None:
                if len(self._models) >= self._max_models:
                    stalest = min(self._models, key=lambda k: self._models[k].last_update)
                    del self._models[stalest]
                window = self._models[model] = _ModelWindow(self._window, self._threshold)
            window.update(label, p, self._sequence, key)
            self.joined += 1
        self._summary = None

    def window_pairs(self, model: ModelKey) -> list[tuple[int, float]]:
        """The (label, p) pairs the metrics of ``model`` currently cover, oldest first."""
        window = self._models.get(model)
        return list(window.pairs) if window is not None else []

    def window_rows(self, model: ModelKey) -> tuple[list[str], list[int], list[int], list[float]]:
        """(symbols, t, labels, p) of the rows the metrics of ``model`` currently cover, oldest first."""
        window = self._models.get(model)
        if window is None:
            return [], [], [], []
        return (
            [symbol for symbol, _ in window.keys],
            [t for _, t in window.keys],
            [label for label, _ in window.pairs],
            [p for _, p in window.pairs],
        )

    def champion(self) -> ModelKey | None:
        """The most recently joined champion model, or None."""
        champions = [(w.last_update, key) for key, w in self._models.items() if key.model_role == "CHAMPION"]
        return max(champions, key=lambda item: item[0])[1] if champions else None

    def summary(self) -> tuple[LiveMetrics, ...]:
        """``LiveMetrics`` records, champion first; cached until the next join."""
        if self._summary is None:
            self._summary = tuple(
                self._record(model, window)
                for model, window in sorted(
                    self._models.items(),
                    key=lambda item: (ROLE_ORDER.get(item[0].model_role, 9), -item[1].last_update),
                )
            )
        return self._summary

    @staticmethod
    def _record(model: ModelKey, window: _ModelWindow) -> LiveMetrics:
        labels = [label for label, _ in window.pairs]
        scores = [p for _, p in window.pairs]
        return LiveMetrics(
            model_name=model.model_name,
            model_version=model.model_version,
            model_role=model.model_role,
            n_labels=window.n_labels,
            auc=roc_auc(labels, scores),
            brier=float(window.brier.get()),
            balanced_accuracy=float(window.balanced_accuracy.get()),
            base_rate=float(window.base_rate.get()),
        )
