"""Hot reload without a registry: swaps, warm-up refusals, failure counting and retry backoff."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from quotewatch.core.metrics import MODEL_RELOADS, MODEL_VERSION
from quotewatch.domain.ml.registry import LoadedModel, ModelLoadError, RegistryUnavailableError
from quotewatch.services.inference.models import FeatureSample, ModelManager
from tests.unit.services.inference.conftest import WIDTH, FakeRegistry, fitted_lr, loaded


def failures() -> float:
    return MODEL_RELOADS.labels("test-inference", "failure")._value.get()


def test_no_alias_serves_nothing_then_the_champion_is_loaded_pinned_and_swapped(
    registry: FakeRegistry, make_manager: Callable[..., Any]
) -> None:
    manager, _, _ = make_manager()
    assert manager.check_now().champion is None
    registry.versions["1"] = loaded("1")
    registry.aliases["champion"] = "1"
    before = manager.serving
    serving = manager.check_now()
    assert serving.champion is not None
    assert serving.champion.version == "1"
    assert before.champion is None, "a swap replaces the record; the old one is never mutated"
    assert MODEL_VERSION.labels("test-inference", "champion", "quotewatch")._value.get() == 1
    manager.check_now()
    assert registry.loads == ["1"], "an unchanged alias loads nothing"
    registry.versions["2"] = loaded("2")
    registry.aliases["champion"] = "2"
    assert manager.check_now().champion.version == "2"


def test_a_bad_version_is_refused_counted_and_the_current_one_keeps_serving(
    registry: FakeRegistry, make_manager: Callable[..., Any]
) -> None:
    manager, clock, _ = make_manager(poll_seconds=5)
    registry.versions["1"] = loaded("1")
    registry.aliases["champion"] = "1"
    manager.check_now()
    nan_model = fitted_lr(2)
    nan_model.named_steps["logistic"].coef_[:] = np.nan
    bad: dict[str, LoadedModel | Exception] = {
        "2": ModelLoadError("models:/quotewatch/2: cannot load the sklearn model: BadZipFile"),
        "3": loaded("3", spec="qw-features-v0-old"),
        "4": loaded("4", model=nan_model),
        "5": loaded("5", width=WIDTH - 1),
    }
    registry.versions.update(bad)
    for version in bad:
        count = failures()
        registry.aliases["champion"] = version
        serving = manager.check_now()
        assert serving.champion is not None
        assert serving.champion.version == "1", f"v{version} must not serve"
        assert failures() == count + 1
    assert manager.reloads_failed == 4
    # Back-off: the same bad version is not reloaded at the next poll, but after the delay.
    loads = len(registry.loads)
    manager.check_now()
    assert len(registry.loads) == loads
    clock.advance(5 * 10**9)
    manager.check_now()
    assert len(registry.loads) == loads + 1
    assert failures() == count + 2
    clock.advance(5 * 10**9)
    manager.check_now()
    assert len(registry.loads) == loads + 1, "the second retry waits twice as long"
    # Fixing the alias recovers at once.
    registry.versions["6"] = loaded("6")
    registry.aliases["champion"] = "6"
    assert manager.check_now().champion.version == "6"


def test_warm_up_uses_the_spec_and_vectors_seen_on_the_stream(
    registry: FakeRegistry, make_manager: Callable[..., Any]
) -> None:
    manager, _, sample = make_manager()
    sample.observe("qw-features-v9-new", [0.0] * WIDTH)
    registry.versions["1"] = loaded("1")
    registry.aliases["champion"] = "1"
    assert manager.check_now().champion is None, "the stream moved to another spec: a v-current model is refused"


def test_challenger_comes_and_goes_with_its_alias(registry: FakeRegistry, make_manager: Callable[..., Any]) -> None:
    manager, _, _ = make_manager()
    registry.versions.update({"1": loaded("1"), "2": loaded("2")})
    registry.aliases.update({"champion": "1", "challenger": "2"})
    serving = manager.check_now()
    assert (serving.champion.version, serving.challenger.version) == ("1", "2")
    del registry.aliases["challenger"]
    assert manager.check_now().challenger is None
    del registry.aliases["champion"]
    assert manager.check_now().champion.version == "1", "a deleted champion alias keeps the last champion"


def test_an_unreachable_registry_keeps_the_current_models(
    registry: FakeRegistry, make_manager: Callable[..., Any]
) -> None:
    manager, _, _ = make_manager()
    registry.versions["1"] = loaded("1")
    registry.aliases["champion"] = "1"
    manager.check_now()

    def down(uri: Any) -> str | None:
        raise RegistryUnavailableError("connection refused")

    manager._resolver = down
    assert manager.check_now().champion.version == "1"


def test_the_background_thread_reloads_on_a_nudge(registry: FakeRegistry) -> None:
    from quotewatch.core.clock import SystemClock
    from quotewatch.domain.ml.registry import ModelUri
    from tests.helpers import wait_for

    manager = ModelManager(
        service="test-inference",
        tracking_uri="http://registry.invalid",
        champion_uri=ModelUri("quotewatch", alias="champion"),
        challenger_uri=None,
        poll_seconds=3600,
        clock=SystemClock(),
        sample=FeatureSample(),
        loader=registry.load,
        resolver=registry.resolve,
    ).start()
    try:
        wait_for(lambda: registry.loads == [] and manager._thread is not None, message="checker started")
        registry.versions["1"] = loaded("1")
        registry.aliases["champion"] = "1"
        manager.nudge()
        wait_for(lambda: manager.serving.champion is not None, timeout=10, message="nudged reload")
    finally:
        manager.stop()
    assert manager._thread is not None
    assert not manager._thread.is_alive(), "stop() ends the checker"
