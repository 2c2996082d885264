"""The gate against champions it cannot score, with ``quotewatch train`` as a real process and the real MLflow server.

- After a feature-spec upgrade the lake holds more vectors of the retired spec than of the
  current one: the trainer trains on the spec of the newest vectors, and replaces a champion of
  the retired spec (which inference cannot serve any more) on the thresholds alone.
- A champion that exists but cannot be loaded is never taken for "no champion": the gate refuses
  and the alias stays where it is.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from msgspec.structs import replace

from quotewatch.core.records import FeatureVector, Label
from quotewatch.domain.market import features as spec
from tests.broker.services.inference.registry_models import corrupt_artifact
from tests.conftest import MlflowServerInfo
from tests.e2e.model_lifecycle.test_model_lifecycle import run_train
from tests.unit.services.trainer.market_data import synthetic_ticks, write_lake

RETIRED_SPEC = "qw-features-v0-retired"


@pytest.fixture
def env(mlflow_server: MlflowServerInfo, tmp_path: Path) -> dict[str, str]:
    model_name = f"qw-gate-{uuid.uuid4().hex[:8]}"
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
        "LAKE_URI": str(tmp_path / "lake"),
        "SYMBOLS": "BTC-USD,ETH-USD",
        "MODEL_NAME": model_name,
        "EXPERIMENT_NAME": model_name,
        "METRICS_PORT": "0",
    }


def client_for(env: dict[str, str]) -> MlflowClient:
    uri = env["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(env: dict[str, str]) -> str:
    return str(client_for(env).get_model_version_by_alias(env["MODEL_NAME"], "champion").version)


def train_on(env: dict[str, str], prefix: str, features: list[FeatureVector], labels: list[Label]) -> Any:
    write_lake(env["LAKE_URI"], prefix, features, labels)
    return run_train({**env, "TOPIC_PREFIX": prefix}, "--model", "lr")


def test_after_a_feature_spec_upgrade_the_candidate_is_of_the_new_spec_and_replaces_a_retired_champion(
    env: dict[str, str],
) -> None:
    features, labels = synthetic_ticks(500, seed=3)
    start, end = features[0].ts_event, features[-1].ts_event
    upgrade = start + (end - start) * 55 // 100

    def retired(feature: FeatureVector) -> FeatureVector:
        return replace(feature, feature_spec_id=RETIRED_SPEC, values=feature.values[:-2])

    before = [retired(f) for f in features if f.ts_event < upgrade]
    after = [f for f in features if f.ts_event >= upgrade]
    assert len(before) > len(after), "the retired spec is the most frequent in the lake"

    # Before the upgrade: v1, of the retired spec, becomes champion.
    first = train_on(env, "before", before, [label for label in labels if label.t_event < upgrade])
    assert (first["version"], first["alias"]) == ("1", "champion"), first["reasons"]

    # After it: the candidate is of the spec the stream carries now; v1 cannot score its vectors
    # (nor serve the stream): the candidate replaces it on the thresholds alone.
    second = train_on(env, "after", before + after, labels)
    client = client_for(env)
    assert client.get_model_version(env["MODEL_NAME"], "2").tags["quotewatch.feature_spec_id"] == spec.FEATURE_SPEC_ID
    assert second["gate_passed"], second["reasons"]
    assert any(
        f"champion v1 uses feature spec {RETIRED_SPEC}, the candidate {spec.FEATURE_SPEC_ID}" in reason
        and f"the stream has moved on to {spec.FEATURE_SPEC_ID}" in reason
        for reason in second["reasons"]
    ), second["reasons"]
    assert champion(env) == "2"

    # Trained again on the same lake: a champion of the same spec, compared on the same test window.
    third = train_on(env, "after", before + after, labels)
    assert any("champion v2 on test auc" in reason for reason in third["reasons"]), third["reasons"]


def test_a_champion_that_cannot_be_loaded_keeps_the_alias(env: dict[str, str], mlflow_server: MlflowServerInfo) -> None:
    features, labels = synthetic_ticks(300, seed=3)
    first = train_on(env, "market", features, labels)
    assert (first["version"], first["alias"]) == ("1", "champion"), first["reasons"]
    corrupt_artifact(mlflow_server.tracking_uri, mlflow_server.artifacts_dir, env["MODEL_NAME"], "1")

    second = train_on(env, "market", features, labels)
    assert second["version"] == "2"
    assert not second["gate_passed"]
    assert second["alias"] is None
    (reason,) = second["reasons"]
    assert reason.startswith("champion v1 exists but cannot be loaded (models:/"), reason
    assert "the candidate was not compared with it and does not replace it" in reason
    assert champion(env) == "1"
    assert client_for(env).get_model_version(env["MODEL_NAME"], "2").tags["quotewatch.gate"] == "refused"
