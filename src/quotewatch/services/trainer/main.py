"""``quotewatch train``: the Parquet lake -> LR and XGBoost -> a gated new version in the MLflow registry.

Steps (each announced on stderr with its duration): read ``<prefix>.features`` and
``<prefix>.labels`` from LAKE_URI; join on (symbol, t); split by time with a gap ≥ Δ; fit the
naive baselines and the model kinds asked for; score all on the test window; log an MLflow run;
register the best candidate as a new version of MODEL_NAME; gate it against the thresholds and
the current champion on the same test window; move ``champion`` (or ``challenger``) if it passes.

Exit codes: 0 when a version was registered (whether or not the gate passed; the summary says),
1 on a QuoteWatch error (no data, registry unreachable, bad settings).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

import click

from quotewatch.core.config import TrainerSettings, load_settings
from quotewatch.core.errors import ConfigError, QuoteWatchError
from quotewatch.core.topics import TopicNames
from quotewatch.domain.ml.registry import CHALLENGER, CHAMPION

logger = logging.getLogger(__name__)


class TrainingError(QuoteWatchError):
    """Training could not produce a candidate (no data, too little data, one class only)."""


def _parse_time(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time") from exc
    if moment.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no time zone (add Z or +00:00)")
    return int(moment.timestamp() * 1e9)


class _Steps:
    """Progress on stderr: one line per step, with the time the previous step took."""

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet
        self._started = time.monotonic()
        self._last = self._started

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if not self._quiet:
            click.echo(f"[{now - self._started:7.1f}s] {message}", err=True)
        self._last = now


def load_lake_frames(settings: TrainerSettings, start_ns: int | None, end_ns: int | None) -> tuple[Any, Any]:
    """The ``features`` and ``labels`` rows of the lake under TOPIC_PREFIX, as DataFrames."""
    from quotewatch.core import lake

    names = TopicNames(settings.topic_prefix)
    features = lake.read_dataset(
        settings.lake_uri,
        names.features,
        symbols=settings.symbols,
        start_ns=start_ns,
        end_ns=end_ns,
        columns=["symbol", "ts_event", "feature_spec_id", "values"],
    )
    labels = lake.read_dataset(
        settings.lake_uri,
        names.labels,
        symbols=settings.symbols,
        start_ns=start_ns,
        end_ns=None if end_ns is None else end_ns + settings.delta_ms * 1_000_000,
        columns=["symbol", "t_event", "label", "synced_over_horizon"],
    )
    return features, labels


@click.command("train")
@click.option(
    "--model",
    "model_kind",
    type=click.Choice(["best", "lr", "xgb"]),
    default="best",
    show_default=True,
    help="Which kind to register: best trains both and registers the better on the gate metric.",
)
@click.option("--challenger", is_flag=True, help="Move the challenger alias instead of champion.")
@click.option(
    "--promote/--no-promote",
    default=True,
    show_default=True,
    help="Move the alias when the gate passes (--no-promote only registers).",
)
@click.option("--from", "start", default=None, help="Train on t >= this ISO time (default: the lake's start).")
@click.option("--to", "end", default=None, help="…and t < this ISO time (default: the lake's end).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON line on stdout.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def command(
    model_kind: str, challenger: bool, promote: bool, start: str | None, end: str | None, as_json: bool, quiet: bool
) -> None:
    """Train LR and XGBoost on the lake, register the candidate in MLflow and gate its promotion."""
    from quotewatch.services.trainer.publish import publish, to_json, write_summary
    from quotewatch.services.trainer.training import (
        MODEL_KINDS,
        GateThresholds,
        ModelKind,
        TrainingDataError,
        TrainingOptions,
        build_training_set,
        train,
    )

    settings = load_settings(TrainerSettings)
    if not settings.mlflow_tracking_uri:
        raise ConfigError("MLFLOW_TRACKING_URI is not set: the trainer registers models on an MLflow server")
    step = _Steps(quiet)
    start_ns, end_ns = _parse_time(start), _parse_time(end)
    names = TopicNames(settings.topic_prefix)
    step(f"reading {names.features} and {names.labels} from the lake at {settings.lake_uri}")
    features, labels = load_lake_frames(settings, start_ns, end_ns)
    step(f"read {len(features)} feature vectors and {len(labels)} labels")
    options = replace(TrainingOptions.from_settings(settings), test_fraction=settings.test_fraction)
    thresholds = GateThresholds(
        min_auc=settings.gate_min_auc,
        min_auc_lift=settings.gate_min_auc_lift,
        max_brier_ratio=settings.gate_max_brier_ratio,
        metric=settings.gate_metric,
    )
    kinds: tuple[ModelKind, ...] = MODEL_KINDS if model_kind == "best" else (cast(ModelKind, model_kind),)
    try:
        data = build_training_set(features, labels)
        step(
            f"joined {len(data.y)} labelled vectors of spec {data.feature_spec_id} ({len(data.feature_names)} features)"
        )
        bar = _RoundBar(quiet)
        result = train(data, options, kinds, progress=step, on_round=bar)
        bar.close()
    except TrainingDataError as exc:
        raise TrainingError(str(exc)) from exc
    split = result.split.describe(data)
    step(
        f"split: {split['train_rows']} training rows, gap {split['gap_ms']} ms, {split['test_rows']} test rows; "
        + ", ".join(f"{kind} AUC {c.scores.roc_auc}" for kind, c in result.candidates.items())
    )
    candidate = result.best(thresholds.metric)
    alias = (CHALLENGER if challenger else CHAMPION) if promote else None
    outcome = publish(
        result,
        candidate,
        tracking_uri=settings.mlflow_tracking_uri,
        model_name=settings.model_name,
        experiment_name=settings.experiment_name,
        thresholds=thresholds,
        alias=alias,
        context={
            "topic_prefix": settings.topic_prefix,
            "lake_uri": settings.lake_uri,
            "symbols": ",".join(settings.symbols),
            "delta_ms": settings.delta_ms,
            "tick_ms": settings.tick_ms,
        },
        progress=step,
        signing_key=settings.signing_key,
    )
    step("done")
    click.echo(to_json(outcome) if as_json else write_summary(outcome, result, candidate))


class _RoundBar:
    """A tqdm bar over XGBoost's boosting rounds (stderr), created on the first round."""

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet or not sys.stderr.isatty()
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._quiet:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="xgb boosting rounds", unit="round", leave=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
