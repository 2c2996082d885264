"""Loading a model artifact runs no code: formats, the fixed skops type list, digests and signatures.

The artifacts are written by the trainer's own code (:func:`save_model_dir`, what
:func:`register_model_version` logs), then tampered with as someone with write access to the
registry could. With a real MLflow server (download, tags): tests/faults/test_bad_model.py and
tests/broker/services/inference.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from xgboost import XGBClassifier

from quotewatch.domain.market import features as spec
from quotewatch.domain.ml.models import positive_probability
from quotewatch.domain.ml.registry import (
    DIGEST_TAG,
    PICKLE_ENV,
    SIGNATURE_TAG,
    ModelLoadError,
    artifact_digest,
    check_vouched,
    forbid_pickle,
    load_model_dir,
    model_signature,
    version_tags,
)
from quotewatch.services.trainer.publish import save_model_dir
from tests.broker.services.inference.registry_models import WritesMarker, fitted_lr

KEY = "k" * 40
METADATA = {"feature_spec_id": spec.FEATURE_SPEC_ID, "feature_names": list(spec.FEATURE_NAMES)}
WIDTH = len(spec.FEATURE_NAMES)
SAMPLE = np.linspace(-2.0, 2.0, 8 * WIDTH).reshape(8, WIDTH)


@pytest.fixture(scope="module")
def lr() -> Pipeline:
    return fitted_lr()


@pytest.fixture
def lr_dir(tmp_path: Path, lr: Pipeline) -> Path:
    path = tmp_path / "lr"
    save_model_dir(lr, "lr", METADATA, SAMPLE, path)
    return path


def xgb_model() -> XGBClassifier:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, WIDTH))
    return XGBClassifier(n_estimators=8, max_depth=3).fit(x, (x[:, 0] > 0.2).astype(np.int64))


def edit_mlmodel(model_dir: Path, flavor: str, **changes: Any) -> None:
    path = model_dir / "MLmodel"
    description = yaml.safe_load(path.read_text())
    description["flavors"][flavor].update(changes)
    path.write_text(yaml.safe_dump(description))


def test_the_trainers_lr_and_xgboost_load_and_score_like_the_trained_models(
    tmp_path: Path, lr_dir: Path, lr: Pipeline
) -> None:
    loaded = load_model_dir(lr_dir, name="m", version="1")
    assert (loaded.flavor, loaded.feature_spec_id, loaded.feature_names) == (
        "sklearn",
        spec.FEATURE_SPEC_ID,
        spec.FEATURE_NAMES,
    )
    assert np.array_equal(loaded.predict(SAMPLE), positive_probability(lr, SAMPLE))
    model = xgb_model()
    save_model_dir(model, "xgb", METADATA, SAMPLE, tmp_path / "xgb")
    assert (tmp_path / "xgb" / "model.ubj").is_file()
    booster = load_model_dir(tmp_path / "xgb", name="m", version="2")
    assert booster.flavor == "xgboost"
    assert np.array_equal(booster.predict(SAMPLE), positive_probability(model, SAMPLE))


@pytest.mark.parametrize("serialization", ["pickle", "cloudpickle"])
def test_a_pickled_model_is_refused_and_its_code_never_runs(tmp_path: Path, lr: Pipeline, serialization: str) -> None:
    import mlflow.sklearn

    marker = tmp_path / "marker"
    model_dir = tmp_path / "model"
    mlflow.sklearn.save_model(lr, str(model_dir), serialization_format=serialization, metadata=METADATA)
    (model_dir / "model.pkl").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(ModelLoadError, match=f"serialization_format '{serialization}' refused: it is a pickle"):
        load_model_dir(model_dir, name="m", version="3")
    assert not marker.exists()
    # Not even through MLflow's own loader, should anything reach it.
    forbid_pickle()
    with pytest.raises(Exception, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        mlflow.sklearn.load_model(str(model_dir))
    assert not marker.exists()


def test_a_pickle_under_a_skops_name_is_refused(tmp_path: Path, lr_dir: Path) -> None:
    marker = tmp_path / "marker"
    (lr_dir / "model.skops").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(ModelLoadError, match="not a skops file"):
        load_model_dir(lr_dir, name="m", version="4")
    assert not marker.exists()


def test_skops_trusts_our_fixed_list_not_the_one_in_the_mlmodel_file(tmp_path: Path, lr: Pipeline) -> None:
    hostile = Pipeline([("run", FunctionTransformer(os.system)), ("model", lr)])
    model_dir = tmp_path / "hostile"
    save_model_dir(lr, "lr", METADATA, SAMPLE, model_dir)
    import skops.io

    skops.io.dump(hostile, model_dir / "model.skops")
    # The artifact "trusts" what it needs, as MLflow would have passed on to skops.
    edit_mlmodel(model_dir, "sklearn", skops_trusted_types=skops.io.get_untrusted_types(file=model_dir / "model.skops"))
    with pytest.raises(ModelLoadError, match=r"types QuoteWatch does not trust: .*FunctionTransformer"):
        load_model_dir(model_dir, name="m", version="5")


def test_xgboost_only_from_its_own_formats_and_never_an_imported_class(tmp_path: Path) -> None:
    model_dir = tmp_path / "xgb"
    save_model_dir(xgb_model(), "xgb", METADATA, SAMPLE, model_dir)
    # The class named in the artifact is never imported (MLflow's loader would instantiate it).
    edit_mlmodel(model_dir, "xgboost", model_class="subprocess.Popen")
    assert load_model_dir(model_dir, name="m", version="6").flavor == "xgboost"
    edit_mlmodel(model_dir, "xgboost", model_format="deprecated")
    with pytest.raises(ModelLoadError, match="model_format 'deprecated' refused"):
        load_model_dir(model_dir, name="m", version="6")
    edit_mlmodel(model_dir, "xgboost", model_format="json")
    with pytest.raises(ModelLoadError, match=r"must be a \.json file"):
        load_model_dir(model_dir, name="m", version="6")
    edit_mlmodel(model_dir, "xgboost", model_format="ubj", data="../../etc/passwd")
    with pytest.raises(ModelLoadError, match="is not a file name in the artifact"):
        load_model_dir(model_dir, name="m", version="6")


@pytest.mark.parametrize(
    "mlmodel",
    [b"[" * 100_000, b"flavors: [1, 2", b"- just a list", b"\xff\xfe not utf-8", b"flavors: {pyfunc: {}}"],
    ids=["deep", "truncated", "not a mapping", "not text", "no supported flavor"],
)
def test_a_garbled_mlmodel_is_a_load_error(lr_dir: Path, mlmodel: bytes) -> None:
    (lr_dir / "MLmodel").write_bytes(mlmodel)
    with pytest.raises(ModelLoadError):
        load_model_dir(lr_dir, name="m", version="7")


def test_the_digest_covers_every_file_of_the_artifact(tmp_path: Path, lr_dir: Path) -> None:
    digest = artifact_digest(lr_dir)
    copy = tmp_path / "copy"
    shutil.copytree(lr_dir, copy)
    assert artifact_digest(copy) == digest, "the digest depends on the content, not on where it is"
    # MLflow writes registered_model_meta into every download: not part of the artifact.
    (copy / "registered_model_meta").write_text("model_name: m\nmodel_version: 1\n")
    assert artifact_digest(copy) == digest
    (copy / "extra.txt").write_text("x")
    assert artifact_digest(copy) != digest
    (copy / "extra.txt").unlink()
    with (copy / "MLmodel").open("a") as handle:
        handle.write("\n")
    assert artifact_digest(copy) != digest
    shutil.copyfile(lr_dir / "MLmodel", copy / "MLmodel")
    (copy / "conda.yaml").rename(copy / "conda2.yaml")
    assert artifact_digest(copy) != digest
    (copy / "conda2.yaml").rename(copy / "conda.yaml")
    assert artifact_digest(copy) == digest
    (copy / "conda.yaml").unlink()
    (copy / "conda.yaml").symlink_to(lr_dir / "conda.yaml")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        artifact_digest(copy)


def test_tags_vouch_for_a_digest_and_with_a_key_only_a_signed_one() -> None:
    digest = "ab" * 32
    uri = "models:/m/1"
    assert check_vouched(uri, version_tags(digest, None), None) == digest
    assert check_vouched(uri, version_tags(digest, KEY), KEY) == digest
    assert check_vouched(uri, version_tags(digest, KEY), None) == digest, "without a key the signature is not read"
    with pytest.raises(ModelLoadError, match="not registered by the QuoteWatch trainer"):
        check_vouched(uri, {}, None)
    with pytest.raises(ModelLoadError, match=r"no valid quotewatch\.model_sha256"):
        check_vouched(uri, {DIGEST_TAG: "not-a-digest"}, None)
    with pytest.raises(ModelLoadError, match="unsigned"):
        check_vouched(uri, version_tags(digest, None), KEY)
    with pytest.raises(ModelLoadError, match="does not verify"):
        check_vouched(uri, version_tags(digest, "another key" * 4), KEY)
    forged = {DIGEST_TAG: "cd" * 32, SIGNATURE_TAG: model_signature(KEY, digest)}
    with pytest.raises(ModelLoadError, match="does not verify"):
        check_vouched(uri, forged, KEY)


def test_pickle_deserialization_is_forbidden_whatever_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PICKLE_ENV, "true")
    forbid_pickle()
    assert os.environ[PICKLE_ENV] == "false"
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION

    assert MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get() is False
