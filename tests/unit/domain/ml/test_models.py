"""Pure model helpers: feature matrices, scoring both model kinds, warm-up checks, the online fallback."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from quotewatch.core.records import FeatureVector
from quotewatch.domain.market import features
from quotewatch.domain.ml.models import (
    FeatureSpecMismatchError,
    OnlineFallback,
    canned_batch,
    feature_matrix,
    feature_names_for,
    positive_probability,
    probability_problems,
    warm_up_problems,
)

SPEC = features.FEATURE_SPEC_ID
WIDTH = len(features.FEATURE_NAMES)


def vector(values: list[float], spec: str = SPEC) -> FeatureVector:
    return FeatureVector(
        ts_event=0,
        ts_init=0,
        exchange="coinbase",
        symbol="BTC-USD",
        tick_ms=100,
        epoch=0,
        feature_spec_id=spec,
        values=tuple(values),
        bids=(),
        asks=(),
    )


def data(n: int = 400, width: int = WIDTH, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width))
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    return x, y


def test_feature_names_come_from_the_feature_spec() -> None:
    assert feature_names_for(SPEC, WIDTH) == features.FEATURE_NAMES
    assert feature_names_for("qw-features-v0-unknown", 3) == ("x0", "x1", "x2")
    assert feature_names_for(SPEC, WIDTH - 1)[0] == "x0", "a width that is not the spec's is not the spec"


def test_feature_matrix_checks_spec_and_width() -> None:
    matrix = feature_matrix([vector([1.0, 2.0], "s"), vector([3.0, 4.0], "s")])
    assert matrix.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert matrix.dtype == np.float64
    with pytest.raises(FeatureSpecMismatchError, match="record 1 has feature spec 'other'"):
        feature_matrix([vector([1.0], "s"), vector([2.0], "other")])
    with pytest.raises(FeatureSpecMismatchError, match="record 0 has feature spec 's', expected 'want'"):
        feature_matrix([vector([1.0], "s")], feature_spec_id="want")
    with pytest.raises(FeatureSpecMismatchError, match="record 1 has 1 values, expected 2"):
        feature_matrix([vector([1.0, 2.0], "s"), vector([1.0], "s")])
    assert feature_matrix([]).shape == (0, 0)


def test_positive_probability_of_a_pipeline_and_of_xgboost_equals_predict_proba() -> None:
    x, y = data()
    lr = Pipeline([("scaler", StandardScaler()), ("logistic", LogisticRegression())]).fit(x, y)
    xgb = XGBClassifier(max_depth=4, n_estimators=20, n_jobs=1).fit(x, y)
    for model in (lr, xgb):
        p = positive_probability(model, x[:50])
        assert p.shape == (50,)
        np.testing.assert_allclose(p, model.predict_proba(x[:50])[:, 1], rtol=1e-6)
    one = positive_probability(lr, x[:1])
    assert one.shape == (1,)
    with pytest.raises(ValueError, match="2-d matrix"):
        positive_probability(lr, x[0])


def test_probability_problems() -> None:
    assert probability_problems(np.array([0.0, 0.5, 1.0]), 3) == []
    assert probability_problems(np.array([0.5, math.nan]), 2) == ["1 of 2 outputs are not finite (NaN or inf)"]
    assert "outside [0, 1]" in probability_problems(np.array([0.5, 1.5]), 2)[0]
    assert "expected 3 probabilities" in probability_problems(np.array([0.5]), 3)[0]


def test_canned_batch_keeps_recent_vectors_of_the_right_width_and_adds_fixed_rows() -> None:
    batch = canned_batch(2, [[1.0, 2.0], [9.0], [3.0, 4.0]], size=8)
    assert batch.shape == (4 + 2, 2)
    assert batch[:2].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert canned_batch(3).shape == (4, 3)


def test_warm_up_accepts_a_good_model_and_names_every_problem_of_a_bad_one() -> None:
    x, y = data()
    lr = Pipeline([("scaler", StandardScaler()), ("logistic", LogisticRegression())]).fit(x, y)
    batch = canned_batch(WIDTH, x[:10])
    names = features.FEATURE_NAMES
    ok = warm_up_problems(
        lr, model_feature_spec_id=SPEC, model_feature_names=names, stream_feature_spec_id=SPEC, batch=batch
    )
    assert ok == []
    wrong_spec = warm_up_problems(
        lr,
        model_feature_spec_id="qw-features-v0-old",
        model_feature_names=names,
        stream_feature_spec_id=SPEC,
        batch=batch,
    )
    assert wrong_spec == [
        f"feature spec mismatch: model trained on 'qw-features-v0-old', the feature stream carries {SPEC!r}"
    ]
    no_spec = warm_up_problems(
        lr, model_feature_spec_id=None, model_feature_names=names, stream_feature_spec_id=SPEC, batch=batch
    )
    assert no_spec == ["the model does not record the feature spec it was trained on"]
    narrow = warm_up_problems(
        lr, model_feature_spec_id=SPEC, model_feature_names=names[:3], stream_feature_spec_id=SPEC, batch=batch
    )
    assert narrow == [f"model expects 3 features, the stream has {WIDTH}"]
    lr.named_steps["logistic"].coef_[:] = np.nan
    nan = warm_up_problems(
        lr, model_feature_spec_id=SPEC, model_feature_names=names, stream_feature_spec_id=SPEC, batch=batch
    )
    assert nan == [f"{len(batch)} of {len(batch)} outputs are not finite (NaN or inf)"]


def test_warm_up_reports_a_model_that_raises() -> None:
    class Broken:
        def predict_proba(self, x: np.ndarray) -> np.ndarray:
            raise RuntimeError("boom")

    problems = warm_up_problems(
        Broken(),
        model_feature_spec_id=SPEC,
        model_feature_names=["a"],
        stream_feature_spec_id=SPEC,
        batch=np.zeros((4, 1)),
    )
    assert problems == ["scoring the warm-up batch failed: RuntimeError: boom"]


def test_online_fallback_starts_at_the_smoothed_base_rate_then_learns() -> None:
    fallback = OnlineFallback(learning_rate=0.1)
    assert fallback.version == "online-0"
    assert fallback.predict([0.0, 0.0]) == 0.5
    for _ in range(3):
        fallback.learn([1.0, 0.0], 1)
    assert fallback.predict([0.0, 0.0]) == pytest.approx(4 / 5), "one class only: the smoothed base rate"
    rng = np.random.default_rng(1)
    for _ in range(400):
        x = rng.normal(size=2)
        fallback.learn(list(x), int(x[0] > 0))
    assert fallback.version == "online-403"
    assert fallback.predict([2.0, 0.0]) > 0.8
    assert fallback.predict([-2.0, 0.0]) < 0.2
    assert 0.0 <= fallback.predict([math.nan, math.inf]) <= 1.0


def test_two_fallbacks_fed_the_same_labels_predict_the_same() -> None:
    first, second = OnlineFallback(), OnlineFallback()
    rng = np.random.default_rng(2)
    rows = [(list(rng.normal(size=3)), int(rng.integers(0, 2))) for _ in range(200)]
    for x, y in rows:
        first.learn(x, y)
        second.learn(x, y)
    probe = [0.3, -0.2, 1.0]
    assert first.version == second.version
    assert first.predict(probe) == second.predict(probe)
