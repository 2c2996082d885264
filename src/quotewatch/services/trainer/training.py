"""Training from DataFrames: join features with labels, split by time, fit, evaluate, gate.

No MLflow and no lake here (see :mod:`quotewatch.services.trainer.publish` and :mod:`quotewatch.services.trainer.main`):
everything takes the ``qw.features`` and ``qw.labels`` rows as pandas DataFrames shaped like the
Avro records (the lake's columns), so it is tested without a server.

**Split.** By time, never shuffled: the test window is the last ``test_fraction`` of the time
range; the training window ends at least ``gap`` (≥ Δ) before the test window starts, so no
training label (known at t + Δ) looks into the test window.

**Models.** ``lr``: one scikit-learn Pipeline of StandardScaler and LogisticRegression (the scaler
ships inside the model). ``xgb``: XGBoost's XGBClassifier with ``max_depth`` 4 (no scaling needed).
Both are scored with :func:`quotewatch.domain.ml.models.positive_probability`, as inference does,
then calibrated (Platt or isotonic, chosen on the training window only:
:mod:`quotewatch.services.trainer.calibration`); the calibrator ships with the registered model.

**Judged with intervals.** Each candidate's AUC lift over the best naive baseline on the test
window comes with its 95 % moving-block bootstrap interval
(:func:`quotewatch.domain.ml.statistics.bootstrap`); the gate reads its lower bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from quotewatch.core.config import TrainerSettings
from quotewatch.core.records import FeatureVector, Label
from quotewatch.domain.ml import evaluation, statistics
from quotewatch.domain.ml.calibration import Calibrator
from quotewatch.domain.ml.evaluation import BaselineFit, Scores
from quotewatch.domain.ml.models import feature_names_for, positive_probability
from quotewatch.domain.ml.statistics import Interval

Params = dict[str, Any]  # not a topic record: model parameters and descriptions logged to MLflow

logger = logging.getLogger(__name__)

ModelKind = Literal["lr", "xgb"]
MODEL_KINDS: tuple[ModelKind, ...] = ("lr", "xgb")
GateMetric = Literal["auc", "brier", "log_loss"]
NS_PER_MS = 1_000_000


class TrainingDataError(ValueError):
    """The lake rows cannot make a training set (too few rows, one class only, no matching spec)."""


@dataclass(frozen=True)
class TrainingOptions:
    """How to split, fit and judge (the trainer's settings, as plain values)."""

    delta_ms: int
    test_fraction: float = 0.25
    gap_ms: int | None = None
    """Default and minimum: ``delta_ms``."""
    baseline_window_ms: int = 10_000
    min_train_rows: int = 200
    min_test_rows: int = 50
    lr_c: float = 1.0
    xgb_max_depth: int = 4
    xgb_n_estimators: int = 200
    xgb_learning_rate: float = 0.1
    xgb_threads: int = 2
    random_state: int = 7
    tick_ms: int = 100
    """The grid step: with ``delta_ms`` it gives the label horizon in ticks (the bootstrap's shortest block)."""
    calibrate: bool = True
    """Choose and fit a calibrator on the training window (:mod:`quotewatch.services.trainer.calibration`)."""
    bootstrap_resamples: int = statistics.DEFAULT_RESAMPLES

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> TrainingOptions:
        """The split and fit settings the trainer and the quality report both take from TrainerSettings;
        each caller sets what it chooses differently with :func:`dataclasses.replace`."""
        return cls(
            delta_ms=settings.delta_ms,
            gap_ms=settings.split_gap_ms,
            baseline_window_ms=settings.baseline_window_ms,
            min_train_rows=settings.min_train_rows,
            min_test_rows=settings.min_test_rows,
            lr_c=settings.lr_c,
            xgb_max_depth=settings.xgb_max_depth,
            xgb_n_estimators=settings.xgb_n_estimators,
            xgb_learning_rate=settings.xgb_learning_rate,
            xgb_threads=settings.xgb_threads,
        )


@dataclass(frozen=True)
class GateThresholds:
    """What a candidate must reach before it may replace the champion."""

    min_auc: float = 0.5
    """The test AUC must be at least this."""
    min_auc_lift: float = 0.0
    """…and the lower bound of the 95 % interval of its AUC lift over the best naive baseline must be above this."""
    max_brier_ratio: float = 1.0
    """The test Brier must be below this fraction of the base-rate baseline's Brier."""
    metric: GateMetric = "auc"
    """The metric on which the candidate must beat the champion (and which picks the candidate)."""


@dataclass
class TrainingSet:
    """Feature vectors joined with their labels, in time order."""

    feature_spec_id: str
    feature_names: tuple[str, ...]
    symbols: NDArray[np.str_]
    t: NDArray[np.int64]
    x: NDArray[np.float64]
    y: NDArray[np.int64]
    labels: pd.DataFrame
    """Every label row (symbol, t_event, label), for the baselines' history."""
    current_feature_spec_id: str
    """The spec of the newest feature vector among the rows: the spec the stream carries now, as far
    as the lake shows. ``feature_spec_id`` is this one unless another was asked for."""
    dropped_other_spec: int = 0


@dataclass
class Split:
    """Row masks of the training and test windows of a :class:`TrainingSet`."""

    train: NDArray[np.bool_]
    test: NDArray[np.bool_]
    train_end_ns: int
    """Exclusive end of the training window (by t)."""
    test_start_ns: int
    gap_ns: int

    def describe(self, data: TrainingSet) -> Params:
        return {
            "train_rows": int(self.train.sum()),
            "test_rows": int(self.test.sum()),
            "train_start_ns": int(data.t[self.train].min()),
            "train_end_ns": int(data.t[self.train].max()),
            "test_start_ns": int(data.t[self.test].min()),
            "test_end_ns": int(data.t[self.test].max()),
            "gap_ms": self.gap_ns // NS_PER_MS,
        }


@dataclass
class Candidate:
    """One fitted model and its scores on the test window."""

    kind: ModelKind
    model: Any
    params: Params
    scores: Scores
    p_test: NDArray[np.float64]
    """Calibrated (when a calibrator was fitted): what the registered model serves."""
    calibrator: Calibrator | None = None
    calibration_note: str = ""
    lift: Interval = field(default_factory=lambda: Interval(None))
    """AUC lift over the best naive baseline on the test window, with its 95 % block-bootstrap interval."""
    block_length: int = 0
    """Rows per bootstrap block (Politis-White, at least the label horizon)."""


@dataclass
class TrainingResult:
    data: TrainingSet
    split: Split
    baseline_fit: BaselineFit
    baselines: dict[str, Scores]
    baseline_p_test: dict[str, NDArray[np.float64]]
    candidates: dict[str, Candidate] = field(default_factory=dict)

    @property
    def x_test(self) -> NDArray[np.float64]:
        return self.data.x[self.split.test]

    @property
    def y_test(self) -> NDArray[np.int64]:
        return self.data.y[self.split.test]

    def best(self, metric: GateMetric) -> Candidate:
        """The candidate that is best on ``metric`` (ties: the first kind trained)."""
        return max(self.candidates.values(), key=lambda c: metric_value(c.scores, metric))


# -- data -------------------------------------------------------------------------------------------


def records_frame(records: Sequence[FeatureVector] | Sequence[Label]) -> pd.DataFrame:
    """The typed records as a table with one column per field (the lake's columns of that topic).

    Who calls this: backtests and tests that train on records made in-process rather than read
    from the lake (:func:`build_training_set` takes tables).
    """
    return pd.DataFrame(msgspec.to_builtins(list(records)))


def build_training_set(features: pd.DataFrame, labels: pd.DataFrame, feature_spec_id: str | None = None) -> TrainingSet:
    """Join ``qw.features`` rows with ``qw.labels`` rows on (symbol, t).

    ``features.ts_event`` is the tick t; ``labels.t_event`` is the tick it labels. Duplicated
    rows (the same (symbol, t) twice) are kept once. Feature vectors of a spec other than
    ``feature_spec_id`` are dropped and counted. Labels whose ``synced_over_horizon`` is false are
    dropped (the synced-only rule); a missing or null flag (rows written before the field
    existed, when every label was synced) counts as true.

    The default ``feature_spec_id`` is :func:`current_feature_spec`, the spec of the newest vector:
    the one the stream carries now, which the model will be asked to score. (The most frequent spec
    would be the old one for a while after a feature-spec upgrade: a model of it is refused by
    inference at warm-up, and the gate could not compare it with a champion of the new spec.)

    Raises:
        TrainingDataError: nothing joins.
    """
    for name, frame, needed in (
        ("features", features, ("symbol", "ts_event", "feature_spec_id", "values")),
        ("labels", labels, ("symbol", "t_event", "label")),
    ):
        missing = [column for column in needed if column not in frame.columns]
        if missing:
            raise TrainingDataError(f"{name} rows lack column(s) {missing}")
    if features.empty or labels.empty:
        raise TrainingDataError(f"nothing to train on: {len(features)} feature rows, {len(labels)} label rows")
    if "synced_over_horizon" in labels.columns:
        labels = labels[labels["synced_over_horizon"].fillna(True).astype(bool)]
    current = current_feature_spec(features)
    spec = feature_spec_id or current
    same_spec = features[features["feature_spec_id"] == spec]
    dropped = len(features) - len(same_spec)
    if dropped:
        logger.warning("dropping feature vectors of other specs", extra={"kept_spec": spec, "dropped": dropped})
    left = (
        same_spec[["symbol", "ts_event", "values"]]
        .drop_duplicates(subset=["symbol", "ts_event"])
        .rename(columns={"ts_event": "t"})
    )
    label_rows = labels[["symbol", "t_event", "label"]].drop_duplicates(subset=["symbol", "t_event"])
    right = label_rows.rename(columns={"t_event": "t"})
    joined = left.merge(right, on=["symbol", "t"], how="inner").sort_values(["t", "symbol"], kind="stable")
    if joined.empty:
        raise TrainingDataError(
            f"no feature vector of spec {spec} has a label ({len(left)} vectors, {len(right)} labels)"
        )
    widths = joined["values"].map(len)
    if widths.nunique() != 1:
        raise TrainingDataError(f"feature vectors of spec {spec} differ in length: {sorted(widths.unique())}")
    x = np.stack([np.asarray(v, dtype=np.float64) for v in joined["values"]])
    return TrainingSet(
        feature_spec_id=spec,
        feature_names=feature_names_for(spec, x.shape[1]),
        symbols=joined["symbol"].to_numpy(dtype=str),
        t=joined["t"].to_numpy(dtype=np.int64),
        x=x,
        y=joined["label"].to_numpy(dtype=np.int64),
        labels=label_rows.reset_index(drop=True),
        current_feature_spec_id=current,
        dropped_other_spec=dropped,
    )


def current_feature_spec(features: pd.DataFrame) -> str:
    """The spec of the newest feature vector (largest ``ts_event``): the spec the stream carries now.

    When vectors of several specs share that instant (old and new feature services running side
    by side during an upgrade), the spec that appeared last among the rows wins: the newer one.
    """
    newest = features["ts_event"].max()
    at_newest = sorted(str(spec) for spec in features.loc[features["ts_event"] == newest, "feature_spec_id"].unique())
    if len(at_newest) == 1:
        return at_newest[0]
    first_seen = features.groupby("feature_spec_id")["ts_event"].min()
    return max(at_newest, key=lambda spec: int(first_seen[spec]))


def time_split(data: TrainingSet, options: TrainingOptions) -> Split:
    """Training window first, then a gap of at least Δ, then the test window (the last fraction).

    Raises:
        TrainingDataError: a window is too small or has one class only.
    """
    gap_ms = max(options.gap_ms or options.delta_ms, options.delta_ms)
    gap_ns = gap_ms * NS_PER_MS
    start, end = int(data.t.min()), int(data.t.max())
    test_start = start + int((end - start) * (1.0 - options.test_fraction))
    test = data.t >= test_start
    train = data.t < test_start - gap_ns
    split = Split(train=train, test=test, train_end_ns=test_start - gap_ns, test_start_ns=test_start, gap_ns=gap_ns)
    n_train, n_test = int(train.sum()), int(test.sum())
    if n_train < options.min_train_rows or n_test < options.min_test_rows:
        raise TrainingDataError(
            f"too little data: {n_train} training rows (need {options.min_train_rows}), "
            f"{n_test} test rows (need {options.min_test_rows}) over {(end - start) / 1e9:.1f}s"
        )
    for name, mask in (("training", train), ("test", test)):
        if np.unique(data.y[mask]).size < 2:
            raise TrainingDataError(f"the {name} window has one class only (y = {int(data.y[mask][0])})")
    return split


# -- models -----------------------------------------------------------------------------------------


def fit_model(
    kind: ModelKind,
    x: NDArray[np.float64],
    y: NDArray[np.int64],
    options: TrainingOptions,
    on_round: Callable[[int, int], None] | None = None,
) -> tuple[Any, Params]:
    """Fit one model kind; return it with its hyper-parameters.

    Args:
        on_round: XGBoost progress ``(round, total)``, called after each boosting round.
    """
    if kind == "lr":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        params: Params = {"model": "lr", "C": options.lr_c, "max_iter": 1000, "scaler": "standard"}
        model = Pipeline(
            [
                ("scaler", StandardScaler()),
                ("logistic", LogisticRegression(C=options.lr_c, max_iter=1000)),
            ]
        )
        model.fit(x, y)
        return model, params
    if kind == "xgb":
        from xgboost import XGBClassifier
        from xgboost.callback import TrainingCallback

        class _Progress(TrainingCallback):
            def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
                if on_round is not None:
                    on_round(epoch + 1, options.xgb_n_estimators)
                return False

        params = {
            "model": "xgb",
            "max_depth": options.xgb_max_depth,
            "n_estimators": options.xgb_n_estimators,
            "learning_rate": options.xgb_learning_rate,
            "objective": "binary:logistic",
            "tree_method": "hist",
        }
        classifier = XGBClassifier(
            max_depth=options.xgb_max_depth,
            n_estimators=options.xgb_n_estimators,
            learning_rate=options.xgb_learning_rate,
            objective="binary:logistic",
            tree_method="hist",
            n_jobs=options.xgb_threads,
            random_state=options.random_state,
            callbacks=[_Progress()],
        )
        classifier.fit(x, y)
        # The progress callback is a local class: drop it so the model serialises cleanly.
        classifier.set_params(callbacks=None)
        return classifier, params
    raise ValueError(f"unknown model kind {kind!r}; one of {', '.join(MODEL_KINDS)}")


def train(
    data: TrainingSet,
    options: TrainingOptions,
    kinds: Sequence[ModelKind] = MODEL_KINDS,
    progress: Callable[[str], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> TrainingResult:
    """Split, fit the baselines and each model kind, and score everything on the test window."""
    return train_on_split(data, time_split(data, options), options, kinds, progress, on_round)


def train_on_split(
    data: TrainingSet,
    split: Split,
    options: TrainingOptions,
    kinds: Sequence[ModelKind] = MODEL_KINDS,
    progress: Callable[[str], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> TrainingResult:
    """Fit the baselines and each model kind on ``split.train`` and score everything on ``split.test``.

    :func:`train` with its own split; the quality report calls it once per walk-forward fold.
    """
    say = progress or (lambda message: None)
    train_label_mask = data.labels["t_event"].to_numpy(dtype=np.int64) < split.train_end_ns
    train_labels = data.labels[train_label_mask]
    fit = evaluation.fit_baselines(
        train_labels["symbol"].to_numpy(dtype=str),
        train_labels["t_event"].to_numpy(dtype=np.int64),
        train_labels["label"].to_numpy(dtype=np.int64),
        options.delta_ms,
        options.baseline_window_ms,
    )
    history = evaluation.baseline_probabilities(
        fit,
        data.labels["symbol"].to_numpy(dtype=str),
        data.labels["t_event"].to_numpy(dtype=np.int64),
        data.labels["label"].to_numpy(dtype=np.int64),
    )
    lookup = pd.MultiIndex.from_arrays([data.labels["symbol"].to_numpy(dtype=str), data.labels["t_event"].to_numpy()])
    test_index = pd.MultiIndex.from_arrays([data.symbols[split.test], data.t[split.test]])
    positions = lookup.get_indexer(test_index)
    y_test = data.y[split.test]
    baseline_p = {name: p[positions] for name, p in history.items()}
    baselines = {name: evaluation.score(y_test, p) for name, p in baseline_p.items()}
    result = TrainingResult(data, split, fit, baselines, baseline_p)
    x_train, y_train = data.x[split.train], data.y[split.train]
    for kind in kinds:
        say(f"fitting {kind} on {len(y_train)} rows x {data.x.shape[1]} features")
        model, params = fit_model(kind, x_train, y_train, options, on_round=on_round)
        p_test = positive_probability(model, data.x[split.test])
        calibrator, note = None, "calibration off"
        if options.calibrate:
            from quotewatch.services.trainer.calibration import choose_calibration

            say(f"choosing the calibration of {kind} on the training window")
            choice = choose_calibration(kind, x_train, y_train, data.t[split.train], options)
            calibrator, note = choice.calibrator, choice.reason
            if calibrator is not None:
                p_test = calibrator.apply(p_test)
        params["calibration"] = calibrator.method if calibrator is not None else "none"
        lift, length = lift_interval(y_test, p_test, baseline_p, data.t[split.test], options)
        result.candidates[kind] = Candidate(
            kind, model, params, evaluation.score(y_test, p_test), p_test, calibrator, note, lift, length
        )
    return result


def lift_interval(
    y: NDArray[np.int64],
    p: NDArray[np.float64],
    baselines: Mapping[str, NDArray[np.float64]],
    t: NDArray[np.int64],
    options: TrainingOptions,
) -> tuple[Interval, int]:
    """(AUC lift of ``p`` over the best of ``baselines`` with its 95 % interval, the block length in rows).

    Rows in time order (a :class:`TrainingSet` is sorted by t). The block length is the
    Politis-White length of y, p and (p - y)^2, at least the label horizon (Δ / TICK ticks).
    """
    minimum = statistics.horizon_rows(t, options.delta_ms, options.tick_ms)
    length = statistics.block_length([y, p, (p - y) ** 2], minimum=minimum)
    result = statistics.bootstrap(
        y,
        {"model": p},
        baselines,
        block_length=length,
        resamples=options.bootstrap_resamples,
        seed=options.random_state,
    )
    return result.lifts["model"], result.block_length


# -- the gate ---------------------------------------------------------------------------------------


def metric_value(scores: Scores, metric: GateMetric) -> float:
    """``metric`` oriented so that larger is better (Brier and log loss are negated); -inf if undefined."""
    value = {"auc": scores.roc_auc, "brier": scores.brier, "log_loss": scores.log_loss}[metric]
    if value is None:
        return float("-inf")
    return float(value) if metric == "auc" else -float(value)
