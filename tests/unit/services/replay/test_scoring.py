"""Backtest scoring = inference scoring: a row's p does not depend on the batch it is scored in."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from quotewatch.core.records import FeatureVector, Prediction
from quotewatch.domain.ml.models import is_valid_probability, positive_probability, prediction_record


def data() -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    rng = np.random.default_rng(11)
    # Columns on very different scales, as the feature spec has (prices ~1e4, counts, ratios).
    x = rng.normal(size=(3000, 25)) * rng.uniform(0.01, 70_000, size=25)
    y = (x[:, 3] / x[:, 3].std() + rng.normal(size=3000) > 0.3).astype(np.int64)
    return x, y


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    x, y = data()
    return {
        "lr": Pipeline([("scaler", StandardScaler()), ("logistic", LogisticRegression(max_iter=1000))]).fit(x, y),
        "xgb": XGBClassifier(max_depth=4, n_estimators=30, tree_method="hist", n_jobs=2).fit(x, y),
    }


@pytest.mark.parametrize("kind", ["lr", "xgb"])
def test_each_row_scores_alone_as_in_any_batch_bit_for_bit(models: dict[str, Any], kind: str) -> None:
    x, _ = data()
    model = models[kind]
    batch = positive_probability(model, x)
    alone = np.array([positive_probability(model, x[i : i + 1])[0] for i in range(600)])
    assert np.array_equal(alone, batch[:600])
    for start, size in ((1, 7), (5, 13), (101, 999), (2999, 1)):
        assert np.array_equal(positive_probability(model, x[start : start + size]), batch[start : start + size])


def test_the_lr_pipeline_path_agrees_with_sklearn(models: dict[str, Any]) -> None:
    x, _ = data()
    model = models["lr"]
    np.testing.assert_allclose(positive_probability(model, x), model.predict_proba(x)[:, 1], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="expects 25"):
        positive_probability(model, x[:, :24])


def test_prediction_record_is_a_pure_function_of_the_vector_and_the_model() -> None:
    vector = FeatureVector(
        ts_event=1_000_000_000,
        ts_init=1_000_000_777,
        exchange="coinbase",
        symbol="BTC-USD",
        tick_ms=100,
        epoch=7,
        feature_spec_id="spec",
        values=(1.0,),
        bids=(),
        asks=(),
    )
    record = prediction_record(vector, 0.25, "quotewatch", "3", "CHAMPION")
    assert record == Prediction(
        ts_event=1_000_000_000,
        ts_init=1_000_000_777,
        exchange="coinbase",
        symbol="BTC-USD",
        p_change=0.25,
        model_name="quotewatch",
        model_version="3",
        model_role="CHAMPION",
        feature_spec_id="spec",
    )
    assert [is_valid_probability(p) for p in (0.0, 1.0, 0.5, -0.1, 1.1, float("nan"), float("inf"))] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
