"""Choosing and fitting a model's calibration on its training window only.

Who calls this: :func:`quotewatch.services.trainer.training.train` for every model kind, and the
quality report for every walk-forward fold, after the model was fitted on the whole training window.

**Out-of-fold predictions.** Calibrating on the predictions of a model on its own training rows
would calibrate its over-confidence on data it has memorised. So the model kind is fitted once
more on the first two thirds of the training window (minus the gap ≥ Δ) and predicts the last
third: out-of-sample predictions, later than the data the model saw, as the test window's will be.

**The choice.** Platt and isotonic are each fitted on the first half of those predictions (in time)
and judged by their log loss on the second half; the one with the lower log loss wins, and is
refitted on all of them. The final model (fitted on the whole training window) is calibrated with
it. Nothing of the test window is used. (One extra fit per model: two forward folds cost a second
fit of XGBoost for little gain in the choice.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from quotewatch.domain.ml import calibration
from quotewatch.domain.ml.calibration import METHODS, Calibrator
from quotewatch.domain.ml.models import positive_probability
from quotewatch.services.trainer.training import ModelKind, TrainingOptions, fit_model

MIN_CLASS_ROWS = 5
"""Each out-of-fold stretch needs this many rows of each class, or the model is left uncalibrated."""


@dataclass
class CalibrationChoice:
    """The calibrator chosen for a model (None: not enough data in the training window) and why."""

    calibrator: Calibrator | None
    held_out_log_loss: dict[str, float] = field(default_factory=dict)
    """Log loss on the last quarter of the training window: ``uncalibrated`` and each method."""
    reason: str = ""


def choose_calibration(
    kind: ModelKind, x: NDArray[np.float64], y: NDArray[np.int64], t: NDArray[np.int64], options: TrainingOptions
) -> CalibrationChoice:
    """Pick and fit Platt or isotonic calibration for ``kind`` from its training rows (see the module doc)."""
    gap_ns = max(options.gap_ms or options.delta_ms, options.delta_ms) * 1_000_000
    start, end = int(t.min()), int(t.max()) + 1
    cut = start + 2 * (end - start) // 3
    fit_rows = t < cut - gap_ns
    held_out = np.flatnonzero(t >= cut)
    first, second = held_out[: held_out.size // 2], held_out[held_out.size // 2 :]
    counts = [int(np.count_nonzero(y[rows] == cls)) for rows in (fit_rows, first, second) for cls in (0, 1)]
    if min(counts) < MIN_CLASS_ROWS:
        return CalibrationChoice(
            None,
            reason=f"not calibrated: a stretch of the training window has fewer than {MIN_CLASS_ROWS} rows of a "
            f"class (negatives/positives: {counts[0]}/{counts[1]} to fit, {counts[2]}/{counts[3]} and "
            f"{counts[4]}/{counts[5]} held out)",
        )
    model, _ = fit_model(kind, x[fit_rows], y[fit_rows], options)
    p_first, p_second = positive_probability(model, x[first]), positive_probability(model, x[second])
    y_first, y_second = y[first], y[second]
    losses = {"uncalibrated": calibration.log_loss_of(p_second, y_second)}
    for method in METHODS:
        losses[method] = calibration.log_loss_of(calibration.fit(method, p_first, y_first).apply(p_second), y_second)
    best = min(METHODS, key=lambda method: losses[method])
    fitted = calibration.fit(best, np.concatenate([p_first, p_second]), np.concatenate([y_first, y_second]))
    return CalibrationChoice(
        fitted,
        losses,
        f"{best}: held-out log loss {losses[best]:.4f} (uncalibrated {losses['uncalibrated']:.4f}, "
        + ", ".join(f"{m} {losses[m]:.4f}" for m in METHODS)
        + ")",
    )
