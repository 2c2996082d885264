"""Registering test models on the real MLflow server: good ones, and the bad champions inference must refuse.

Good models are the trainer's LR (StandardScaler + LogisticRegression) fitted on the synthetic
market, logged like the trainer logs them (skops, signature, feature spec in the metadata).
Bad ones: a model of another feature spec, one whose coefficients are NaN (it emits NaN), and a
good one whose artifact is then overwritten with garbage in the server's artifact store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from sklearn.pipeline import Pipeline

from quotewatch.domain.market import features as spec
from quotewatch.domain.ml.models import positive_probability
from quotewatch.services.trainer.training import TrainingOptions, build_training_set, fit_model, records_frame
from tests.unit.services.trainer.market_data import DELTA_MS, synthetic_ticks


def fitted_lr(seed: int = 5, c: float = 1.0) -> Pipeline:
    """The trainer's LR fitted on 300 s of the synthetic market (``seed`` picks the market)."""
    features, labels = synthetic_ticks(300, seed=seed)
    data = build_training_set(records_frame(features), records_frame(labels))
    model, _ = fit_model("lr", data.x, data.y, TrainingOptions(delta_ms=DELTA_MS, lr_c=c))
    return model


def nan_model() -> Pipeline:
    model = fitted_lr()
    model.named_steps["logistic"].coef_[:] = np.nan
    return model


def register(
    tracking_uri: str,
    name: str,
    model: Any,
    *,
    feature_spec_id: str = spec.FEATURE_SPEC_ID,
    feature_names: tuple[str, ...] = spec.FEATURE_NAMES,
) -> str:
    """Log ``model`` (sklearn flavor, skops) with its feature spec and register it; return the version."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"tests-{name}")
    sample = np.zeros((4, len(feature_names)))
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(pd.DataFrame(sample, columns=list(feature_names)), np.full(4, 0.5)),
            metadata={"feature_spec_id": feature_spec_id, "feature_names": list(feature_names)},
            serialization_format="skops",
            pip_requirements=["scikit-learn"],
        )
    version = mlflow.register_model(info.model_uri, name).version
    return str(version)


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(name, alias, version)


def corrupt_artifact(tracking_uri: str, artifacts_dir: Path, name: str, version: str) -> Path:
    """Overwrite the serialized model of ``name`` v``version`` in the server's artifact store."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version(name, version).source  # models:/<logged model id>
    assert source is not None
    model_id = source.rsplit("/", 1)[-1]
    location = client.get_logged_model(model_id).artifact_location
    prefix = "mlflow-artifacts:/"
    assert location.startswith(prefix), location
    path = artifacts_dir / location[len(prefix) :] / "model.skops"
    assert path.exists(), path
    path.write_bytes(b"not a zip archive")
    return path


def expected_p(model: Any, values: Sequence[float]) -> float:
    return float(positive_probability(model, np.asarray([values], dtype=np.float64))[0])
