"""Models and a registry stand-in for the inference unit tests (the real registry is in tests/broker)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from quotewatch.core.clock import FakeClock
from quotewatch.domain.market import features
from quotewatch.domain.ml.registry import LoadedModel, ModelUri
from quotewatch.services.inference.models import FeatureSample, ModelManager

SPEC = features.FEATURE_SPEC_ID
WIDTH = len(features.FEATURE_NAMES)
NAME = "quotewatch"


def fitted_lr(seed: int = 0, width: int = WIDTH) -> Pipeline:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, width))
    y = (x[:, seed % width] > 0).astype(int)
    return Pipeline([("scaler", StandardScaler()), ("logistic", LogisticRegression())]).fit(x, y)


def loaded(version: str, model: Any = None, spec: str | None = SPEC, width: int = WIDTH) -> LoadedModel:
    return LoadedModel(
        name=NAME,
        version=version,
        flavor="sklearn",
        model=model if model is not None else fitted_lr(int(version), width),
        feature_spec_id=spec,
        feature_names=tuple(features.FEATURE_NAMES[:width]) if width <= WIDTH else tuple(f"x{i}" for i in range(width)),
    )


@dataclass
class FakeRegistry:
    """Aliases and versions in memory; ``load`` raises what a broken artifact would."""

    aliases: dict[str, str] = field(default_factory=dict)
    versions: dict[str, LoadedModel | Exception] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)

    def resolve(self, uri: ModelUri) -> str | None:
        return self.aliases.get(uri.alias or "")

    def load(self, tracking_uri: str, name: str, version: str) -> LoadedModel:
        self.loads.append(version)
        model = self.versions[version]
        if isinstance(model, Exception):
            raise model
        return model


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def make_manager(registry: FakeRegistry) -> Callable[..., tuple[ModelManager, FakeClock, FeatureSample]]:
    def build(poll_seconds: float = 5.0) -> tuple[ModelManager, FakeClock, FeatureSample]:
        clock = FakeClock()
        sample = FeatureSample()
        manager = ModelManager(
            service="test-inference",
            tracking_uri="http://registry.invalid",
            champion_uri=ModelUri(NAME, alias="champion"),
            challenger_uri=ModelUri(NAME, alias="challenger"),
            poll_seconds=poll_seconds,
            clock=clock,
            sample=sample,
            loader=registry.load,
            resolver=registry.resolve,
        )
        return manager, clock, sample

    return build
