"""Probability calibration of a trained model: Platt scaling or isotonic regression, stored as JSON.

A registered model carries its calibrator in its MLmodel ``metadata`` under ``calibration`` (plain
numbers, never pickle: loading a model executes no code from its artifact), and
:meth:`quotewatch.domain.ml.registry.LoadedModel.predict` applies it after
:func:`quotewatch.domain.ml.models.positive_probability`, so inference, the backtest and the
trainer's gate all serve calibrated p. A model without the key is served as before.

- **Platt** (``{"method": "platt", "slope": a, "intercept": b}``): ``expit(a * logit(p) + b)``,
  a logistic regression of y on the model's logit. Monotone: the AUC is unchanged.
- **Isotonic** (``{"method": "isotonic", "x": [...], "y": [...]}``): the non-decreasing step
  function fitted by isotonic regression (scikit-learn's thresholds), linearly interpolated
  between its knots and constant beyond them, as scikit-learn's ``IsotonicRegression`` with
  ``out_of_bounds="clip"`` predicts. Its outputs are kept within ``[0.5 / n, 1 - 0.5 / n]`` (n
  the calibration rows): a knot at 0 or 1 says "never seen in n rows", not "impossible".

**Row invariance** (a tick gets the same bits alone or in a batch, as inference and the backtest
require): both are elementwise — scipy's ``logit``/``expit`` ufuncs and single IEEE operations,
or a binary search and one interpolation per row.

Which method, and on what data, is the trainer's business
(:mod:`quotewatch.services.trainer.calibration`): both are fitted on out-of-fold predictions of
the training window only, and the one with the lower log loss on a later fold is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit, logit

from quotewatch.domain.ml.evaluation import LOG_LOSS_EPSILON

METADATA_KEY = "calibration"
Method = Literal["platt", "isotonic"]
METHODS: tuple[Method, ...] = ("platt", "isotonic")
_P_CLIP = 1e-12
"""Platt scaling reads logit(p) with p clipped to [1e-12, 1 - 1e-12] (a model's exact 0 or 1 stays finite)."""


class CalibrationError(ValueError):
    """Calibration parameters that cannot be used (unknown method, malformed or non-finite numbers)."""


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration map p -> calibrated p (see the module doc for each method)."""

    method: Method
    slope: float = 1.0
    intercept: float = 0.0
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; one of {', '.join(METHODS)}")
        if self.method == "platt":
            if not (math.isfinite(self.slope) and math.isfinite(self.intercept)):
                raise CalibrationError("Platt parameters must be finite")
            return
        x, y = np.asarray(self.knots_x, dtype=np.float64), np.asarray(self.knots_y, dtype=np.float64)
        if x.size < 1 or x.shape != y.shape:
            raise CalibrationError(f"isotonic knots: {x.size} x values and {y.size} y values")
        if not (np.isfinite(x).all() and np.isfinite(y).all()) or y.min() < 0 or y.max() > 1:
            raise CalibrationError("isotonic knots must be finite, with y within [0, 1]")
        if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
            raise CalibrationError("isotonic knots must be non-decreasing in x and y")

    def apply(self, p: ArrayLike) -> NDArray[np.float64]:
        """The calibrated probability of each p (elementwise; finite p in [0, 1] in, the same out)."""
        values = np.asarray(p, dtype=np.float64)
        if self.method == "platt":
            z = logit(np.clip(values, _P_CLIP, 1.0 - _P_CLIP))
            return np.asarray(expit(z * self.slope + self.intercept), dtype=np.float64)
        return _interpolate(np.asarray(self.knots_x), np.asarray(self.knots_y), values)

    def to_json(self) -> dict[str, Any]:  # not a topic record: JSON calibration parameters
        """The parameters as plain JSON values (the ``calibration`` entry of the model's metadata)."""
        if self.method == "platt":
            return {"method": "platt", "slope": self.slope, "intercept": self.intercept}
        return {"method": "isotonic", "x": list(self.knots_x), "y": list(self.knots_y)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Calibrator:  # not a topic record: JSON parameters
        """Parse :meth:`to_json`'s output.

        Raises:
            CalibrationError: not a calibration this build knows, or malformed numbers.
        """
        try:
            method = value["method"]
            if method == "platt":
                return cls("platt", slope=float(value["slope"]), intercept=float(value["intercept"]))
            if method == "isotonic":
                return cls(
                    "isotonic",
                    knots_x=tuple(float(v) for v in value["x"]),
                    knots_y=tuple(float(v) for v in value["y"]),
                )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"malformed calibration parameters: {exc!r}") from exc
        raise CalibrationError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")

    def describe(self) -> str:
        if self.method == "platt":
            return f"Platt (slope {self.slope:.4g}, intercept {self.intercept:+.4g})"
        return f"isotonic ({len(self.knots_x)} knots)"


def from_metadata(metadata: Mapping[str, Any] | None) -> Calibrator | None:  # not a topic record: MLmodel metadata
    """The calibrator stored in a model's MLmodel metadata, or None when it has none.

    Raises:
        CalibrationError: the entry exists but cannot be used.
    """
    if not metadata or metadata.get(METADATA_KEY) is None:
        return None
    entry = metadata[METADATA_KEY]
    if not isinstance(entry, Mapping):
        raise CalibrationError(f"the model's calibration entry is a {type(entry).__name__}, not a mapping")
    return Calibrator.from_json(entry)


def _interpolate(x: NDArray[np.float64], y: NDArray[np.float64], p: NDArray[np.float64]) -> NDArray[np.float64]:
    """Piecewise-linear through the knots, constant beyond them; one binary search and one formula per row."""
    if x.size == 1:
        return np.full(p.shape, y[0], dtype=np.float64)
    clipped = np.clip(p, x[0], x[-1])
    right = np.clip(np.searchsorted(x, clipped, side="right"), 1, x.size - 1)
    left = right - 1
    x0, x1, y0, y1 = x[left], x[right], y[left], y[right]
    span = x1 - x0
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(span > 0, (clipped - x0) / np.where(span > 0, span, 1.0), 0.0)
    return np.asarray(y0 + fraction * (y1 - y0), dtype=np.float64)


def fit_platt(p: ArrayLike, y: ArrayLike) -> Calibrator:
    """Platt scaling: a (nearly unregularised) logistic regression of ``y`` on ``logit(p)``.

    Raises:
        ValueError: one class only.
    """
    from sklearn.linear_model import LogisticRegression

    values, outcomes = _check(p, y)
    z = logit(np.clip(values, _P_CLIP, 1.0 - _P_CLIP)).reshape(-1, 1)
    model = LogisticRegression(C=1e6, max_iter=1000).fit(z, outcomes)
    return Calibrator("platt", slope=float(model.coef_[0, 0]), intercept=float(model.intercept_[0]))


def fit_isotonic(p: ArrayLike, y: ArrayLike) -> Calibrator:
    """Isotonic regression of ``y`` on ``p`` (scikit-learn), as knots clipped to [0.5/n, 1 - 0.5/n].

    Raises:
        ValueError: one class only.
    """
    from sklearn.isotonic import IsotonicRegression

    values, outcomes = _check(p, y)
    floor = 0.5 / values.size
    model = IsotonicRegression(out_of_bounds="clip", y_min=floor, y_max=1.0 - floor).fit(values, outcomes)
    return Calibrator(
        "isotonic",
        knots_x=tuple(float(v) for v in model.X_thresholds_),
        knots_y=tuple(float(v) for v in model.y_thresholds_),
    )


def fit(method: Method, p: ArrayLike, y: ArrayLike) -> Calibrator:
    """Fit ``method`` on predictions ``p`` with outcomes ``y``."""
    return fit_platt(p, y) if method == "platt" else fit_isotonic(p, y)


def _check(p: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    values = np.asarray(p, dtype=np.float64).ravel()
    outcomes = np.asarray(y, dtype=np.int64).ravel()
    if values.shape != outcomes.shape:
        raise ValueError(f"{values.size} probabilities but {outcomes.size} outcomes")
    if np.unique(outcomes).size < 2:
        raise ValueError("calibration needs both classes")
    if not np.isfinite(values).all():
        raise ValueError("probabilities must be finite")
    return values, outcomes


def log_loss_of(p: NDArray[np.float64], y: NDArray[np.int64]) -> float:
    """Mean log loss (clipped as :mod:`quotewatch.domain.ml.evaluation` does)."""
    observed = np.where(y == 1, p, 1.0 - p)
    return float(-np.mean(np.log(np.clip(observed, LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON))))
