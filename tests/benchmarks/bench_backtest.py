"""Backtest throughput: 24 h of 100 ms ticks of one synthetic symbol, raw log -> report, in-process.

Input: 24 h of the seeded synthetic market, one symbol (BTC-USD), at 100 level updates per second
(the BTC-USD rate of the recorded 2026 Advanced Trade capture: 98.6 per second), as the raw log
the ingest would have written (frames + CLOCK records; 864,000 grid ticks). **Generating it is
not part of the backtest**: it is timed apart and reported on its own row.

Measured (goal: the 864k ticks in <= 30 s):

1. *24 h window*: :func:`quotewatch.replay.backtest.run_backtest` minus I/O: normaliser -> book and
   features -> labels (the services' functions) -> scoring with the trainer's LR and XGBoost
   (batch, row-invariant) -> metrics and the naive baselines. Seconds for the window and ticks/s.
2. *stages*: the pipeline without scoring from market events (normaliser excluded), per tick, on
   the first hour; batch scoring per tick next to scoring one vector per call as inference does
   (the peer), on the same rows.

``--quick``: 2 h instead of 24 h (the window time is then projected to 864k ticks, said in the notes).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from quotewatch.core.registry import LoadedModel
from quotewatch.domain import features as spec
from quotewatch.domain.coinbase import FEED_ADVANCED
from quotewatch.domain.models import CHALLENGER_ROLE, CHAMPION_ROLE
from quotewatch.domain.normaliser import Normaliser
from quotewatch.domain.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.replay import report
from quotewatch.replay.engine import BacktestEngine, score_model
from tests.benchmarks.harness import Context, Result

SUITE = "backtest"
RATE = 100.0
TICK_MS = 100
DELTA_MS = 500
DAY_TICKS = 864_000
HOUR_NS = 3_600 * 10**9


def raw_log(hours: float, seed: int = 11) -> list[dict[str, Any]]:
    config = SyntheticConfig(symbols=("BTC-USD",), seed=seed, rate=RATE)
    return list(synthetic_raw_frames(FEED_ADVANCED, config, int(hours * HOUR_NS), tick_ms=TICK_MS))


def trained_models() -> list[LoadedModel]:
    """The trainer's LR and XGBoost fitted on 20 min of another seed of the same market."""
    from quotewatch.trainer.training import MODEL_KINDS, TrainingOptions, build_training_set, fit_model

    engine = BacktestEngine(TICK_MS, DELTA_MS, keep_records=True).run_raw(raw_log(1 / 3, seed=5))
    data = build_training_set(pd.DataFrame(engine.feature_records), pd.DataFrame(engine.label_records))
    options = TrainingOptions(delta_ms=DELTA_MS, xgb_n_estimators=200)
    models = []
    for version, kind in enumerate(MODEL_KINDS, start=1):
        model, _ = fit_model(kind, data.x, data.y, options)
        models.append(LoadedModel(f"bench-{kind}", str(version), kind, model, spec.FEATURE_SPEC_ID, spec.FEATURE_NAMES))
    return models


def backtest(raws: list[dict[str, Any]], models: list[LoadedModel]) -> tuple[float, BacktestEngine, report.Evaluation]:
    """The backtest of ``raws`` (pipeline, scoring, evaluation) and its wall time."""
    started = time.perf_counter()
    engine = BacktestEngine(TICK_MS, DELTA_MS).run_raw(raws)
    table = engine.feature_table()
    scored = [score_model(table, m, CHAMPION_ROLE if i == 0 else CHALLENGER_ROLE) for i, m in enumerate(models)]
    evaluation = report.evaluate(
        table, engine.label_table(), scored, start_ns=None, end_ns=None, delta_ms=DELTA_MS, baseline_window_ms=10_000
    )
    return time.perf_counter() - started, engine, evaluation


def run(ctx: Context) -> list[Result]:
    hours = 2.0 if ctx.quick else 24.0
    models = trained_models()

    started = time.perf_counter()
    raws = raw_log(hours)
    generation = time.perf_counter() - started

    seconds, engine, evaluation = backtest(raws, models)
    ticks = engine.counts.ticks
    projected = seconds * DAY_TICKS / ticks
    window = "24 h" if not ctx.quick else f"{hours:g} h projected to 24 h"
    aucs = ", ".join(f"{name} AUC {s.roc_auc:.3f}" for name, s in evaluation.scores.items() if s.roc_auc is not None)
    results = [
        Result(
            SUITE,
            f"{window} window, 1 symbol: raw log -> predictions (LR + XGB) + report",
            projected,
            "s",
            goal="<= 30 s for 864k ticks",
            met=projected <= 30.0,
            notes=(
                f"{ticks:,} ticks, {engine.counts.raw_records:,} raw records, {engine.counts.events:,} events "
                f"at {RATE:g} level updates/s, measured {seconds:.1f} s; input generation excluded "
                f"(its own row); {aucs}"
            ),
        ),
        Result(SUITE, "backtest throughput (raw log -> report)", ticks / seconds, "ticks/s"),
        Result(
            SUITE,
            f"synthetic input generation ({hours:g} h, not part of the backtest)",
            generation,
            "s",
            notes=f"{len(raws):,} raw records",
        ),
    ]

    # Stages on the first hour: the pipeline from events (normaliser excluded), and scoring.
    first_hour = [r for r in raws if r["ts_init"] < raws[0]["ts_init"] + HOUR_NS]
    del raws
    normaliser_started = time.perf_counter()
    events, _ = Normaliser().process_all(first_hour)
    normaliser_seconds = time.perf_counter() - normaliser_started
    started = time.perf_counter()
    hour = BacktestEngine(TICK_MS, DELTA_MS).run_events(events)
    pipeline_seconds = time.perf_counter() - started
    hour_ticks = hour.counts.ticks
    results.append(
        Result(
            SUITE,
            "stage: normaliser (raw frames -> events)",
            normaliser_seconds / hour_ticks * 1e6,
            "µs/tick",
            notes=f"first hour: {len(first_hour):,} raw records -> {len(events):,} events",
        )
    )
    results.append(
        Result(
            SUITE, "stage: book + features + labels (events -> ticks)", pipeline_seconds / hour_ticks * 1e6, "µs/tick"
        )
    )
    matrix = hour.feature_table().values
    sample = matrix[:2_000]
    for model in models:
        started = time.perf_counter()
        batch = model.predict(matrix)
        batch_seconds = time.perf_counter() - started
        started = time.perf_counter()
        alone = np.array([model.predict(sample[i : i + 1])[0] for i in range(sample.shape[0])])
        alone_seconds = time.perf_counter() - started
        assert np.array_equal(alone, batch[: sample.shape[0]]), "batch scoring must give inference's bits"
        results.append(
            Result(
                SUITE,
                f"stage: scoring {model.flavor} (batch)",
                batch_seconds / matrix.shape[0] * 1e6,
                "µs/tick",
                peer="one vector per call (as inference)",
                peer_value=alone_seconds / sample.shape[0] * 1e6,
                notes="identical bits checked on the peer's rows",
            )
        )
    return results
