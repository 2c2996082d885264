"""The promotion gate: a candidate against the champion on the same test split, with the reasons."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from quotewatch.domain.ml import evaluation
from quotewatch.domain.ml.evaluation import Scores
from quotewatch.domain.ml.statistics import Interval
from quotewatch.services.trainer.training import GateThresholds, TrainingResult, metric_value


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    """Why it failed, or what it beat when it passed."""


@dataclass(frozen=True)
class UnscoredChampion:
    """A registered champion that could not be scored on the candidate's test window, and what follows.

    Built by :func:`quotewatch.services.trainer.publish.assess_champion` (and :func:`champion_of_another_spec`).
    """

    version: str
    reason: str
    """Why it was not scored and what the gate does about it (one of the gate's reasons)."""
    replaceable: bool
    """True: it cannot serve the stream anyway, so the candidate may replace it on the thresholds
    alone. False: it might be better than the candidate, so the gate refuses."""


def champion_of_another_spec(
    version: str, champion_spec: str | None, champion_test_end_ns: int | None, result: TrainingResult
) -> UnscoredChampion:
    """The rule for a champion whose feature spec is not the candidate's (see :func:`gate`).

    Their scores cannot be compared (the champion cannot score the candidate's vectors). The
    candidate may replace it only when the candidate is for the spec the stream carries **now**:

    1. the candidate's spec is the spec of the newest vector in its rows
       (:attr:`TrainingSet.current_feature_spec_id`), and
    2. its rows are newer than the champion's: its test window ends after the champion's (the
       ``quotewatch.test_window_ns`` tag of the champion's version, in the same event time).

    Then the newest evidence says the stream moved from the champion's spec to the candidate's: the
    champion scores no live vector (inference serves the fallback instead) and the candidate is
    judged on the thresholds alone. Otherwise (an older spec asked for, a ``--to`` window that ends
    before the champion's data, a champion without the tag) the stream may well carry the
    champion's spec, a model of the candidate's spec would be refused at warm-up, and the champion
    stays. A champion that declares no spec can serve no vector: it is replaceable.
    """
    data = result.data
    candidate_spec, current = data.feature_spec_id, data.current_feature_spec_id
    label = f"champion v{version}"
    if champion_spec is None:
        return UnscoredChampion(
            version,
            f"{label} declares no feature spec, so inference scores no vector with it: "
            "not compared, the candidate replaces it on the thresholds alone",
            replaceable=True,
        )
    differ = f"{label} uses feature spec {champion_spec}, the candidate {candidate_spec}, so they cannot be compared"
    if candidate_spec != current:
        return UnscoredChampion(
            version,
            f"{differ}; the candidate's spec is not the one the stream carries now ({current}, that of the "
            "newest vectors), and only a candidate of the current spec may replace a champion of another spec",
            replaceable=False,
        )
    if champion_test_end_ns is None:
        return UnscoredChampion(
            version,
            f"{differ}; {label} has no data window (tag quotewatch.test_window_ns) to tell whether "
            f"{candidate_spec} is newer than its spec: it stays (move the alias by hand if {champion_spec} is retired)",
            replaceable=False,
        )
    candidate_end_ns = int(data.t[result.split.test].max())
    if candidate_end_ns <= champion_test_end_ns:
        return UnscoredChampion(
            version,
            f"{differ}; the candidate's data end at {_when(candidate_end_ns)}, not after {label}'s "
            f"({_when(champion_test_end_ns)}), so {candidate_spec} may not be the spec the stream carries now: "
            "the champion stays",
            replaceable=False,
        )
    return UnscoredChampion(
        version,
        f"{differ}; the stream has moved on to {candidate_spec} (the newest vectors are of that spec, and the "
        f"candidate's data run to {_when(candidate_end_ns)}, past {label}'s, which end at "
        f"{_when(champion_test_end_ns)}), so {label} scores no live vector: the candidate replaces it on the "
        "thresholds alone",
        replaceable=True,
    )


def gate(
    candidate: Scores,
    baselines: Mapping[str, Scores],
    champion: Scores | UnscoredChampion | None,
    thresholds: GateThresholds,
    champion_version: str | None = None,
    *,
    lift: Interval,
) -> GateDecision:
    """Does ``candidate`` pass the thresholds and beat the champion on the same test window?

    ``lift`` is the candidate's AUC lift over the best naive baseline with its 95 % block-bootstrap
    interval (:attr:`Candidate.lift`): the candidate must beat the baselines **at 95 %**, i.e. the
    interval's lower bound must be above ``thresholds.min_auc_lift`` (the quality report's rule,
    :mod:`quotewatch.domain.ml.statistics`). A lift without an interval (too few test rows or
    positives for a statement) fails. A point estimate above the threshold is not enough.

    ``champion`` is what :func:`quotewatch.services.trainer.publish.assess_champion` found:

    - None: no champion is registered; the thresholds alone decide ("no champion to beat").
    - :class:`~quotewatch.domain.ml.evaluation.Scores`: the champion's scores on the candidate's test
      window; the candidate must also beat them on ``thresholds.metric``.
    - :class:`UnscoredChampion`: a champion exists but could not be scored. The gate never takes
      that for "no champion": it refuses, unless the champion cannot serve the stream anyway
      (``replaceable``: a feature spec the stream no longer carries, see
      :func:`champion_of_another_spec`; invalid outputs on vectors of its own spec; no spec). A
      champion that could not be loaded is never replaceable: the error may be transient (a
      download failing), and a candidate that was not compared must not pass for one that won.

    ``champion_version`` only labels the reasons.
    """
    failures = []
    successes = []
    auc = candidate.roc_auc
    if auc is None or auc < thresholds.min_auc:
        failures.append(f"test AUC {_fmt(auc)} is below the minimum {thresholds.min_auc:.4f}")
    best_baseline = max(
        ((name, scores.roc_auc) for name, scores in baselines.items() if scores.roc_auc is not None),
        key=lambda item: item[1],
        default=None,
    )
    if best_baseline is not None:
        versus = f"the best naive baseline ({best_baseline[0]} AUC {best_baseline[1]:.4f})"
        if not lift.has_interval:
            failures.append(
                f"AUC lift {_signed(lift.estimate)} over {versus} has no 95 % interval: too few test rows or "
                "positives to tell it from chance"
            )
        elif not lift.above(thresholds.min_auc_lift):
            failures.append(
                f"AUC lift {_signed(lift.estimate)} over {versus} has a 95 % lower bound of {_signed(lift.low)}, "
                f"not above {thresholds.min_auc_lift:+.4f}"
            )
        else:
            successes.append(
                f"AUC {_fmt(auc)} vs {versus}: lift {_signed(lift.estimate)}, 95 % interval "
                f"[{_signed(lift.low)}, {_signed(lift.high)}]"
            )
    reference = baselines.get(evaluation.BASELINE_BASE_RATE)
    if reference is not None and reference.brier is not None:
        limit = reference.brier * thresholds.max_brier_ratio
        if candidate.brier is None or candidate.brier >= limit:
            failures.append(
                f"test Brier {_fmt(candidate.brier)} is not below {thresholds.max_brier_ratio:g} x the base-rate "
                f"Brier ({limit:.6f})"
            )
    if champion is None:
        successes.append("no champion to beat")
    elif isinstance(champion, UnscoredChampion):
        (successes if champion.replaceable else failures).append(champion.reason)
    else:
        mine, theirs = metric_value(candidate, thresholds.metric), metric_value(champion, thresholds.metric)
        label = f"champion v{champion_version}" if champion_version else "the champion"
        if mine <= theirs:
            failures.append(
                f"does not beat {label} on test {thresholds.metric}: {_fmt(abs(mine))} vs {_fmt(abs(theirs))}"
            )
        else:
            successes.append(f"beats {label} on test {thresholds.metric}: {_fmt(abs(mine))} vs {_fmt(abs(theirs))}")
    return GateDecision(not failures, tuple(failures or successes))


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat(timespec="milliseconds")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:+.4f}"
