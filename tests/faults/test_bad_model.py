"""A bad model promoted to ``champion``: the previous model keeps serving, every tick served once.

``quotewatch run inference`` runs as a real process with MODEL_SIGNING_KEY against the session's
MLflow server with a good champion (the trainer's LR, registered and signed by the trainer's code).
While feature vectors stream in, bad versions are registered and promoted to ``champion`` one after
another, cycling through six ways a model can be bad: its artifact is corrupt in the server's
store, it was trained on another feature spec, it emits NaN, it is a pickle whose loading would
write a marker file (registered with a correct digest and signature: only the format stops it), its
artifact was swapped for another valid model after registration (the digest stops it), it is
unsigned while inference has a key. Each must be refused (counted on /metrics as a failed reload,
its reason in the log) while the good version keeps serving, and the marker file never appears; at
the end every feature tick has exactly one served prediction, all from the good version.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin
from quotewatch.core.records import Prediction
from quotewatch.core.topics import TopicNames
from quotewatch.local.kafka import free_port
from tests.broker.services.inference.registry_models import (
    corrupt_artifact,
    fitted_lr,
    nan_model,
    register,
    register_pickle_payload,
    set_alias,
    swap_artifact,
)
from tests.broker.services.inference.test_inference_stream import produce
from tests.conftest import MlflowServerInfo
from tests.faults.conftest import FaultReport
from tests.faults.support import ServiceProcess, metric_value, read_all, trials
from tests.helpers import wait_for
from tests.records import checked
from tests.unit.services.trainer.market_data import synthetic_ticks


def refusals_beyond(inference: ServiceProcess, before: float) -> bool:
    """Has the process counted a failed model reload beyond ``before``?"""
    failures = metric_value(inference.metrics(), "quotewatch_model_reloads_total", outcome="failure")
    return inference.assert_alive() and failures > before


def refused_version(inference: ServiceProcess, before: float, name: str, version: str) -> bool:
    """Has the process counted a failed reload beyond ``before`` and logged one of ``version`` itself?

    The counter alone is not enough: a previous bad version is retried with backoff, and its retry
    can land after the alias moved and before the new version was tried.
    """
    if not refusals_beyond(inference, before):
        return False
    pinned = f"uri=models:/{name}/{version} "
    log = inference.log_path.read_text(errors="replace")
    return any("model reload failed" in line and pinned in line for line in log.splitlines())


def serving_version(inference: ServiceProcess, version: str) -> bool:
    """Does the process report ``version`` as its champion (on /metrics)?"""
    if not (inference.assert_alive() and inference.health().healthy):
        return False
    return metric_value(inference.metrics(), "quotewatch_model_version", role="champion") == float(version)


SIGNING_KEY = "fault-test-model-signing-key-0123456789abcdef"


def bad_versions(uri: str, server: MlflowServerInfo, name: str, marker: Path) -> dict[str, Callable[[], str]]:
    """How to register each kind of bad version; every one but "unsigned" is signed with the key."""

    def signed(model: Any, **options: Any) -> str:
        return register(uri, name, model, signing_key=SIGNING_KEY, **options)

    def corrupt() -> str:
        version = signed(fitted_lr(seed=6))
        corrupt_artifact(uri, server.artifacts_dir, name, version)
        return version

    def swapped() -> str:
        version = signed(fitted_lr(seed=7))
        swap_artifact(uri, server.artifacts_dir, name, version, fitted_lr(seed=8, c=0.05))
        return version

    return {
        "corrupt artifact": corrupt,
        "another feature spec": lambda: signed(fitted_lr(seed=5), feature_spec_id="qw-features-v0-retired"),
        "emits NaN": lambda: signed(nan_model()),
        "pickle payload": lambda: register_pickle_payload(
            uri, server.artifacts_dir, name, marker, signing_key=SIGNING_KEY
        ),
        "digest mismatch": swapped,
        "unsigned, key set": lambda: register(uri, name, fitted_lr(seed=9)),
    }


# What the inference log says of each refusal (the reason, not only that a reload failed).
REFUSAL_REASONS = {
    "corrupt artifact": "was changed since",
    "another feature spec": "feature spec mismatch",
    "emits NaN": "not finite",
    "pickle payload": "refused: it is a pickle",
    "digest mismatch": "was changed since",
    "unsigned, key set": "unsigned (quotewatch.model_hmac_sha256 missing) while MODEL_SIGNING_KEY is set",
}


@pytest.mark.timeout(1800)
def test_a_bad_champion_is_refused_and_the_previous_model_keeps_serving(
    make_settings: Any, mlflow_server: MlflowServerInfo, tmp_path: Path, fault_report: FaultReport
) -> None:
    count = trials(subset=6, full=12)
    settings: CommonSettings = make_settings()
    names = TopicNames(settings.topic_prefix)
    ensure_topics(make_admin(settings), settings.topic_prefix)
    uri = mlflow_server.tracking_uri
    name = f"qw-faults-{uuid.uuid4().hex[:8]}"
    good = register(uri, name, fitted_lr(seed=5), signing_key=SIGNING_KEY)
    set_alias(uri, name, "champion", good)
    marker = tmp_path / "code-ran-in-inference"
    makers = bad_versions(uri, mlflow_server, name, marker)
    kinds = list(makers)
    features, _ = synthetic_ticks(20 + 6 * count, seed=9)
    inference = ServiceProcess(
        "inference",
        ["run", "inference"],
        {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "TOPIC_PREFIX": settings.topic_prefix,
            "MLFLOW_TRACKING_URI": uri,
            "MODEL_URI": f"models:/{name}@champion",
            "CHALLENGER_URI": f"models:/{name}@challenger",
            "MODEL_POLL_SECONDS": "0.5",
            "METRICS_PORT": str(free_port()),
            "MODEL_SIGNING_KEY": SIGNING_KEY,
        },
        tmp_path,
    )
    refused: Counter[str] = Counter()
    feeder: threading.Thread | None = None
    try:
        inference.start()
        # /health answers before the first alias check: wait until the good champion serves.
        wait_for(partial(serving_version, inference, good), timeout=120, interval=0.3, message=f"v{good} serving")
        # The stream flows at a live-like pace for the whole test, across every promotion.
        feeder = threading.Thread(target=produce, args=(settings, names.features, features, 40.0), daemon=True)
        feeder.start()
        for trial in range(count):
            kind = kinds[trial % len(kinds)]
            version = makers[kind]()
            before = metric_value(inference.metrics(), "quotewatch_model_reloads_total", outcome="failure")
            set_alias(uri, name, "champion", version)
            wait_for(
                partial(refused_version, inference, before, name, version),
                timeout=120,
                interval=0.3,
                message=f"v{version} ({kind}) refused",
            )
            serving = metric_value(inference.metrics(), "quotewatch_model_version", role="champion")
            assert not marker.exists(), f"v{version} ({kind}): code from the model artifact ran in inference"
            if serving == float(good):
                refused[kind] += 1
        feeder.join(600)
        expected = {(f.symbol, f.ts_event) for f in features}

        def all_served() -> list[Prediction] | None:
            inference.assert_alive()
            predictions = [checked(r.value, Prediction) for r in read_all(settings, names.predictions)]
            served = [p for p in predictions if p.model_role != "CHALLENGER"]
            return served if {(p.symbol, p.ts_event) for p in served} >= expected else None

        served = wait_for(all_served, timeout=180, interval=1.0, message="every tick served")
        log = inference.log_path.read_text(errors="replace")
        assert inference.stop() == 0, inference.log_tail()
    finally:
        inference.close()
    keys = Counter((p.symbol, p.ts_event) for p in served)
    lost = len(expected - set(keys))
    duplicated = sum(c - 1 for c in keys.values() if c > 1)
    versions = Counter((p.model_role, p.model_version) for p in served)
    fault_report.add(
        "bad model promoted to champion",
        trials=count,
        recovered=sum(refused.values()) if set(versions) == {("CHAMPION", good)} else 0,
        lost=lost,
        duplicated=duplicated,
        notes=f"refused and v{good} kept serving: {dict(refused)}; {len(expected)} ticks, all served by v{good}",
    )
    assert sum(refused.values()) == count, refused
    assert set(versions) == {("CHAMPION", good)}, versions
    assert (lost, duplicated) == (0, 0)
    assert "model reload failed" in log
    for kind in refused:
        assert REFUSAL_REASONS[kind] in log, kind
    assert not marker.exists()
