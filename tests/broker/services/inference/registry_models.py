"""Registering test models on the real MLflow server: good ones, and the bad champions inference must refuse.

Good models are the trainer's LR (StandardScaler + LogisticRegression) fitted on the synthetic
market, registered by the trainer's own code (:func:`register_model_version`: skops, signature,
feature spec in the metadata, the artifact's digest and optional HMAC in the version's tags).
Bad ones: a model of another feature spec, one whose coefficients are NaN (it emits NaN), a
good one whose artifact is then overwritten with garbage (or with another valid model) in the
server's artifact store, and a pickle whose loading would run code, registered with correct tags.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from sklearn.pipeline import Pipeline

from quotewatch.domain.market import features as spec
from quotewatch.domain.ml.models import positive_probability
from quotewatch.domain.ml.registry import artifact_digest, version_tags
from quotewatch.services.trainer.publish import register_model_version, save_model_dir
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
    signing_key: str | None = None,
) -> str:
    """Register ``model`` as the trainer does (its own code path: format, digest, signature); return the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"tests-{name}")
    kind = "xgb" if hasattr(model, "get_booster") else "lr"
    metadata = {"feature_spec_id": feature_spec_id, "feature_names": list(feature_names), "model_kind": kind}
    sample = np.linspace(-1.0, 1.0, 4 * len(feature_names)).reshape(4, len(feature_names))
    with mlflow.start_run():
        return register_model_version(
            model, kind, model_name=name, metadata=metadata, sample=sample, tags={}, signing_key=signing_key
        )


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(name, alias, version)


def stored_artifact_dir(tracking_uri: str, artifacts_dir: Path, name: str, version: str) -> Path:
    """Where the server keeps the artifact of ``name`` v``version`` (what someone with write access to it edits)."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version(name, version).source  # models:/<logged model id>
    assert source is not None
    return _logged_model_dir(client, artifacts_dir, source.rsplit("/", 1)[-1])


def _logged_model_dir(client: MlflowClient, artifacts_dir: Path, model_id: str) -> Path:
    location = client.get_logged_model(model_id).artifact_location
    prefix = "mlflow-artifacts:/"
    assert location.startswith(prefix), location
    path = artifacts_dir / location[len(prefix) :]
    assert (path / "MLmodel").exists(), path
    return path


def corrupt_artifact(tracking_uri: str, artifacts_dir: Path, name: str, version: str) -> Path:
    """Overwrite the serialized model of ``name`` v``version`` in the server's artifact store."""
    path = stored_artifact_dir(tracking_uri, artifacts_dir, name, version) / "model.skops"
    assert path.exists(), path
    path.write_bytes(b"not a zip archive")
    return path


def swap_artifact(tracking_uri: str, artifacts_dir: Path, name: str, version: str, model: Pipeline) -> Path:
    """Replace the model file of ``name`` v``version`` in the store with ``model``, a valid skops file.

    The version's tags still vouch for the original: only the digest check tells them apart (the
    replacement loads and scores like any good model).
    """
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "model"
        metadata = {"feature_spec_id": spec.FEATURE_SPEC_ID, "feature_names": list(spec.FEATURE_NAMES)}
        save_model_dir(model, "lr", metadata, np.zeros((4, len(spec.FEATURE_NAMES))), local)
        path = stored_artifact_dir(tracking_uri, artifacts_dir, name, version) / "model.skops"
        assert path.read_bytes() != (local / "model.skops").read_bytes()
        shutil.copyfile(local / "model.skops", path)
    return path


class WritesMarker:
    """Unpickling this writes ``marker`` (what a hostile pickle would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.write_text, (self.marker, "code from a model artifact ran here"))


def register_pickle_payload(
    tracking_uri: str, artifacts_dir: Path, name: str, marker: Path, signing_key: str | None = None
) -> str:
    """Register, as someone who can write to the registry would, a sklearn-flavor model whose pickle
    writes ``marker`` when loaded; its tags carry the artifact's correct digest (and signature with
    ``signing_key``), so only the refusal of pickle stops it.
    """
    import mlflow
    import mlflow.sklearn

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"tests-{name}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            fitted_lr(),
            name="model",
            serialization_format="pickle",
            metadata={"feature_spec_id": spec.FEATURE_SPEC_ID, "feature_names": list(spec.FEATURE_NAMES)},
            pip_requirements=["scikit-learn"],
        )
    stored = _logged_model_dir(client, artifacts_dir, info.model_id)
    (stored / "model.pkl").write_bytes(pickle.dumps(WritesMarker(marker)))
    with tempfile.TemporaryDirectory() as scratch:
        digest = artifact_digest(
            Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=scratch))
        )
    return str(mlflow.register_model(info.model_uri, name, tags=version_tags(digest, signing_key)).version)


def expected_p(model: Any, values: Sequence[float]) -> float:
    return float(positive_probability(model, np.asarray([values], dtype=np.float64))[0])
