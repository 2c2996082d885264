"""``quotewatch quality``: every real capture and the synthetic market, walk-forward -> docs/model-quality.md.

Discovers the captures under ``--data`` (default ``../shared/data``: the shared data next to the
repository), runs each (and the synthetic market) through the services' pipeline, evaluates LR and
XGBoost walk-forward with the trainer's functions (:mod:`quotewatch.quality.evaluate`), and writes
the report (:mod:`quotewatch.quality.markdown`). ``make quality`` runs it.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import click

from quotewatch.core.config import TrainerSettings, load_settings
from quotewatch.core.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("docs/model-quality.md")


def _say(quiet: bool, began: float) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - began:7.1f}s] {message}", err=True)

    return say


@click.command("quality")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("../shared/data"),
    show_default=True,
    help="Directory of venue folders of captures (coinbase/*.jsonl[.gz] with their sidecars and SOURCES.md).",
)
@click.option(
    "--synthetic",
    default="7:2",
    show_default=True,
    help="SEED:HOURS of the synthetic market to evaluate too (of SYMBOLS); 'none' to skip it.",
)
@click.option("--folds", type=click.IntRange(1, 20), default=4, show_default=True, help="Walk-forward folds.")
@click.option(
    "--resamples", type=click.IntRange(100, 100_000), default=1000, show_default=True, help="Bootstrap resamples."
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="The Markdown report to write.",
)
@click.option(
    "--xgb-threads",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="XGBoost threads (1: on a busy 2-core machine two OpenMP threads wait on each other, 8x slower).",
)
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def command(
    data_dir: Path, synthetic: str, folds: int, resamples: int, output: Path, xgb_threads: int, quiet: bool
) -> None:
    """Evaluate every real capture found and the synthetic market; write the model-quality report.

    Walk-forward splits (gap >= DELTA_MS), LR and XGBoost trained and calibrated per fold with the
    trainer's functions, moving-block bootstrap intervals, and per capture whether the best model
    beats the best naive baseline at 95 % (or "not enough data", with the number of positive labels).
    Uses TICK_MS, DELTA_MS, SYMBOLS (synthetic market) and the trainer's model settings.
    """
    from quotewatch.quality import datasets, markdown
    from quotewatch.quality.evaluate import QualitySettings, evaluate
    from quotewatch.services.trainer.training import TrainingOptions

    began, cpu_began = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()[0]
    say = _say(quiet, began)
    settings = load_settings(TrainerSettings)
    options = replace(
        TrainingOptions.from_settings(settings),
        tick_ms=settings.tick_ms,
        xgb_threads=xgb_threads,
        bootstrap_resamples=resamples,
    )
    quality = QualitySettings(folds=folds, resamples=resamples)
    discovery = datasets.discover(data_dir)
    sources = list(discovery.sources)
    if synthetic.lower() != "none":
        seed, _, hours = synthetic.partition(":")
        try:
            sources.append(datasets.synthetic_source(int(seed), float(hours), settings.symbols))
        except ValueError as exc:
            raise ConfigError(f"--synthetic {synthetic!r}: expected SEED:HOURS, e.g. 7:2") from exc
    if not sources:
        raise ConfigError(f"nothing to evaluate: no capture under {data_dir} and --synthetic none")
    say(
        f"{len(discovery.sources)} capture(s) under {data_dir}"
        + (f", skipped venues {discovery.skipped_venues}" if discovery.skipped_venues else "")
    )
    evaluations = []
    for source in sources:
        say(f"{source.name}: running the pipeline")
        dataset = datasets.load(source, tick_ms=settings.tick_ms, delta_ms=settings.delta_ms, symbols=settings.symbols)
        say(f"{source.name}: {dataset.rows} labelled ticks, {dataset.positives} positive")
        result = evaluate(dataset, options, quality, progress=say)
        say(f"{source.name}: {result.verdict}")
        evaluations.append(result)
    run = markdown.RunInfo(
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=time.perf_counter() - began,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{time.process_time() - cpu_began:.0f} s of CPU time in this process; load average "
        f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (the machine is shared)",
        command="make quality",
        data_dir=str(data_dir),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown.render(evaluations, discovery, options, quality, run), encoding="utf-8")
    for item in evaluations:
        click.echo(f"{item.dataset.source.name}: {item.verdict}")
    click.echo(f"report: {output} ({run.seconds:.0f} s)")
