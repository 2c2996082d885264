"""What the gate learns of the current champion (``assess_champion``), with the registry stood in for.

The registry calls are replaced (alias lookup, model download, version tags); the training result,
the champion's model and the gate are real. With a real MLflow server: tests/e2e/model_lifecycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from quotewatch.domain.ml import evaluation as ev
from quotewatch.domain.ml.registry import LoadedModel, ModelLoadError, ModelUri
from quotewatch.services.trainer import publish
from quotewatch.services.trainer.gate import UnscoredChampion, gate
from quotewatch.services.trainer.training import (
    GateThresholds,
    TrainingOptions,
    TrainingResult,
    build_training_set,
    fit_model,
    train,
)
from tests.unit.services.trainer.market_data import DELTA_MS
from tests.unit.services.trainer.test_training import upgraded_frames

MS = 1_000_000


@dataclass
class Registry:
    """The champion alias, the version it points at (a model, or the error loading it), its tags."""

    champion: str | None = "7"
    model: LoadedModel | Exception | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, client: Any, uri: ModelUri) -> str | None:
        assert uri.alias == "champion"
        return self.champion

    def load(self, tracking_uri: str, name: str, version: str, signing_key: str | None = None) -> LoadedModel:
        assert version == self.champion
        if isinstance(self.model, Exception):
            raise self.model
        assert self.model is not None
        return self.model

    def get_model_version(self, name: str, version: str) -> Any:
        return SimpleNamespace(tags=self.tags)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    registry = Registry()
    monkeypatch.setattr(publish, "make_client", lambda tracking_uri: registry)
    monkeypatch.setattr(publish, "resolve_version", registry.resolve)
    monkeypatch.setattr(publish, "load_model_version", registry.load)
    return registry


@pytest.fixture(scope="module")
def result() -> TrainingResult:
    """After a feature-spec upgrade: 600 ticks of the old spec, then 400 of the new (the stream's now)."""
    return train(build_training_set(*upgraded_frames()), TrainingOptions(delta_ms=DELTA_MS), kinds=("lr",))


def champion_model(spec: str | None, width: int, c: float = 0.01) -> LoadedModel:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, width))
    model, _ = fit_model("lr", x, (x[:, 0] > 0.3).astype(np.int64), TrainingOptions(delta_ms=DELTA_MS, lr_c=c))
    names = tuple(f"x{i}" for i in range(width))
    return LoadedModel(
        name="quotewatch", version="7", flavor="sklearn", model=model, feature_spec_id=spec, feature_names=names
    )


def assess(result: TrainingResult) -> tuple[str | None, Any]:
    return publish.assess_champion("http://registry.invalid", "quotewatch", result)


def passes(result: TrainingResult, champion: Any) -> bool:
    best = result.best("auc")
    return gate(best.scores, result.baselines, champion, GateThresholds(), "7", lift=best.lift).passed


def test_the_candidate_passes_the_thresholds_on_its_own(result: TrainingResult) -> None:
    assert result.data.feature_spec_id == "spec-new"
    assert passes(result, None)


def test_a_champion_that_cannot_be_loaded_is_not_taken_for_no_champion(
    registry: Registry, result: TrainingResult
) -> None:
    registry.model = ModelLoadError("models:/quotewatch/7: cannot download the model: 503 Service Unavailable")
    version, champion = assess(result)
    assert version == "7"
    assert isinstance(champion, UnscoredChampion)
    assert not champion.replaceable
    best = result.best("auc")
    decision = gate(best.scores, result.baselines, champion, GateThresholds(), version, lift=best.lift)
    assert not decision.passed
    (reason,) = decision.reasons
    assert reason.startswith("champion v7 exists but cannot be loaded (models:/quotewatch/7: cannot download the model")
    assert "503 Service Unavailable" in reason
    assert "the candidate was not compared with it and does not replace it" in reason


def test_after_an_upgrade_the_candidate_is_compared_with_a_champion_of_the_new_spec(
    registry: Registry, result: TrainingResult
) -> None:
    registry.model = champion_model("spec-new", width=4)
    version, champion = assess(result)
    assert champion == ev.score(result.y_test, registry.model.predict(result.x_test))
    best = result.best("auc")
    decision = gate(best.scores, result.baselines, champion, GateThresholds(), version, lift=best.lift)
    assert any(reason.endswith(f"vs {champion.roc_auc:.4f}") and "champion v7" in reason for reason in decision.reasons)


def test_a_champion_of_the_spec_the_stream_left_is_replaced_on_the_thresholds(
    registry: Registry, result: TrainingResult
) -> None:
    registry.model = champion_model("spec-old", width=3)
    registry.tags = {publish.TEST_WINDOW_TAG: f"{40_000 * MS}..{59_900 * MS}"}
    _, champion = assess(result)
    assert isinstance(champion, UnscoredChampion)
    assert champion.replaceable
    assert "the stream has moved on to spec-new" in champion.reason
    assert passes(result, champion)


@pytest.mark.parametrize(
    "tags",
    [{publish.TEST_WINDOW_TAG: f"{90_000 * MS}..{120_000 * MS}"}, {}],
    ids=["champion's data newer", "no data window"],
)
def test_a_champion_of_another_spec_stays_unless_the_candidate_is_newer(
    registry: Registry, result: TrainingResult, tags: dict[str, str]
) -> None:
    registry.model = champion_model("spec-newer", width=5)
    registry.tags = tags
    _, champion = assess(result)
    assert isinstance(champion, UnscoredChampion)
    assert not champion.replaceable
    assert not passes(result, champion)


def test_a_champion_giving_invalid_outputs_cannot_serve_and_is_replaced_on_the_thresholds(
    registry: Registry, result: TrainingResult
) -> None:
    registry.model = champion_model("spec-new", width=4)
    registry.model.model.named_steps["logistic"].coef_[:] = np.nan
    _, champion = assess(result)
    assert isinstance(champion, UnscoredChampion)
    assert champion.replaceable
    assert "gives no valid outputs on the test window" in champion.reason
    assert passes(result, champion)


def test_no_champion_registered(registry: Registry, result: TrainingResult) -> None:
    registry.champion = None
    assert assess(result) == (None, None)
