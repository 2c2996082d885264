"""What a backtest reports: metrics of each model and of the naive baselines, a table, plots, an MLflow run.

**Rows.** Every feature tick ``t`` inside the window that has a label and that every model
scored (so models are compared on the same rows). **Metrics** are
:func:`quotewatch.domain.ml.evaluation.score` (AUC, Brier, balanced accuracy, log loss, base rate).

**Baselines** (:mod:`quotewatch.domain.ml.evaluation`: base rate, changed in the last Δ, rolling
change frequency) learn their frequencies from the labels *known before the window starts*
(``t_event + Δ <= --from``: the warm-up since the connection, or the training part of a split),
as the trainer does with its training window. With fewer than :data:`MIN_BASELINE_FIT_LABELS`
such labels, or one class only, they are fitted on the window itself ("in-sample", said in the
report): the base-rate baseline is then the window's own base rate, a slightly flattering reference.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from quotewatch.domain.ml import evaluation
from quotewatch.domain.ml.evaluation import BaselineFit, Scores
from quotewatch.services.replay.engine import FeatureTable, LabelTable, ModelScores

logger = logging.getLogger(__name__)

MIN_BASELINE_FIT_LABELS = 200
NS_PER_MS = 1_000_000


@dataclass
class Evaluation:
    """The scored rows of a window and every metric."""

    y: NDArray[np.int64]
    t: NDArray[np.int64]
    curves: dict[str, NDArray[np.float64]]
    """Name -> p per row: the models (``name vN``), then ``baseline: <name>``."""
    scores: dict[str, Scores]
    baseline_fit: BaselineFit
    baseline_fit_in_sample: bool
    baseline_fit_labels: int
    notes: list[str] = field(default_factory=list)

    def best_baseline_auc(self) -> tuple[str, float] | None:
        aucs = [
            (name, s.roc_auc)
            for name, s in self.scores.items()
            if name.startswith("baseline:") and s.roc_auc is not None
        ]
        return max(aucs, key=lambda item: item[1]) if aucs else None

    def as_dict(self) -> dict[str, Any]:  # not a topic record: report JSON
        return {
            "rows": int(self.y.size),
            "scores": {name: s.as_dict() for name, s in self.scores.items()},
            "baseline_fit": {
                "in_sample": self.baseline_fit_in_sample,
                "labels": self.baseline_fit_labels,
                "base_rate": self.baseline_fit.base_rate,
                "p_after_change": self.baseline_fit.p_after_change,
                "p_after_no_change": self.baseline_fit.p_after_no_change,
                "window_ms": self.baseline_fit.window_ms,
            },
            "notes": self.notes,
        }


def model_label(scores: ModelScores) -> str:
    return f"{scores.model.name} v{scores.model.version}"


def join_rows(
    left_symbol: NDArray[np.str_],
    left_t: NDArray[np.int64],
    right_symbol: NDArray[np.str_],
    right_t: NDArray[np.int64],
) -> NDArray[np.int64]:
    """For each left row, the index of the right row with the same (symbol, t), or -1.

    When the right side holds a key twice, the later row wins (as a dict built in order would).
    Sorted search per symbol: a 24 h window joins in milliseconds, where a Python dict of tuples
    took a second.
    """
    out = np.full(left_t.size, -1, dtype=np.int64)
    for symbol in np.unique(right_symbol):
        right_rows = np.flatnonzero(right_symbol == symbol)
        right_rows = right_rows[np.argsort(right_t[right_rows], kind="stable")]
        keys = right_t[right_rows]
        left_rows = np.flatnonzero(left_symbol == symbol)
        wanted = left_t[left_rows]
        # The last right row with key <= wanted: among equal keys the stable sort keeps the later row last.
        at = np.searchsorted(keys, wanted, side="right") - 1
        found = at >= 0
        found[found] = keys[at[found]] == wanted[found]
        out[left_rows[found]] = right_rows[at[found]]
    return out


def evaluate(
    features: FeatureTable,
    labels: LabelTable,
    models: Sequence[ModelScores],
    *,
    start_ns: int | None,
    end_ns: int | None,
    delta_ms: int,
    baseline_window_ms: int = 10_000,
) -> Evaluation:
    """Join features with labels on (symbol, t), keep the window's rows every model scored, score everything.

    Raises:
        ValueError: no labelled row in the window.
    """
    label_row = join_rows(features.symbol, features.t, labels.symbol, labels.t_event)
    keep = label_row >= 0
    if start_ns is not None:
        keep &= features.t >= start_ns
    if end_ns is not None:
        keep &= features.t < end_ns
    notes = []
    for model in models:
        unscored = int((keep & ~model.scored).sum())
        if unscored:
            notes.append(
                f"{model_label(model)} did not score {unscored} labelled rows (other feature spec or invalid p)"
            )
        keep &= model.scored
    if not keep.any():
        raise ValueError("no labelled feature tick in the window (is it shorter than the warm-up plus Δ?)")
    rows = np.flatnonzero(keep)
    y = labels.label[label_row[rows]]
    t = features.t[rows]

    known_before = (
        labels.t_event + delta_ms * NS_PER_MS <= start_ns
        if start_ns is not None
        else np.zeros(labels.t_event.size, dtype=bool)
    )
    fit_rows = np.flatnonzero(known_before)
    in_sample = fit_rows.size < MIN_BASELINE_FIT_LABELS or np.unique(labels.label[fit_rows]).size < 2
    if in_sample:
        fit_rows = label_row[rows]
        notes.append(
            f"baselines fitted in-sample on the window's {fit_rows.size} labels "
            f"(fewer than {MIN_BASELINE_FIT_LABELS} labels with both classes known before --from)"
        )
    fit = evaluation.fit_baselines(
        labels.symbol[fit_rows], labels.t_event[fit_rows], labels.label[fit_rows], delta_ms, baseline_window_ms
    )
    history = evaluation.baseline_probabilities(fit, labels.symbol, labels.t_event, labels.label)

    curves: dict[str, NDArray[np.float64]] = {model_label(s): s.p[rows] for s in models}
    for name, p in history.items():
        curves[f"baseline: {name}"] = p[label_row[rows]]
    scores = {name: evaluation.score(y, p) for name, p in curves.items()}
    return Evaluation(y, t, curves, scores, fit, bool(in_sample), int(fit_rows.size), notes)


# -- the table ------------------------------------------------------------------------------------

_COLUMNS = (
    ("roc_auc", "AUC"),
    ("brier", "Brier"),
    ("balanced_accuracy", "bal.acc"),
    ("log_loss", "log loss"),
    ("base_rate", "base rate"),
    ("n", "rows"),
)


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def format_table(result: Evaluation, markdown: bool = False) -> str:
    """The metrics, one row per model and baseline (Markdown with ``markdown``)."""
    header = ["model", *(title for _, title in _COLUMNS)]
    body = [[name, *(_fmt(getattr(s, key)) for key, _ in _COLUMNS)] for name, s in result.scores.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------


def roc_plot(result: Evaluation, path: Path, title: str = "ROC") -> Path:
    """ROC curves of every model and baseline, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figure, axes = plt.subplots(figsize=(6.4, 5.2))
    for name, p in result.curves.items():
        auc = result.scores[name].roc_auc
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(result.y, p)
        axes.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})", linestyle="--" if name.startswith("baseline") else "-")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def calibration_plot(result: Evaluation, path: Path, bins: int = 10, title: str = "Calibration") -> Path:
    """Reliability diagram (mean p vs observed frequency per equal-width bin) of every model and baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 5.2))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, p in result.curves.items():
        which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        mean_p, observed = [], []
        for b in range(bins):
            mask = which == b
            if mask.any():
                mean_p.append(float(p[mask].mean()))
                observed.append(float(result.y[mask].mean()))
        axes.plot(
            mean_p,
            observed,
            marker="o",
            markersize=3,
            label=name,
            linestyle="--" if name.startswith("baseline") else "-",
        )
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    axes.set(
        xlabel="mean predicted p_change", ylabel="observed frequency of y = 1", title=title, xlim=(0, 1), ylim=(0, 1)
    )
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -- MLflow ---------------------------------------------------------------------------------------


def log_to_mlflow(
    tracking_uri: str,
    experiment: str,
    result: Evaluation,
    params: Mapping[str, Any],  # not a topic record: run parameters
    artifacts: Sequence[Path],
    run_name: str | None = None,
) -> str:
    """Log the backtest as an MLflow evaluation run (params, metrics per model, plots, metrics.json); its run id."""
    import mlflow

    from quotewatch.domain.ml.registry import RegistryUnavailableError

    try:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name) as run:
            mlflow.set_tags({"quotewatch.run_kind": "backtest-evaluation"})
            mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
            metrics: dict[str, float] = {}
            for name, scores in result.scores.items():
                metrics.update(scores.finite_items(_metric_prefix(name)))
            mlflow.log_metrics(metrics)
            mlflow.log_dict(result.as_dict(), "metrics.json")
            with tempfile.TemporaryDirectory(prefix="qw-backtest-") as scratch:
                table = Path(scratch) / "table.md"
                table.write_text(format_table(result, markdown=True) + "\n")
                mlflow.log_artifact(str(table))
            for artifact in artifacts:
                mlflow.log_artifact(str(artifact), artifact_path="plots")
            return str(run.info.run_id)
    except OSError as exc:
        raise RegistryUnavailableError(f"tracking server {tracking_uri} unreachable: {exc}") from exc


def _metric_prefix(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.replace("baseline: ", "baseline_"))
    return f"{cleaned}_"


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:  # not a topic record: report JSON
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path
