"""Walk-forward evaluation of one dataset: the trainer's models per fold, pooled out-of-sample statistics.

For each fold of :func:`quotewatch.domain.ml.statistics.walk_forward_folds` (expanding training
window, gap ≥ Δ), :func:`quotewatch.services.trainer.training.train_on_split` (the trainer's own
code: its baselines fitted on the fold's training labels, LR and XGBoost, each calibrated on the
training window only) scores the fold's test window. The test windows tile the end of the data, so
each model's out-of-sample predictions, fold after fold, form one contiguous series; the
statistics (:func:`quotewatch.domain.ml.statistics.bootstrap`) are computed on that pooled series,
and per fold.

**Enough data?** A dataset is evaluated only when every fold has at least
:data:`MIN_TRAIN_CLASS` labels of each class to train on and :data:`MIN_TEST_CLASS` to test on;
otherwise the report says "not enough data" with the counts (a model trained on a handful of
quote changes and tested on one or two says nothing either way).

**Permutation importance** on each fold's test window: the drop in AUC when one feature's column
is shuffled (3 repeats, seeded), averaged over the folds, per model kind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from quotewatch.domain.ml import evaluation, statistics
from quotewatch.domain.ml.statistics import BootstrapResult, Fold
from quotewatch.quality.datasets import Dataset, change_events
from quotewatch.services.trainer.training import (
    MODEL_KINDS,
    Split,
    TrainingOptions,
    TrainingResult,
    train_on_split,
)

logger = logging.getLogger(__name__)

MIN_TRAIN_CLASS = 20
MIN_TEST_CLASS = 10
IMPORTANCE_REPEATS = 3
MODEL_NAMES = {"lr": "LR", "xgb": "XGBoost"}


@dataclass(frozen=True)
class QualitySettings:
    """How a dataset is evaluated."""

    folds: int = 4
    initial_train_fraction: float = 0.4
    resamples: int = statistics.DEFAULT_RESAMPLES
    confidence: float = statistics.CONFIDENCE
    seed: int = 7


@dataclass
class FoldResult:
    fold: Fold
    train_rows: int
    train_positives: int
    test_rows: int
    test_positives: int
    statistics: BootstrapResult | None = None
    calibration: dict[str, str] = field(default_factory=dict)
    """Model name -> the calibration chosen on the fold's training window and why."""


@dataclass
class Evaluation:
    """The verdict on one dataset."""

    dataset: Dataset
    folds: list[FoldResult]
    pooled: BootstrapResult | None
    importance: dict[str, list[tuple[str, float, float]]]
    """Model name -> (feature, mean AUC drop, std over folds), largest first."""
    not_enough: str = ""
    """Why it could not be evaluated (empty when it was)."""
    seconds: float = 0.0
    block_rows_minimum: int = 0

    @property
    def evaluated(self) -> bool:
        return self.pooled is not None

    @property
    def verdict(self) -> str:
        if self.pooled is None:
            return "not enough data"
        lift = self.pooled.lifts[statistics.BEST_MODEL]
        if not lift.has_interval:
            return "not enough data"
        return "beats the best baseline" if lift.above(0.0) else "not shown to beat the best baseline"


def _folds_for(dataset: Dataset, options: TrainingOptions, settings: QualitySettings) -> list[Fold]:
    assert dataset.data is not None
    t = dataset.data.t
    gap_ns = max(options.gap_ms or options.delta_ms, options.delta_ms) * 1_000_000
    return statistics.walk_forward_folds(
        int(t.min()),
        int(t.max()),
        folds=settings.folds,
        gap_ns=gap_ns,
        initial_train_fraction=settings.initial_train_fraction,
    )


def evaluate(
    dataset: Dataset,
    options: TrainingOptions,
    settings: QualitySettings,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Walk-forward train and test ``dataset``; statistics per fold and pooled."""
    say = progress or (lambda message: None)
    began = time.perf_counter()
    data = dataset.data
    if data is None:
        return Evaluation(dataset, [], None, {}, not_enough=dataset.problem or "no labelled tick")
    folds = _folds_for(dataset, options, settings)
    fold_results = []
    for fold in folds:
        train_mask, test_mask = fold.train_mask(data.t), fold.test_mask(data.t)
        fold_results.append(
            FoldResult(
                fold,
                int(train_mask.sum()),
                int(data.y[train_mask].sum()),
                int(test_mask.sum()),
                int(data.y[test_mask].sum()),
            )
        )
    short = [
        f
        for f in fold_results
        if min(f.train_positives, f.train_rows - f.train_positives) < MIN_TRAIN_CLASS
        or min(f.test_positives, f.test_rows - f.test_positives) < MIN_TEST_CLASS
    ]
    if short:
        counts = "; ".join(
            f"fold {f.fold.index + 1}: {f.train_positives}/{f.train_rows} positive training labels, "
            f"{f.test_positives}/{f.test_rows} positive test labels"
            for f in fold_results
        )
        reason = (
            f"{dataset.positives} positive labels in {dataset.rows} labelled ticks "
            f"(about {change_events(data.y, data.symbols)} best-quote changes); {settings.folds} walk-forward folds "
            f"need at least {MIN_TRAIN_CLASS} labels of each class to train on and {MIN_TEST_CLASS} to test on in "
            f"every fold ({counts})"
        )
        return Evaluation(dataset, fold_results, None, {}, not_enough=reason, seconds=time.perf_counter() - began)

    pooled_y: list[NDArray[np.int64]] = []
    pooled_t: list[NDArray[np.int64]] = []
    pooled_models: dict[str, list[NDArray[np.float64]]] = {MODEL_NAMES[k]: [] for k in MODEL_KINDS}
    pooled_baselines: dict[str, list[NDArray[np.float64]]] = {}
    drops: dict[str, list[NDArray[np.float64]]] = {MODEL_NAMES[k]: [] for k in MODEL_KINDS}
    minimum = statistics.horizon_rows(data.t, options.delta_ms, options.tick_ms)
    for result in fold_results:
        fold = result.fold
        say(f"{dataset.source.name}: fold {fold.index + 1}/{len(folds)}: LR and XGBoost on {result.train_rows} rows")
        split = Split(
            train=fold.train_mask(data.t),
            test=fold.test_mask(data.t),
            train_end_ns=fold.train_end_ns,
            test_start_ns=fold.test_start_ns,
            gap_ns=fold.gap_ns,
        )
        trained = train_on_split(data, split, options, MODEL_KINDS)
        y = trained.y_test
        models = {MODEL_NAMES[kind]: c.p_test for kind, c in trained.candidates.items()}
        baselines = {f"baseline: {name}": p for name, p in trained.baseline_p_test.items()}
        length = statistics.block_length(
            [y, *models.values(), *((p - y) ** 2 for p in models.values())], minimum=minimum
        )
        result.statistics = statistics.bootstrap(
            y, models, baselines, block_length=length, resamples=settings.resamples,
            confidence=settings.confidence, seed=settings.seed + fold.index,
        )  # fmt: skip
        result.calibration = {MODEL_NAMES[k]: c.calibration_note for k, c in trained.candidates.items()}
        pooled_y.append(y)
        pooled_t.append(data.t[split.test])
        for name, p in models.items():
            pooled_models[name].append(p)
        for name, p in baselines.items():
            pooled_baselines.setdefault(name, []).append(p)
        for kind in trained.candidates:
            drops[MODEL_NAMES[kind]].append(_permutation_drops(trained, kind, settings.seed + fold.index))
    y_all = np.concatenate(pooled_y)
    models_all = {name: np.concatenate(parts) for name, parts in pooled_models.items()}
    baselines_all = {name: np.concatenate(parts) for name, parts in pooled_baselines.items()}
    t_all = np.concatenate(pooled_t)
    pooled_minimum = statistics.horizon_rows(t_all, options.delta_ms, options.tick_ms)
    say(f"{dataset.source.name}: block bootstrap of the pooled out-of-sample predictions ({y_all.size} rows)")
    length = statistics.block_length(
        [y_all, *models_all.values(), *((p - y_all) ** 2 for p in models_all.values())], minimum=pooled_minimum
    )
    pooled = statistics.bootstrap(
        y_all, models_all, baselines_all, block_length=length, resamples=settings.resamples,
        confidence=settings.confidence, seed=settings.seed,
    )  # fmt: skip
    names = data.feature_names
    importance = {}
    for model, per_fold in drops.items():
        matrix = np.vstack(per_fold)
        mean, std = matrix.mean(axis=0), matrix.std(axis=0)
        ranked = sorted(zip(names, mean.tolist(), std.tolist(), strict=True), key=lambda item: -item[1])
        importance[model] = ranked
    return Evaluation(
        dataset, fold_results, pooled, importance, seconds=time.perf_counter() - began, block_rows_minimum=minimum
    )


def _permutation_drops(trained: TrainingResult, kind: str, seed: int) -> NDArray[np.float64]:
    """AUC on the test window minus the AUC with each feature's column shuffled (mean of the repeats)."""
    candidate = trained.candidates[kind]
    x, y = trained.x_test, trained.y_test

    def auc_of(matrix: NDArray[np.float64]) -> float:
        from quotewatch.domain.ml.models import positive_probability

        p = positive_probability(candidate.model, matrix)
        if candidate.calibrator is not None:
            p = candidate.calibrator.apply(p)
        value = evaluation.roc_auc(y, p)
        return float(value) if value is not None else 0.5

    reference = auc_of(x)
    rng = np.random.default_rng(seed)
    drops = np.zeros(x.shape[1])
    shuffled = x.copy()
    for column in range(x.shape[1]):
        total = 0.0
        for _ in range(IMPORTANCE_REPEATS):
            shuffled[:, column] = x[rng.permutation(x.shape[0]), column]
            total += reference - auc_of(shuffled)
        shuffled[:, column] = x[:, column]
        drops[column] = total / IMPORTANCE_REPEATS
    return drops
