"""A trained candidate into MLflow: a run (params, metrics, plots, spec), a registered version, the gate.

Who calls this: :mod:`quotewatch.services.trainer.main` after :func:`quotewatch.services.trainer.training.train`.

The gate scores the current ``champion`` on the **same test window** as the candidate (it is
loaded with :func:`quotewatch.domain.ml.registry.load_model_version`, exactly as inference loads it).
A champion that exists but cannot be scored is never taken for "no champion": if it cannot be
loaded the gate refuses; if its feature spec is not the candidate's, the candidate replaces it only
when it is for the spec the stream carries now (:func:`quotewatch.services.trainer.gate.gate` has the rule).
The candidate is always registered as a new version (tagged ``gate=passed|refused`` and why);
only a passing candidate moves the alias (``champion``, or ``challenger`` with ``--challenger``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from quotewatch import __version__
from quotewatch.domain.ml import calibration, evaluation
from quotewatch.domain.ml.evaluation import Scores
from quotewatch.domain.ml.models import FeatureSpecMismatchError, positive_probability, probability_problems
from quotewatch.domain.ml.registry import (
    CHAMPION,
    ModelLoadError,
    ModelUri,
    RegistryError,
    RegistryUnavailableError,
    artifact_digest,
    load_model_dir,
    load_model_version,
    make_client,
    resolve_version,
    version_tags,
)
from quotewatch.services.trainer.gate import GateDecision, UnscoredChampion, champion_of_another_spec, gate
from quotewatch.services.trainer.training import Candidate, GateThresholds, TrainingResult

RunContext = Mapping[str, Any]  # not a topic record: the MLflow run context
ModelMetadata = Mapping[str, Any]  # not a topic record: a model's MLmodel metadata (JSON values)
FlavorOptions = dict[str, Any]  # not a topic record: keyword arguments of an MLflow flavor's log_model

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
TEST_WINDOW_TAG = "quotewatch.test_window_ns"
"""Version tag ``<first t>..<last t>`` (ns) of the test window a version was trained and scored on."""


@dataclass(frozen=True)
class PublishOutcome:
    """What the trainer did in the registry."""

    run_id: str
    model_name: str
    version: str
    alias: str | None
    """The alias moved to ``version``, or None when the gate refused (or promotion was off)."""
    decision: GateDecision
    champion_version: str | None
    champion_scores: Scores | None


def assess_champion(
    tracking_uri: str, model_name: str, result: TrainingResult, signing_key: str | None = None
) -> tuple[str | None, Scores | UnscoredChampion | None]:
    """(version, what the gate gets) for the current champion, on the candidate's test window.

    What the gate gets (see :func:`quotewatch.services.trainer.gate.gate`): None when no champion is
    registered; its scores when it loads and scores the candidate's vectors; otherwise an
    :class:`UnscoredChampion` saying why and whether it may be replaced without a comparison:

    - it cannot be loaded (:class:`ModelLoadError`, which includes a download failing for a moment, and
      a version its tags do not vouch for: no digest, changed since, unsigned with ``signing_key``):
      not replaceable;
    - it uses another feature spec: :func:`champion_of_another_spec` decides from the champion's
      spec and data window (its ``quotewatch.test_window_ns`` tag);
    - it gives invalid outputs on vectors of its own spec: replaceable (inference refuses it too).

    Raises:
        RegistryUnavailableError: the tracking server could not be reached.
        RegistryError: the registry refused a lookup.
    """
    client = make_client(tracking_uri)
    version = resolve_version(client, ModelUri(model_name, alias=CHAMPION))
    if version is None:
        return None, None
    label = f"champion v{version}"
    try:
        champion = load_model_version(tracking_uri, model_name, version, signing_key=signing_key)
    except ModelLoadError as exc:
        return version, UnscoredChampion(
            version,
            f"{label} exists but cannot be loaded ({exc}), so the candidate was not compared with it and does not "
            f"replace it (train again if the error was transient; move the alias by hand if v{version} is broken)",
            replaceable=False,
        )
    if champion.feature_spec_id != result.data.feature_spec_id:
        end_ns = _test_window_end(client, model_name, version)
        return version, champion_of_another_spec(version, champion.feature_spec_id, end_ns, result)
    try:
        p = champion.predict(result.x_test)
    except (ValueError, FeatureSpecMismatchError) as exc:
        problems = [f"it cannot score them: {exc}"]
    else:
        problems = probability_problems(p, len(result.y_test))
    if problems:
        return version, UnscoredChampion(
            version,
            f"{label} gives no valid outputs on the test window ({'; '.join(problems)}), so inference cannot serve "
            "it either: not compared, the candidate replaces it on the thresholds alone",
            replaceable=True,
        )
    return version, evaluation.score(result.y_test, p)


def _test_window_end(client: MlflowClient, model_name: str, version: str) -> int | None:
    """The last t (ns) of the test window of ``model_name`` v``version`` (its tag), or None without the tag."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_model_version(model_name, version).tags or {}
    except MlflowException as exc:
        raise RegistryError(f"models:/{model_name}/{version}: {exc.message}") from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise RegistryUnavailableError(f"models:/{model_name}/{version}: tracking server unreachable: {exc}") from exc
    _, _, end = str(tags.get(TEST_WINDOW_TAG, "")).partition("..")
    try:
        return int(end)
    except ValueError:
        return None


def publish(
    result: TrainingResult,
    candidate: Candidate,
    *,
    tracking_uri: str,
    model_name: str,
    experiment_name: str,
    thresholds: GateThresholds,
    alias: str | None,
    context: Mapping[str, Any],  # not a topic record: MLflow run context
    progress: Callable[[str], None] | None = None,
    signing_key: str | None = None,
) -> PublishOutcome:
    """Log the run, register ``candidate`` as a new version of ``model_name``, gate, maybe move ``alias``.

    The version's tags vouch for its artifact (:func:`register_model_version`): its digest, signed
    with ``signing_key`` (MODEL_SIGNING_KEY) when given; the champion is loaded with the same key.

    Raises:
        RegistryUnavailableError: the tracking server could not be reached.
        RegistryError: the registry refused an operation.
    """
    import mlflow

    say = progress or (lambda message: None)
    mlflow.set_tracking_uri(tracking_uri)
    client = make_client(tracking_uri)
    say("scoring the current champion on the same test window")
    champion_version, champion = assess_champion(tracking_uri, model_name, result, signing_key)
    if champion_version is None:
        say("no champion registered")
    elif isinstance(champion, UnscoredChampion):
        say(champion.reason)
    decision = gate(candidate.scores, result.baselines, champion, thresholds, champion_version, lift=candidate.lift)
    champion_scores = champion if isinstance(champion, Scores) else None
    try:
        mlflow.set_experiment(experiment_name)
        with mlflow.start_run(run_name=f"train-{candidate.kind}") as run:
            say(f"logging run {run.info.run_id} (params, metrics, plots, feature spec)")
            _log_run(result, candidate, champion_scores, champion_version, decision, thresholds, context)
            say("logging and registering the model")
            version = register_model_version(
                candidate.model,
                candidate.kind,
                model_name=model_name,
                metadata=_model_metadata(result, candidate, context),
                sample=result.x_test[: min(100, len(result.y_test))],
                tags=_version_tags(result, candidate, decision, context),
                signing_key=signing_key,
            )
            client.set_model_version_tag(model_name, version, "quotewatch.run_id", run.info.run_id)
            client.update_model_version(model_name, version, description=_description(candidate, decision))
            mlflow.set_tag("quotewatch.registered_version", version)
            moved = None
            if decision.passed and alias is not None:
                client.set_registered_model_alias(model_name, alias, version)
                moved = alias
                logger.info(
                    "gate passed: alias moved",
                    extra={"model": model_name, "version": version, "alias": alias, "why": "; ".join(decision.reasons)},
                )
            elif decision.passed:
                logger.info("gate passed; promotion is off, no alias moved", extra={"version": version})
            else:
                logger.warning(
                    "gate refused the candidate: the current %s stays",
                    alias or CHAMPION,
                    extra={"model": model_name, "version": version, "why": "; ".join(decision.reasons)},
                )
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(f"MLflow refused an operation: {exc.message}") from exc
    except OSError as exc:
        raise RegistryUnavailableError(f"tracking server {tracking_uri} unreachable: {exc}") from exc
    return PublishOutcome(run.info.run_id, model_name, version, moved, decision, champion_version, champion_scores)


def _log_run(
    result: TrainingResult,
    candidate: Candidate,
    champion: Scores | None,
    champion_version: str | None,
    decision: GateDecision,
    thresholds: GateThresholds,
    context: Mapping[str, Any],  # not a topic record: MLflow run context
) -> None:
    import mlflow

    split = result.split.describe(result.data)
    params = {
        **candidate.params,
        **{f"split.{key}": value for key, value in split.items()},
        "feature_spec_id": result.data.feature_spec_id,
        "n_features": len(result.data.feature_names),
        "baseline_window_ms": result.baseline_fit.window_ms,
        "gate.metric": thresholds.metric,
        "gate.min_auc": thresholds.min_auc,
        "gate.min_auc_lift": thresholds.min_auc_lift,
        "gate.max_brier_ratio": thresholds.max_brier_ratio,
        **{key: value for key, value in context.items() if value is not None},
    }
    mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
    metrics = candidate.scores.finite_items("test_")
    for key, value in candidate.lift.as_dict().items():
        if value is not None:
            metrics[f"test_auc_lift_{key}"] = value
    for kind, other in result.candidates.items():
        metrics.update(other.scores.finite_items(f"{kind}_test_"))
    for name, scores in result.baselines.items():
        metrics.update(scores.finite_items(f"baseline_{name}_test_"))
    if champion is not None:
        metrics.update(champion.finite_items("champion_test_"))
    mlflow.log_metrics(metrics)
    mlflow.set_tags(
        {
            "quotewatch.gate": "passed" if decision.passed else "refused",
            "quotewatch.gate_reasons": "; ".join(decision.reasons)[:5000],
            "quotewatch.champion_version": champion_version or "",
            "quotewatch.model_kind": candidate.kind,
            "quotewatch.calibration": candidate.calibration_note[:5000],
        }
    )
    mlflow.log_dict(
        {
            "feature_spec_id": result.data.feature_spec_id,
            "current_feature_spec_id": result.data.current_feature_spec_id,
            "feature_names": list(result.data.feature_names),
            "dropped_vectors_of_other_specs": result.data.dropped_other_spec,
        },
        "feature_spec.json",
    )
    mlflow.log_dict(
        {
            "candidate": {
                "kind": candidate.kind,
                **candidate.scores.as_dict(),
                "auc_lift": candidate.lift.as_dict(),
                "bootstrap_block_rows": candidate.block_length,
                "calibration": candidate.calibrator.to_json() if candidate.calibrator is not None else None,
                "calibration_choice": candidate.calibration_note,
            },
            "candidates": {kind: c.scores.as_dict() for kind, c in result.candidates.items()},
            "baselines": {name: scores.as_dict() for name, scores in result.baselines.items()},
            "champion": {"version": champion_version, **(champion.as_dict() if champion else {})},
            "split": split,
            "gate": {"passed": decision.passed, "reasons": list(decision.reasons)},
        },
        "metrics.json",
    )
    curves: dict[str, NDArray[np.float64]] = {
        **{
            f"{kind} (candidate)" if kind == candidate.kind else kind: c.p_test for kind, c in result.candidates.items()
        },
        **{f"baseline: {name}": p for name, p in result.baseline_p_test.items()},
    }
    reliability = dict(curves)
    if candidate.calibrator is not None:
        # The reliability diagram also shows what calibration corrected.
        reliability[f"{candidate.kind} before calibration"] = positive_probability(candidate.model, result.x_test)
    with tempfile.TemporaryDirectory(prefix="qw-plots-") as scratch:
        for name, plot, shown in (("roc.png", _roc_plot, curves), ("calibration.png", _calibration_plot, reliability)):
            path = Path(scratch) / name
            plot(result.y_test, shown, path)
            # Logged as PNG images under plots/ (MLflow shows them in the run's artifacts).
            mlflow.log_artifact(str(path), artifact_path="plots")


def _roc_plot(y: NDArray[np.int64], curves: Mapping[str, NDArray[np.float64]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figure, axes = plt.subplots(figsize=(6, 5))
    for name, p in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        auc = evaluation.roc_auc(y, p)
        axes.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the test window")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _calibration_plot(
    y: NDArray[np.int64], curves: Mapping[str, NDArray[np.float64]], path: Path, bins: int = 10
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 5))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, p in curves.items():
        which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        mean_p, observed = [], []
        for b in range(bins):
            mask = which == b
            if mask.any():
                mean_p.append(float(p[mask].mean()))
                observed.append(float(y[mask].mean()))
        axes.plot(mean_p, observed, marker="o", label=name)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="mean predicted p", ylabel="observed frequency of a change", title="Calibration (test window)")
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _model_metadata(result: TrainingResult, candidate: Candidate, context: RunContext) -> ModelMetadata:
    metadata = {
        "feature_spec_id": result.data.feature_spec_id,
        "feature_names": list(result.data.feature_names),
        "model_kind": candidate.kind,
        "delta_ms": context.get("delta_ms"),
        "tick_ms": context.get("tick_ms"),
        "quotewatch_version": __version__,
    }
    if candidate.calibrator is not None:
        # JSON parameters in the MLmodel file, next to the model: applied by LoadedModel.predict.
        metadata[calibration.METADATA_KEY] = candidate.calibrator.to_json()
    return metadata


def register_model_version(
    model: Any,
    kind: str,
    *,
    model_name: str,
    metadata: ModelMetadata,
    sample: NDArray[np.float64],
    tags: Mapping[str, str],
    signing_key: str | None,
) -> str:
    """Log ``model`` in a format that cannot run code, register it with tags that vouch for it; its version.

    Who calls this: :func:`publish` inside the training run (and the tests, to register models
    exactly as the trainer does). Steps: log the model in the active MLflow run (XGBoost: its own
    UBJ format; LR: skops), download it back, load it with the loader inference uses
    (:func:`quotewatch.domain.ml.registry.load_model_dir`) and check it scores ``sample`` exactly as
    ``model`` does -- so the digest recorded is that of what was uploaded, not of something put in
    its place meanwhile -- then register it with :data:`DIGEST_TAG` (and :data:`SIGNATURE_TAG` with
    ``signing_key``) among its tags.

    Raises:
        RegistryError: the artifact read back does not load, or scores differently.
    """
    import mlflow

    model_info = _log_model(model, kind, metadata, sample)
    with tempfile.TemporaryDirectory(prefix="qw-model-check-") as scratch:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_info.model_uri, dst_path=scratch))
        digest = artifact_digest(path)
        try:
            stored = load_model_dir(path, name=model_name, version="new", digest=digest)
        except ModelLoadError as exc:
            raise RegistryError(f"the model just logged does not load back: {exc}") from exc
        # The raw scores, bit for bit (a calibration in the metadata is in the digested MLmodel file).
        expected = positive_probability(model, sample)
        if not np.array_equal(positive_probability(stored.model, sample), expected, equal_nan=True):
            raise RegistryError("the model read back from the registry does not score like the model trained")
    vouched = {**tags, **version_tags(digest, signing_key)}
    registered = mlflow.register_model(model_info.model_uri, model_name, tags=vouched)
    logger.info(
        "registered a model version",
        extra={"model": model_name, "version": registered.version, "sha256": digest, "signed": bool(signing_key)},
    )
    return str(registered.version)


def _log_model(model: Any, kind: str, metadata: ModelMetadata, sample: NDArray[np.float64]) -> Any:
    flavor, options = _model_format(model, kind, metadata, sample)
    return flavor.log_model(model, name=MODEL_ARTIFACT, **options)


def save_model_dir(model: Any, kind: str, metadata: ModelMetadata, sample: NDArray[np.float64], path: Path) -> None:
    """Write ``model`` to the local directory ``path`` exactly as :func:`register_model_version` logs it (tests)."""
    flavor, options = _model_format(model, kind, metadata, sample)
    flavor.save_model(model, path=str(path), **options)


def _model_format(
    model: Any, kind: str, metadata: ModelMetadata, sample: NDArray[np.float64]
) -> tuple[Any, FlavorOptions]:
    """(the MLflow flavor module, the options of its log_model/save_model) for a model of ``kind``."""
    import pandas as pd
    from mlflow.models import infer_signature

    names = list(metadata["feature_names"])
    options: FlavorOptions = {
        "signature": infer_signature(pd.DataFrame(sample, columns=names), positive_probability(model, sample)),
        "metadata": dict(metadata),
    }
    # Explicit requirements: inferring them imports the model in a subprocess (slow) and would
    # list the trainer's whole environment.
    if kind == "xgb":
        import mlflow.xgboost
        import xgboost

        # UBJ: XGBoost's own binary format (trees and parameters, no code).
        options["model_format"] = "ubj"
        options["pip_requirements"] = [f"xgboost-cpu=={xgboost.__version__}", f"numpy=={np.__version__}"]
        return mlflow.xgboost, options
    import mlflow.sklearn
    import sklearn

    # skops (not pickle): read with a fixed list of trusted types, loading it executes no code.
    options["serialization_format"] = "skops"
    options["pip_requirements"] = [f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}", "skops"]
    return mlflow.sklearn, options


def _version_tags(
    result: TrainingResult, candidate: Candidate, decision: GateDecision, context: RunContext
) -> dict[str, str]:
    split = result.split.describe(result.data)
    scores = candidate.scores
    return {
        "quotewatch.version": __version__,
        "quotewatch.feature_spec_id": result.data.feature_spec_id,
        "quotewatch.model_kind": candidate.kind,
        "quotewatch.train_window_ns": f"{split['train_start_ns']}..{split['train_end_ns']}",
        TEST_WINDOW_TAG: f"{split['test_start_ns']}..{split['test_end_ns']}",
        "quotewatch.test_auc": f"{scores.roc_auc:.6f}" if scores.roc_auc is not None else "",
        "quotewatch.test_brier": f"{scores.brier:.6f}" if scores.brier is not None else "",
        "quotewatch.gate": "passed" if decision.passed else "refused",
        "quotewatch.gate_reasons": "; ".join(decision.reasons)[:5000],
        "quotewatch.delta_ms": str(context.get("delta_ms", "")),
    }


def _description(candidate: Candidate, decision: GateDecision) -> str:
    verdict = "passed the gate" if decision.passed else "refused by the gate"
    return f"{candidate.kind} trained by quotewatch {__version__}; {verdict}: " + "; ".join(decision.reasons)


def write_summary(outcome: PublishOutcome, result: TrainingResult, candidate: Candidate) -> str:
    """A human-readable table of the test-window metrics and the gate's decision."""
    rows = [(f"{kind}{' *' if kind == candidate.kind else ''}", c.scores) for kind, c in result.candidates.items()]
    rows += [(f"baseline {name}", scores) for name, scores in result.baselines.items()]
    if outcome.champion_scores is not None:
        rows.append((f"champion v{outcome.champion_version}", outcome.champion_scores))
    lines = [f"{'model':<34} {'n':>7} {'AUC':>7} {'Brier':>8} {'logloss':>8} {'bal.acc':>7} {'base':>6}"]
    for name, s in rows:
        lines.append(
            f"{name:<34} {s.n:>7} {_f(s.roc_auc):>7} {_f(s.brier, 5):>8} {_f(s.log_loss):>8} "
            f"{_f(s.balanced_accuracy):>7} {_f(s.base_rate, 3):>6}"
        )
    lift = candidate.lift
    if lift.has_interval:
        lines.append(
            f"{candidate.kind} AUC lift over the best naive baseline: {lift.estimate:+.4f}, 95 % interval "
            f"[{lift.low:+.4f}, {lift.high:+.4f}] (moving blocks of {candidate.block_length} rows)"
        )
    lines.append(f"{candidate.kind} calibration: {candidate.calibration_note}")
    verdict = "PASSED" if outcome.decision.passed else "REFUSED"
    lines.append(f"registered {outcome.model_name} v{outcome.version} (run {outcome.run_id}); gate {verdict}:")
    lines.extend(f"  - {reason}" for reason in outcome.decision.reasons)
    if outcome.alias:
        lines.append(f"alias {outcome.alias} -> v{outcome.version}")
    else:
        stays = f"v{outcome.champion_version}" if outcome.champion_version else "unset"
        lines.append(f"no alias moved (champion stays {stays})")
    return "\n".join(lines)


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_json(outcome: PublishOutcome) -> str:
    """The outcome as one JSON line (``quotewatch train --json``)."""
    return json.dumps(
        {
            "run_id": outcome.run_id,
            "model_name": outcome.model_name,
            "version": outcome.version,
            "alias": outcome.alias,
            "gate_passed": outcome.decision.passed,
            "reasons": list(outcome.decision.reasons),
            "champion_version": outcome.champion_version,
        }
    )
