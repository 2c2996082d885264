"""The model lifecycle with real processes: ``quotewatch train`` on the lake -> MLflow -> ``quotewatch run inference``.

One story on the session's broker and MLflow server, under a model name of its own:

1. the synthetic market (real pipeline) is filed in a Parquet lake; ``quotewatch train`` trains,
   registers v1 and, the gate passing, makes it champion;
2. ``quotewatch train`` on a lake whose labels are noise registers v2, and the gate refuses it:
   champion stays v1;
3. ``quotewatch run inference`` serves v1; a third version is promoted mid-stream and inference
   switches within the poll interval; a corrupt fourth version is refused (counted on /metrics)
   while v3 keeps serving;
4. every feature tick has exactly one served prediction (read_committed), and the live metrics of
   the last snapshot equal metrics computed offline from the predictions and labels topics;
5. SIGTERM stops inference cleanly (exit 0).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin
from quotewatch.core.topics import TopicNames
from quotewatch.domain.ml import evaluation as ev
from quotewatch.local.kafka import free_port
from tests.broker.services.inference.registry_models import corrupt_artifact, fitted_lr, register, set_alias
from tests.broker.services.inference.test_inference_stream import produce
from tests.conftest import MlflowServerInfo
from tests.helpers import read_topic, wait_for
from tests.unit.services.trainer.market_data import synthetic_ticks, write_lake

QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))
POLL_SECONDS = 1.0


def run_train(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [QUOTEWATCH, "train", "--json", "--quiet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


@contextmanager
def inference_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as output:
        process = subprocess.Popen([QUOTEWATCH, "run", "inference"], env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def reload_failures(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'quotewatch_model_reloads_total\{outcome="failure",service="inference"\} ([0-9.e+]+)', text)
    return float(match.group(1)) if match else 0.0


def served(settings: CommonSettings, expected: int) -> list[dict[str, Any]]:
    names = TopicNames(settings.topic_prefix)

    def enough() -> list[dict[str, Any]] | None:
        records = [r for r in read_topic(settings, names.predictions) if r["model_role"] != "CHALLENGER"]
        return records if len(records) >= expected else None

    return wait_for(enough, timeout=180, interval=1.0, message=f"{expected} served predictions")


def test_train_gate_serve_switch_refuse_and_measure_with_real_processes(
    make_settings: Any, mlflow_server: MlflowServerInfo, tmp_path: Path
) -> None:
    settings: CommonSettings = make_settings()
    names = TopicNames(settings.topic_prefix)
    ensure_topics(make_admin(settings), settings.topic_prefix)
    model_name = f"qw-e2e-{uuid.uuid4().hex[:8]}"
    uri = mlflow_server.tracking_uri
    lake = tmp_path / "lake"
    common = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "MLFLOW_TRACKING_URI": uri,
        "LAKE_URI": str(lake),
        "SYMBOLS": "BTC-USD,ETH-USD",
        "MODEL_NAME": model_name,
        "EXPERIMENT_NAME": model_name,
        "XGB_N_ESTIMATORS": "60",
        "METRICS_PORT": "0",
    }

    # 1. the lake -> v1, champion
    train_features, train_labels = synthetic_ticks(300, seed=3)
    write_lake(lake, settings.topic_prefix, train_features, train_labels)
    first = run_train({**common, "TOPIC_PREFIX": settings.topic_prefix})
    assert first["version"] == "1"
    assert first["gate_passed"], first["reasons"]
    assert first["alias"] == "champion"

    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    from quotewatch.domain.market import features as spec

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(first["run_id"])
    assert {"test_roc_auc", "test_brier", "test_log_loss", "test_balanced_accuracy", "test_base_rate"} <= set(
        run.data.metrics
    )
    assert {"baseline_changed_last_delta_test_roc_auc", "baseline_rolling_change_frequency_test_brier"} <= set(
        run.data.metrics
    )
    assert run.data.params["split.gap_ms"] == "500"
    artifacts = {a.path for a in client.list_artifacts(first["run_id"])} | {
        a.path for a in client.list_artifacts(first["run_id"], "plots")
    }
    assert {"feature_spec.json", "metrics.json", "plots/roc.png", "plots/calibration.png"} <= artifacts
    version = client.get_model_version(model_name, "1")
    assert version.tags["quotewatch.feature_spec_id"] == spec.FEATURE_SPEC_ID
    assert version.tags["quotewatch.version"]
    assert version.tags["quotewatch.gate"] == "passed"
    mlflow.set_tracking_uri(uri)
    info = get_model_info(f"models:/{model_name}/1")
    assert info.signature.inputs.input_names() == list(spec.FEATURE_NAMES)
    assert info.metadata is not None
    assert info.metadata["feature_spec_id"] == spec.FEATURE_SPEC_ID

    # 2. noise labels -> v2, refused; the champion stays v1
    noise_prefix = f"{settings.topic_prefix}-noise"
    shuffled = [label.label for label in train_labels]
    random.Random(11).shuffle(shuffled)
    noise_labels = [replace(label, label=y) for label, y in zip(train_labels, shuffled, strict=True)]
    write_lake(lake, noise_prefix, train_features, noise_labels)
    second = run_train({**common, "TOPIC_PREFIX": noise_prefix})
    assert second["version"] == "2"
    assert not second["gate_passed"]
    assert second["alias"] is None
    # Noise cannot beat the naive baselines at 95 %: the gate refuses on the lift's lower bound (whether it
    # also loses to v1 on the same noise is chance, so the champion comparison is not asserted here; the
    # unit tests of `gate` pin that reason).
    assert any(reason.startswith("AUC lift") for reason in second["reasons"]), second["reasons"]
    assert client.get_model_version_by_alias(model_name, "champion").version == "1"
    assert client.get_model_version(model_name, "2").tags["quotewatch.gate"] == "refused"

    # 3. inference serves v1; v3 is promoted mid-stream; a corrupt v4 is refused
    third = register(uri, model_name, fitted_lr(seed=6, c=0.05))
    corrupt = register(uri, model_name, fitted_lr(seed=5))
    corrupt_artifact(uri, mlflow_server.artifacts_dir, model_name, corrupt)
    features, labels = synthetic_ticks(40, seed=7)
    part1, part2, part3 = features[:300], features[300:600], features[600:]
    metrics_port = free_port()
    env = {
        **common,
        "TOPIC_PREFIX": settings.topic_prefix,
        "MODEL_URI": f"models:/{model_name}@champion",
        "CHALLENGER_URI": f"models:/{model_name}@challenger",
        "MODEL_POLL_SECONDS": str(POLL_SECONDS),
        "METRICS_PORT": str(metrics_port),
        "LIVE_METRICS_WINDOW": "100000",
    }
    with inference_process(env, tmp_path / "inference.log") as process:
        produce(settings, names.features, part1)
        produce(settings, names.labels, labels)
        assert {r["model_version"] for r in served(settings, len(part1))} == {"1"}
        halfway = threading.Event()
        pacer = threading.Thread(target=produce, args=(settings, names.features, part2, 25.0, halfway))
        pacer.start()
        assert halfway.wait(120)
        promoted = datetime.now()  # the service logs local time
        set_alias(uri, model_name, "champion", third)
        pacer.join(120)
        served(settings, len(part1) + len(part2))
        failures = reload_failures(metrics_port)
        set_alias(uri, model_name, "champion", corrupt)
        wait_for(lambda: reload_failures(metrics_port) > failures, timeout=120, message="corrupt v4 refused")
        produce(settings, names.features, part3)
        records = served(settings, len(features))
        log_text = (tmp_path / "inference.log").read_text()
        assert "model reload failed" in log_text
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_text[-3000:]

    # 4. exactly once, the switch, and live metrics
    by_tick: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_tick[(record["symbol"], record["ts_event"])].append(record)
    assert set(by_tick) == {(f.symbol, f.ts_event) for f in features}, "no tick missing"
    assert all(len(group) == 1 for group in by_tick.values()), "no tick twice"
    version_of = {key: group[0]["model_version"] for key, group in by_tick.items()}
    seen = re.search(rf"^(\S+ \S+) .*loading {model_name} v{third} for champion", log_text, re.MULTILINE)
    assert seen, "the promotion was seen"
    seen_after = (datetime.strptime(seen.group(1), "%Y-%m-%d %H:%M:%S,%f") - promoted).total_seconds()
    assert seen_after < POLL_SECONDS + 2.0, f"seen {seen_after:.2f}s after the promotion"
    for symbol in ("BTC-USD", "ETH-USD"):
        sequence = [version_of[(f.symbol, f.ts_event)] for f in part2 + part3 if f.symbol == symbol]
        switch = sequence.index(third)
        assert switch > 0, "v1 was serving when v3 was promoted"
        assert set(sequence[:switch]) == {"1"}
        assert set(sequence[switch:]) == {third}, "one clean switch, and v3 kept serving after v4 failed"
    snapshots = read_topic(settings, names.snapshot)
    assert {s["symbol"] for s in snapshots} == {"BTC-USD", "ETH-USD"}
    last = max(snapshots, key=lambda s: s["ts_event"])
    label_of = {(label.symbol, label.t_event): label.label for label in labels}
    pairs: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in records:
        key = (record["symbol"], record["ts_event"])
        if key in label_of and record["ts_event"] < last["ts_event"]:
            pairs[record["model_version"]].append((label_of[key], record["p_change"]))
    live = {m["model_version"]: m for m in last["live_metrics"] if m["model_role"] == "CHAMPION"}
    assert "1" in live
    assert live["1"]["n_labels"] == len(pairs["1"]), "every v1 prediction met its label"
    offline = ev.score([y for y, _ in pairs["1"]], [p for _, p in pairs["1"]])
    assert live["1"]["auc"] == pytest.approx(offline.roc_auc, abs=1e-12)
    assert live["1"]["brier"] == pytest.approx(offline.brier, abs=1e-12)
    assert live["1"]["balanced_accuracy"] == pytest.approx(offline.balanced_accuracy, abs=1e-12)
    assert live["1"]["base_rate"] == pytest.approx(offline.base_rate, abs=1e-12)
