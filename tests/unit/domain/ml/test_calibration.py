"""Platt and isotonic calibration: known cases, JSON parameters, row invariance, applied by LoadedModel."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression

from quotewatch.domain.ml import calibration
from quotewatch.domain.ml.calibration import CalibrationError, Calibrator, fit_isotonic, fit_platt, from_metadata
from quotewatch.domain.ml.models import positive_probability
from quotewatch.domain.ml.registry import LoadedModel
from quotewatch.services.trainer.calibration import choose_calibration
from quotewatch.services.trainer.training import TrainingOptions, fit_model

MS = 1_000_000


def logistic_sample(n: int, seed: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """True probabilities expit(z); a model that reports expit(confidence * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=n)
    y = (rng.random(n) < expit(z)).astype(np.int64)
    return expit(confidence * z), y


def test_platt_recovers_the_identity_and_undoes_overconfidence() -> None:
    calibrated, y = logistic_sample(40_000, 1, 1.0)
    identity = fit_platt(calibrated, y)
    assert identity.slope == pytest.approx(1.0, abs=0.05)
    assert identity.intercept == pytest.approx(0.0, abs=0.05)
    overconfident, y = logistic_sample(40_000, 2, 3.0)
    fixed = fit_platt(overconfident, y)
    assert fixed.slope == pytest.approx(1 / 3, abs=0.02), "logit(p) = 3z, so the true logit is logit(p) / 3"
    assert calibration.log_loss_of(fixed.apply(overconfident), y) < calibration.log_loss_of(overconfident, y) - 0.05


def test_isotonic_predicts_as_scikit_learn_within_its_clip() -> None:
    p, y = logistic_sample(3_000, 3, 2.0)
    fitted = fit_isotonic(p, y)
    floor = 0.5 / p.size
    reference = IsotonicRegression(out_of_bounds="clip", y_min=floor, y_max=1 - floor).fit(p, y)
    probe = np.concatenate([np.linspace(-0.1, 1.1, 500), p[:500]])
    np.testing.assert_allclose(fitted.apply(probe), reference.predict(probe), rtol=0, atol=1e-12)
    out = fitted.apply(np.sort(probe))
    assert (np.diff(out) >= 0).all(), "non-decreasing"
    assert out.min() >= floor, "never exactly 0"
    assert out.max() <= 1 - floor, "never exactly 1"


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(method: str) -> None:
    p, y = logistic_sample(2_000, 4, 2.0)
    fitted = calibration.fit(method, p, y)  # type: ignore[arg-type]  # parametrised with the two methods
    probe = np.random.default_rng(5).random(777)
    batch = fitted.apply(probe)
    alone = np.array([fitted.apply(probe[i : i + 1])[0] for i in range(probe.size)])
    np.testing.assert_array_equal(batch, alone)
    assert np.isfinite(batch).all()
    assert batch.min() >= 0
    assert batch.max() <= 1


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_the_parameters_are_plain_json_and_round_trip(method: str) -> None:
    import json

    p, y = logistic_sample(1_000, 6, 2.0)
    fitted = calibration.fit(method, p, y)  # type: ignore[arg-type]  # parametrised with the two methods
    stored = json.loads(json.dumps(fitted.to_json()))
    again = from_metadata({"feature_spec_id": "x", "calibration": stored})
    assert again == fitted
    np.testing.assert_array_equal(again.apply(p), fitted.apply(p))


def test_metadata_without_calibration_and_malformed_parameters() -> None:
    assert from_metadata(None) is None
    assert from_metadata({"feature_spec_id": "x"}) is None
    for bad in (
        {"method": "beta"},
        {"method": "platt", "slope": "nan", "intercept": 0},
        {"method": "platt"},
        {"method": "isotonic", "x": [0.0, 1.0], "y": [0.5]},
        {"method": "isotonic", "x": [0.0, 1.0], "y": [0.9, 0.1]},
        {"method": "isotonic", "x": [0.0, 1.0], "y": [0.1, 1.5]},
    ):
        with pytest.raises(CalibrationError):
            from_metadata({"calibration": bad})
    with pytest.raises(CalibrationError, match="not a mapping"):
        from_metadata({"calibration": "platt"})
    with pytest.raises(ValueError, match="both classes"):
        fit_platt([0.1, 0.2], [1, 1])


def test_a_loaded_model_serves_calibrated_probabilities() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(500, 3))
    y = (x[:, 0] + rng.normal(size=500) > 0).astype(np.int64)
    model, _ = fit_model("lr", x, y, TrainingOptions(delta_ms=500))
    platt = Calibrator("platt", slope=0.5, intercept=0.2)
    plain = LoadedModel("m", "1", "sklearn", model, "spec", ("a", "b", "c"))
    calibrated = LoadedModel("m", "1", "sklearn", model, "spec", ("a", "b", "c"), calibrator=platt)
    raw = positive_probability(model, x)
    np.testing.assert_array_equal(plain.predict(x), raw)
    np.testing.assert_array_equal(calibrated.predict(x), platt.apply(raw))
    assert calibrated.predict(x[:1])[0] == calibrated.predict(x)[0], "one row as inference scores it"


def test_the_trainer_chooses_the_calibration_on_the_training_window_only() -> None:
    """A model trained on few rows of a strong signal is over-confident; calibration on later folds tempers it."""
    rng = np.random.default_rng(8)
    n = 4_000
    t = np.arange(n, dtype=np.int64) * 100 * MS
    x = rng.normal(size=(n, 4))
    y = (rng.random(n) < expit(1.5 * x[:, 0])).astype(np.int64)
    options = TrainingOptions(delta_ms=500, xgb_n_estimators=50, xgb_threads=1)
    choice = choose_calibration("xgb", x, y, t, options)
    assert choice.calibrator is not None
    assert set(choice.held_out_log_loss) == {"uncalibrated", "platt", "isotonic"}
    chosen = choice.calibrator.method
    assert choice.held_out_log_loss[chosen] == min(choice.held_out_log_loss[m] for m in ("platt", "isotonic"))
    assert choice.reason.startswith(f"{chosen}: held-out log loss")
    rare = np.zeros(n, dtype=np.int64)
    rare[:3] = 1
    none = choose_calibration("lr", x, rare, t, options)
    assert none.calibrator is None
    assert none.reason.startswith("not calibrated: a stretch of the training window has fewer than 5 rows of a class")
