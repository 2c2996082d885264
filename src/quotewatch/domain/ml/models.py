"""The model side of QuoteWatch as pure code: feature matrices, scoring, sanity checks, the fallback.

No I/O, no clock, no Kafka, no MLflow: the trainer, inference and the backtest all score with
:func:`positive_probability` on a matrix from :func:`feature_matrix`, so a model version gives
the same p for the same feature record everywhere.

The feature spec (names and order of ``FeatureVector.values``, and its id) is owned by
:mod:`quotewatch.domain.market.features`; a trained model records the spec id and names it was trained
on, and inference refuses a model whose spec is not the one on the feature stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from quotewatch.core.records import FeatureVector, ModelRole, Prediction
from quotewatch.domain.market import features

FALLBACK_MODEL_NAME = "fallback-online-logistic"
"""model_name of predictions from the built-in fallback (role FALLBACK)."""
CHAMPION_ROLE: Final[ModelRole] = "CHAMPION"
CHALLENGER_ROLE: Final[ModelRole] = "CHALLENGER"
FALLBACK_ROLE: Final[ModelRole] = "FALLBACK"
"""``Prediction.model_role`` values (the ``quotewatch.ModelRole`` enum)."""


class FeatureSpecMismatchError(ValueError):
    """Feature vectors do not match the spec a model (or a batch) expects."""


def feature_names_for(feature_spec_id: str, n_features: int) -> tuple[str, ...]:
    """The names of the features of spec ``feature_spec_id``.

    The names of :mod:`quotewatch.domain.market.features` when it is the current spec; otherwise the
    positions ``x0, x1, …`` (a spec this build does not know, e.g. from an older feature service).
    """
    if feature_spec_id == features.FEATURE_SPEC_ID and len(features.FEATURE_NAMES) == n_features:
        return features.FEATURE_NAMES
    return tuple(f"x{i}" for i in range(n_features))


def feature_matrix(records: Sequence[FeatureVector], feature_spec_id: str | None = None) -> NDArray[np.float64]:
    """The (n, k) float64 matrix of the ``values`` of ``FeatureVector`` records.

    Raises:
        FeatureSpecMismatchError: a record has another spec id than ``feature_spec_id`` (default: the
            first record's), or the vectors differ in length.
    """
    if not records:
        return np.empty((0, 0), dtype=np.float64)
    expected = feature_spec_id if feature_spec_id is not None else records[0].feature_spec_id
    width = len(records[0].values)
    for index, record in enumerate(records):
        if record.feature_spec_id != expected:
            raise FeatureSpecMismatchError(
                f"record {index} has feature spec {record.feature_spec_id!r}, expected {expected!r}"
            )
        if len(record.values) != width:
            raise FeatureSpecMismatchError(f"record {index} has {len(record.values)} values, expected {width}")
    return np.asarray([record.values for record in records], dtype=np.float64)


def positive_probability(model: Any, features: NDArray[np.float64]) -> NDArray[np.float64]:
    """P(y = 1) for each row of ``features`` from a fitted binary classifier.

    Supports scikit-learn estimators and pipelines (``predict_proba``) and XGBoost (the sklearn
    API or a bare binary:logistic Booster, scored through the booster's ``inplace_predict``,
    which gives the same probabilities as ``predict_proba`` without building a DMatrix per call).

    **Row invariance.** Each row gets the same bits whether it is scored alone (inference, one
    vector per tick) or in a batch of any size at any position (backtest, trainer). XGBoost's
    tree sums are per row. scikit-learn's logistic regression is not: its ``X @ coef.T`` goes to
    BLAS, whose ``ddot`` (one row) and ``dgemv`` (many rows) sum in different orders (~1e-16
    apart). The trainer's LR model (a Pipeline of StandardScaler and a binary
    LogisticRegression) is therefore scored by :func:`_linear_probability` with the fitted
    parameters, in one fixed order of float operations per row (within 1e-15 of
    ``predict_proba``).
    """
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"features must be a 2-d matrix, got shape {matrix.shape}")
    linear = _linear_parameters(model)
    if linear is not None:
        return _linear_probability(linear, matrix)
    booster_of = getattr(model, "get_booster", None)
    booster = booster_of() if booster_of is not None else model if hasattr(model, "inplace_predict") else None
    if booster is not None:
        predicted = np.asarray(booster.inplace_predict(matrix), dtype=np.float64)
        return predicted.reshape(matrix.shape[0])
    probabilities = np.asarray(model.predict_proba(matrix), dtype=np.float64)
    return probabilities[:, 1]


_LinearParameters = tuple[NDArray[np.float64] | None, NDArray[np.float64] | None, NDArray[np.float64], float]
"""(mean or None, scale or None, coef, intercept) of the trainer's LR pipeline."""


def _linear_parameters(model: Any) -> _LinearParameters | None:
    """(mean, scale, coef, intercept) of a fitted Pipeline(StandardScaler, binary LogisticRegression), else None."""
    if not isinstance(model, Pipeline) or len(model.steps) != 2:
        return None
    scaler, classifier = model.steps[0][1], model.steps[1][1]
    if type(scaler) is not StandardScaler or type(classifier) is not LogisticRegression:
        return None
    coef = getattr(classifier, "coef_", None)
    if coef is None or coef.shape[0] != 1 or len(getattr(classifier, "classes_", ())) != 2:
        return None
    mean = scaler.mean_ if scaler.with_mean else None
    scale = scaler.scale_ if scaler.with_std else None
    return mean, scale, np.asarray(coef[0], dtype=np.float64), float(classifier.intercept_[0])


def _linear_probability(parameters: _LinearParameters, matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """``expit(((x - mean) / scale) . coef + intercept)`` per row, column by column in a fixed order."""
    mean, scale, coef, intercept = parameters
    if matrix.shape[1] != coef.shape[0]:
        raise ValueError(f"X has {matrix.shape[1]} features, but the model expects {coef.shape[0]}")
    if matrix.shape[0] == 1:
        # One row (inference scores a tick at a time): the same IEEE operations in the same order
        # as below -- subtract, divide, multiply, add, each rounded once -- on Python floats, which
        # skips ~25 tiny numpy calls (~5 µs instead of ~100 µs). expit stays numpy's.
        row = matrix[0].tolist()
        means = mean.tolist() if mean is not None else None
        scales = scale.tolist() if scale is not None else None
        z = intercept
        for column, weight in enumerate(coef.tolist()):
            value = row[column]
            if means is not None:
                value = value - means[column]
            if scales is not None:
                value = value / scales[column]
            z = z + value * weight
        return np.asarray(expit(np.array([z], dtype=np.float64)), dtype=np.float64)
    scaled = matrix - mean if mean is not None else matrix.copy()
    if scale is not None:
        scaled /= scale
    # Elementwise ufuncs only (no BLAS, no pairwise reduction): every row sees the same sequence of
    # operations, so its result does not depend on the other rows.
    logit = np.full(matrix.shape[0], intercept, dtype=np.float64)
    for column in range(coef.shape[0]):
        logit += scaled[:, column] * coef[column]
    return np.asarray(expit(logit), dtype=np.float64)


def is_valid_probability(p: float) -> bool:
    """True when ``p`` may be served: finite and within [0, 1]."""
    return math.isfinite(p) and 0.0 <= p <= 1.0


def prediction_record(
    vector: FeatureVector, p: float, model_name: str, model_version: str, role: ModelRole
) -> Prediction:
    """The ``Prediction`` record of ``p`` for a ``FeatureVector`` record: a pure function of both.

    ``ts_event`` is the tick t and ``ts_init`` the feature record's (never a clock). Inference
    and the backtest both build their records here, so they are byte-identical after serde.
    """
    return Prediction(
        ts_event=vector.ts_event,
        ts_init=vector.ts_init,
        exchange=vector.exchange,
        symbol=vector.symbol,
        p_change=p,
        model_name=model_name,
        model_version=model_version,
        model_role=role,
        feature_spec_id=vector.feature_spec_id,
    )


def probability_problems(p: NDArray[np.float64], rows: int) -> list[str]:
    """Why ``p`` is not a valid output for ``rows`` inputs (empty list when it is)."""
    problems = []
    if p.shape != (rows,):
        problems.append(f"expected {rows} probabilities, got shape {p.shape}")
        return problems
    finite = np.isfinite(p)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} of {rows} outputs are not finite (NaN or inf)")
    elif p.min() < 0 or p.max() > 1:
        problems.append(f"outputs outside [0, 1]: min {p.min():.6g}, max {p.max():.6g}")
    return problems


def canned_batch(n_features: int, recent: Iterable[Sequence[float]] = (), size: int = 32) -> NDArray[np.float64]:
    """A warm-up batch: the recent real feature vectors (up to ``size``), padded with fixed rows.

    The fixed rows (zeros, ones, minus ones, and a ramp) exercise a model even before any
    feature vector was seen; real vectors check it on the live distribution.
    """
    rows = [list(map(float, vector)) for vector in recent if len(vector) == n_features][-size:]
    fixed = [
        [0.0] * n_features,
        [1.0] * n_features,
        [-1.0] * n_features,
        [float(i) / max(1, n_features) for i in range(n_features)],
    ]
    rows.extend(fixed)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), n_features)


def warm_up_problems(
    model: Any,
    *,
    model_feature_spec_id: str | None,
    model_feature_names: Sequence[str],
    stream_feature_spec_id: str | None,
    batch: NDArray[np.float64],
) -> list[str]:
    """Why a freshly loaded model must not serve (empty list when it may).

    Checks: the model names a feature spec; it is the spec on the feature stream (when one has
    been seen or is known); the batch has the model's number of features; scoring the batch
    works and gives finite probabilities in [0, 1].
    """
    problems = []
    if not model_feature_spec_id:
        problems.append("the model does not record the feature spec it was trained on")
    elif stream_feature_spec_id is not None and model_feature_spec_id != stream_feature_spec_id:
        problems.append(
            f"feature spec mismatch: model trained on {model_feature_spec_id!r}, "
            f"the feature stream carries {stream_feature_spec_id!r}"
        )
    if batch.shape[1] != len(model_feature_names):
        problems.append(f"model expects {len(model_feature_names)} features, the stream has {batch.shape[1]}")
    if problems:
        return problems
    try:
        p = positive_probability(model, batch)
    except Exception as exc:  # noqa: BLE001 - any scoring failure disqualifies the model
        return [f"scoring the warm-up batch failed: {type(exc).__name__}: {exc}"]
    return probability_problems(p, batch.shape[0])


class OnlineFallback:
    """The model served before any is registered: an online logistic regression (river).

    It learns from delayed labels (:meth:`learn`) the feature vectors it scored, and predicts
    the base rate (Laplace-smoothed) until it has seen both classes. Its ``version`` is
    ``online-<n>`` with n the number of labels learnt, so a prediction names the exact state that
    produced it: labels learnt in the same order give the same model.
    """

    def __init__(self, learning_rate: float = 0.01) -> None:
        from river import linear_model, optim, preprocessing

        self._model = preprocessing.StandardScaler() | linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate)
        )
        self._learned = 0
        self._positives = 0

    @property
    def version(self) -> str:
        return f"online-{self._learned}"

    @property
    def learned(self) -> int:
        return self._learned

    def predict(self, values: Sequence[float]) -> float:
        """P(y = 1) for one feature vector: finite and in [0, 1] by construction."""
        if self._positives == 0 or self._positives == self._learned:
            return (self._positives + 1) / (self._learned + 2)
        p = float(self._model.predict_proba_one(_as_dict(values)).get(True, 0.0))
        if not math.isfinite(p):
            return (self._positives + 1) / (self._learned + 2)
        return min(1.0, max(0.0, p))

    def learn(self, values: Sequence[float], label: int) -> None:
        """Learn one (x(t), y(t)) pair; non-finite feature values are skipped as missing."""
        self._model.learn_one(_as_dict(values), bool(label))
        self._learned += 1
        self._positives += int(bool(label))


def _as_dict(values: Sequence[float]) -> dict[int, float]:
    return {i: float(v) for i, v in enumerate(values) if math.isfinite(v)}
