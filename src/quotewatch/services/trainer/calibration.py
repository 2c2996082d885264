"""Choosing and fitting a model's calibration on its training window only.

Who calls this: :func:`quotewatch.services.trainer.training.train` for every model kind, and the
quality report for every walk-forward fold, after the model was fitted on the whole training window.

**Out-of-fold predictions.** Calibrating on the predictions of a model on its own training rows
would calibrate its over-confidence on data it has memorised. So the training window is cut in
two forward folds: the model kind is fitted on the first half (minus the gap ≥ Δ) and predicts the
third quarter, then on the first three quarters (minus the gap) and predicts the last quarter.
Those predictions are out of sample, in time order, like the test window's will be.

**The choice.** Platt and isotonic are each fitted on the third quarter's predictions and judged
by their log loss on the last quarter's (later data, as the test window is later); the one with
the lower log loss wins, and is refitted on both quarters' predictions. The final model (fitted on
the whole training window) is calibrated with it. Nothing of the test window is used.
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
    half, three_quarters = start + (end - start) // 2, start + 3 * (end - start) // 4
    stretches = []
    for fit_end, predict_start, predict_end in ((half, half, three_quarters), (three_quarters, three_quarters, end)):
        fit_rows = t < fit_end - gap_ns
        predict_rows = (t >= predict_start) & (t < predict_end)
        counts = [int(np.count_nonzero(y[rows] == cls)) for rows in (fit_rows, predict_rows) for cls in (0, 1)]
        if min(counts) < MIN_CLASS_ROWS:
            return CalibrationChoice(
                None,
                reason=f"not calibrated: an out-of-fold stretch of the training window has fewer than "
                f"{MIN_CLASS_ROWS} rows of a class ({counts[0]}/{counts[1]} fit, {counts[2]}/{counts[3]} held out)",
            )
        model, _ = fit_model(kind, x[fit_rows], y[fit_rows], options)
        stretches.append((positive_probability(model, x[predict_rows]), y[predict_rows]))
    (p_first, y_first), (p_second, y_second) = stretches
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
