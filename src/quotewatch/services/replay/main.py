"""``quotewatch replay`` and ``quotewatch backtest``: past windows, re-published or evaluated in-process."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from quotewatch.core.config import BacktestSettings, ReplaySettings, load_settings
from quotewatch.services.replay.sources import Window, parse_source, parse_time

logger = logging.getLogger(__name__)


def _window(start: str | None, end: str | None) -> Window:
    return Window(parse_time(start) if start else None, parse_time(end) if end else None)


@click.command("replay")
@click.option("--from", "start", default=None, help="Window start (ISO 8601, UTC unless a zone is given) on ts_init.")
@click.option("--to", "end", default=None, help="Window end (exclusive; default: the end of the log).")
@click.option(
    "--source",
    default="topic",
    show_default=True,
    help="topic[:PREFIX] (default TOPIC_PREFIX), lake[:PREFIX] (LAKE_URI), capture:FILE or synthetic:SEED:HOURS.",
)
@click.option("--speed", default="max", show_default=True, help="max, 1x (original pace) or Nx.")
@click.option("--prefix", "target", required=True, help="The fresh topic namespace NAME to replay into.")
@click.option(
    "--what",
    type=click.Choice(["raw", "events"]),
    default="raw",
    show_default=True,
    help="raw frames into NAME.md.raw (then INGEST_SOURCE=topic re-normalises them) or events into NAME.md.events.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def replay_command(
    start: str | None, end: str | None, source: str, speed: str, target: str, what: str, no_progress: bool
) -> None:
    """Re-publish a past window, in order, into the fresh namespace NAME.* (catalog topics created).

    A raw window starts at the CONNECTED record at or before --from (the normaliser must start
    clean). Then run the services with TOPIC_PREFIX=NAME (for raw: the ingest with
    INGEST_SOURCE=topic, book, labeler, inference).
    """
    from quotewatch.services.replay.publisher import parse_speed, replay

    settings = load_settings(ReplaySettings)
    spec = parse_source(source, settings.topic_prefix)
    summary = replay(
        settings,
        spec,
        _window(start, end),
        target,
        what=what,
        speed=parse_speed(speed),
        progress=not no_progress,
    )
    click.echo(summary.describe())
    services = "INGEST_SOURCE=topic quotewatch run ingest, " if what == "raw" else ""
    click.echo(f"next: TOPIC_PREFIX={target} with {services}quotewatch run book | labeler | inference")


@click.command("backtest")
@click.option("--from", "start", default=None, help="Window start (ISO 8601, UTC unless a zone is given).")
@click.option("--to", "end", default=None, help="Window end (exclusive; default: the end of the source).")
@click.option(
    "--source",
    default="lake",
    show_default=True,
    help="lake[:PREFIX] (LAKE_URI, default TOPIC_PREFIX), topic[:PREFIX], capture:FILE or synthetic:SEED:HOURS.",
)
@click.option(
    "--input",
    "input_kind",
    type=click.Choice(["raw", "events"]),
    default="raw",
    show_default=True,
    help="raw: re-normalise the raw log; events: the stored md.events (topic or lake; skips the normaliser).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    help="MODEL_URI to score with (models:/NAME/N or models:/NAME@ALIAS); repeat to compare side by side.",
)
@click.option(
    "--output",
    "output",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for roc.png, calibration.png, metrics.json, table.md (default BACKTEST_OUTPUT_DIR).",
)
@click.option(
    "--records",
    "records",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the derived records (book.top3, features, labels, predictions) as Avro files here.",
)
@click.option(
    "--lake-out",
    default=None,
    help="Also file the derived records in this lake (a path or s3://…) under --lake-prefix, e.g. to train on them.",
)
@click.option("--lake-prefix", default="backtest", show_default=True, help="Namespace of the --lake-out datasets.")
@click.option(
    "--no-mlflow", is_flag=True, help="Do not log an MLflow evaluation run even if MLFLOW_TRACKING_URI is set."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run the window as symbol-days in this many local processes (1: serially, in this process).",
)
@click.option(
    "--dask-scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run the symbol-days on the Dask cluster of this scheduler (tcp://host:8786); its workers need quotewatch.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def backtest_command(
    start: str | None,
    end: str | None,
    source: str,
    input_kind: str,
    models: tuple[str, ...],
    output: Path | None,
    records: Path | None,
    lake_out: str | None,
    lake_prefix: str,
    no_mlflow: bool,
    workers: int,
    dask_scheduler: str | None,
    no_progress: bool,
) -> None:
    """Run book -> features -> labels -> predictions over a window in-process and report the models.

    Reports AUC, Brier, balanced accuracy, log loss and base rate of each --model and of the naive
    baselines (base rate, changed in the last Δ, rolling change frequency) on the labelled ticks of
    the window; ROC and calibration plots; an MLflow evaluation run when MLFLOW_TRACKING_URI is set.
    With --workers N or --dask-scheduler, each symbol's UTC days run as separate partitions in
    parallel; the records and the report are the serial run's.
    """
    if workers > 1 and dask_scheduler:
        raise click.UsageError("--workers and --dask-scheduler exclude each other (the cluster has its own workers)")
    from quotewatch.services.replay.backtest import load_models, run_backtest
    from quotewatch.services.replay.report import format_table

    settings = load_settings(BacktestSettings)
    spec = parse_source(source, settings.topic_prefix)
    window = _window(start, end)
    loaded = load_models(settings.mlflow_tracking_uri, models, settings.signing_key)
    out_dir = output or Path(settings.backtest_output_dir)
    result = run_backtest(
        settings,
        spec,
        window,
        loaded,
        output_dir=out_dir,
        records_dir=records,
        progress=not no_progress,
        log_mlflow=not no_mlflow,
        lake_out=(lake_out, lake_prefix) if lake_out else None,
        events=input_kind == "events",
        workers=workers,
        dask_scheduler=dask_scheduler,
    )
    click.echo(result.summary())
    if lake_out:
        click.echo(f"derived records filed in {lake_out} under {lake_prefix}.*")
    for scores in result.models:
        if scores.spec_mismatches or scores.invalid_outputs:
            click.echo(
                f"{scores.model.name} v{scores.model.version}: {scores.spec_mismatches} ticks of another feature spec, "
                f"{scores.invalid_outputs} invalid outputs (inference would serve the fallback there)"
            )
    if result.evaluation is None:
        click.echo("no labelled feature tick in the window: nothing to evaluate")
        return
    click.echo(f"\n{source} {window.describe()}: {result.evaluation.y.size} labelled ticks")
    click.echo(format_table(result.evaluation))
    for note in result.evaluation.notes:
        click.echo(f"note: {note}")
    click.echo(f"\nplots and metrics: {out_dir}")
    if result.mlflow_run_id:
        click.echo(f"MLflow evaluation run: {result.mlflow_run_id} (experiment {settings.backtest_experiment})")
