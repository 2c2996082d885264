"""``quotewatch backtest``: a past window through book -> features -> labels -> predictions, in-process.

Reads the raw log of the window from the source (``lake``, ``topic:PREFIX``, a capture file or the
synthetic market; see :mod:`quotewatch.services.replay.sources`), from its CONNECTED record to
:func:`~quotewatch.services.replay.engine.input_lookahead_ns` past ``--to`` (the labels of the last ticks),
runs :class:`quotewatch.services.replay.engine.BacktestEngine` (the services' own functions; it emits the
ticks before ``--to``), scores the feature ticks with each ``--model`` (pinned registry
versions, as inference loads them), and reports the models against the naive baselines on the
window's ticks (:mod:`quotewatch.services.replay.report`): a table on stdout, ``roc.png``,
``calibration.png``, ``metrics.json`` and ``table.md`` in the output directory, and an MLflow
evaluation run when MLFLOW_TRACKING_URI is set.

With ``records_dir`` it also writes the records it derived as Avro container files
(``book.top3.avro``, ``features.avro``, ``labels.avro``, ``predictions.avro``, current schemas):
re-encoded with the topic serde they are byte for byte what the services write (the parity test).
The first model's predictions carry role CHAMPION, the others CHALLENGER, as inference's would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, overload

import msgspec

from quotewatch.core.config import BacktestSettings
from quotewatch.core.errors import ConfigError
from quotewatch.core.records import (
    BookTop,
    FeatureVector,
    Label,
    MarketEvent,
    Prediction,
    RawFrame,
    Record,
)
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.ml.models import CHALLENGER_ROLE, CHAMPION_ROLE
from quotewatch.domain.ml.registry import LoadedModel, load_model_version, make_client, parse_model_uri, resolve_version
from quotewatch.services.replay import lake_source, report, sources
from quotewatch.services.replay.engine import (
    BacktestEngine,
    ModelScores,
    PipelineRun,
    input_lookahead_ns,
    prediction_records,
    score_model,
)
from quotewatch.services.replay.sources import RawStart, SourceSpec, Window, format_time

logger = logging.getLogger(__name__)


@dataclass
class BacktestResult:
    """Everything a backtest computed."""

    engine: PipelineRun
    """The engine of a serial run, the merged partitions of a parallel one."""
    models: list[ModelScores]
    evaluation: report.Evaluation | None
    start: RawStart | None
    seconds_pipeline: float
    seconds_scoring: float
    artifacts: list[Path] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def summary(self) -> str:
        counts = self.engine.counts
        rate = counts.ticks / self.seconds_pipeline if self.seconds_pipeline > 0 else float("inf")
        lines = [
            f"pipeline: {counts.raw_records} raw records -> {counts.events} events -> {counts.ticks} ticks, "
            f"{counts.feature_vectors} feature vectors, {counts.labels} labels in {self.seconds_pipeline:.2f}s "
            f"({rate:,.0f} ticks/s); scoring {len(self.models)} model(s) in {self.seconds_scoring:.2f}s",
        ]
        if counts.rejected_raw or counts.bad_events or counts.bad_tops:
            lines.append(
                f"dead letters the services would write: {counts.rejected_raw} raw, {counts.bad_events} events, "
                f"{counts.bad_tops} book tops"
            )
        if self.start is not None:
            lines.append(f"started at the CONNECTED of {self.start.connection_id} ({format_time(self.start.ts_init)})")
        return "\n".join(lines)


def load_models(tracking_uri: str | None, uris: Sequence[str], signing_key: str | None = None) -> list[LoadedModel]:
    """Resolve each ``models:/name@alias`` or ``models:/name/N`` to a version and load it pinned.

    Loaded as inference loads them (``signing_key``: MODEL_SIGNING_KEY; digest and format checks).

    Raises:
        ConfigError: models named without MLFLOW_TRACKING_URI, or an alias that points nowhere.
    """
    if not uris:
        return []
    if not tracking_uri:
        raise ConfigError("--model needs MLFLOW_TRACKING_URI (the registry the models are loaded from)")
    client = make_client(tracking_uri)
    loaded = []
    for text in uris:
        uri = parse_model_uri(text)
        version = resolve_version(client, uri)
        if version is None:
            raise ConfigError(f"{text}: no such model version or alias in the registry at {tracking_uri}")
        loaded.append(load_model_version(tracking_uri, uri.name, version, signing_key=signing_key))
    return loaded


def raw_input(
    settings: BacktestSettings, source: SourceSpec, window: Window, serde: AvroSerde
) -> tuple[RawStart | None, int | None, Iterator[RawFrame]]:
    """(the CONNECTED it starts at, record count if known, the raw records) of a backtest source."""
    if source.kind == "topic":
        start, total, records = sources.topic_raw_records(settings, source.prefix, window, serde)
        return start, total, sources.values_of(records, RawFrame)
    if source.kind == "lake":
        start, total, records = lake_source.lake_raw_records(settings.lake_uri, source.prefix, window)
        return start, total, sources.values_of(records, RawFrame)
    if source.kind == "capture":
        assert source.path is not None
        return None, None, sources.capture_raw_records(source.path, window)
    return (
        None,
        None,
        sources.synthetic_raw_records(source.seed, source.hours, settings.symbols, settings.tick_ms, window),
    )


def event_input(
    settings: BacktestSettings, source: SourceSpec, window: Window, serde: AvroSerde
) -> tuple[RawStart | None, int | None, Iterator[MarketEvent]]:
    """The market events of a topic or lake window (the events of its CONNECTED record on), partitions merged.

    Raises:
        ConfigError: a capture or the synthetic market (raw logs: they have no stored events).
    """
    if source.kind == "topic":
        start, total, records = sources.topic_event_records(settings, source.prefix, window, serde)
    elif source.kind == "lake":
        start, total, records = lake_source.lake_event_records(settings.lake_uri, source.prefix, window)
    else:
        raise ConfigError(f"--input events needs a topic or lake source; {source.describe()} is a raw log")
    return start, total, sources.values_of(records, MarketEvent)


_T = TypeVar("_T", RawFrame, MarketEvent)


def _checked(inputs: Iterable[RawFrame | MarketEvent], cls: type[_T]) -> Iterator[_T]:
    """``inputs``, each checked to be a ``cls`` (a backtest of raw logs or of events, never both)."""
    for value in inputs:
        if not isinstance(value, cls):
            raise ConfigError(f"the backtest input holds a {type(value).__name__}, expected {cls.__name__} records")
        yield value


def run_backtest(
    settings: BacktestSettings,
    source: SourceSpec,
    window: Window,
    models: Sequence[LoadedModel],
    *,
    output_dir: Path | None = None,
    records_dir: Path | None = None,
    progress: bool = False,
    log_mlflow: bool = True,
    raws: Iterable[RawFrame] | Iterable[MarketEvent] | None = None,
    lake_out: tuple[str, str] | None = None,
    events: bool = False,
    workers: int = 1,
    dask_scheduler: str | None = None,
) -> BacktestResult:
    """Run the pipeline over the window, score, evaluate, write the report.

    The source is read :func:`input_lookahead_ns` past the window's end; the engine emits (and
    the report scores) the ticks before it.
    ``raws`` replaces the source's records (benchmarks feed pre-generated input this way);
    ``lake_out`` = (lake URI, namespace) files the derived records there (:func:`write_lake`).
    ``events``: read the stored market events of a topic or lake source instead of its raw log
    (the normaliser, most of a backtest's time, is skipped; the events are the ones it made live).
    ``workers`` > 1 or ``dask_scheduler``: the pipeline runs per symbol-day in that many local
    processes or on that Dask cluster (:mod:`quotewatch.services.replay.parallel`), with the same
    results as this serial run.
    """
    keep = records_dir is not None or lake_out is not None
    start: RawStart | None = None
    engine: PipelineRun
    if workers > 1 or dask_scheduler is not None:
        if raws is not None:
            raise ConfigError("a parallel backtest reads its source itself: no pre-read records")
        from quotewatch.services.replay.parallel import run_parallel

        began = time.perf_counter()
        parallel = run_parallel(
            settings,
            source,
            window,
            events=events,
            keep_records=keep,
            workers=workers,
            dask_scheduler=dask_scheduler,
        )
        pipeline_seconds = time.perf_counter() - began
        engine, start = parallel, parallel.start
    else:
        engine, start, pipeline_seconds = _run_serial(settings, source, window, raws, events, keep, progress)
    features = engine.feature_table()
    began = time.perf_counter()
    scored = [
        score_model(features, model, CHAMPION_ROLE if index == 0 else CHALLENGER_ROLE)
        for index, model in enumerate(models)
    ]
    scoring_seconds = time.perf_counter() - began
    evaluation: report.Evaluation | None = None
    labels = engine.label_table().synced_only()  # the synced-only rule
    try:
        evaluation = report.evaluate(
            features,
            labels,
            scored,
            start_ns=window.start_ns,
            end_ns=window.end_ns,
            delta_ms=settings.delta_ms,
            baseline_window_ms=settings.baseline_window_ms,
        )
    except ValueError as exc:
        logger.warning("nothing to evaluate: %s", exc)
    result = BacktestResult(engine, scored, evaluation, start, pipeline_seconds, scoring_seconds)
    if output_dir is not None and evaluation is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        title = f"{source.describe()} {window.describe()}"
        result.artifacts = [
            report.roc_plot(evaluation, output_dir / "roc.png", title=f"ROC: {title}"),
            report.calibration_plot(evaluation, output_dir / "calibration.png", title=f"Calibration: {title}"),
        ]
        (output_dir / "table.md").write_text(report.format_table(evaluation, markdown=True) + "\n")
        report.write_json(
            output_dir / "metrics.json",
            {
                **evaluation.as_dict(),
                "source": source.describe(),
                "window": window.describe(),
                "counts": vars(engine.counts),
            },
        )
        if log_mlflow and settings.mlflow_tracking_uri:
            params = {
                "source": source.describe(),
                "from": format_time(window.start_ns) if window.start_ns is not None else "",
                "to": format_time(window.end_ns) if window.end_ns is not None else "",
                "tick_ms": settings.tick_ms,
                "delta_ms": settings.delta_ms,
                "models": ", ".join(f"{m.name}/{m.version}" for m in models),
                "baseline_fit": "in-sample" if evaluation.baseline_fit_in_sample else "before the window",
                "rows": int(evaluation.y.size),
            }
            result.mlflow_run_id = report.log_to_mlflow(
                settings.mlflow_tracking_uri,
                settings.backtest_experiment,
                evaluation,
                params,
                result.artifacts,
                run_name=f"backtest {source.describe()}",
            )
    if records_dir is not None:
        write_records(records_dir, engine, scored)
    if lake_out is not None:
        write_lake(lake_out[0], lake_out[1], engine, scored)
    return result


def _run_serial(
    settings: BacktestSettings,
    source: SourceSpec,
    window: Window,
    raws: Iterable[RawFrame] | Iterable[MarketEvent] | None,
    events: bool,
    keep: bool,
    progress: bool,
) -> tuple[BacktestEngine, RawStart | None, float]:
    """The whole window through one :class:`BacktestEngine`: (engine, the CONNECTED it started at, seconds)."""
    from tqdm import tqdm

    serde = AvroSerde()
    start: RawStart | None = None
    total: int | None = None
    inputs: Iterable[RawFrame | MarketEvent]
    if raws is not None:
        inputs = raws
    else:
        read = event_input if events else raw_input
        start, total, inputs = read(settings, source, window.extended(input_lookahead_ns(settings.delta_ms)), serde)
    engine = BacktestEngine(settings.tick_ms, settings.delta_ms, keep_records=keep, end_ns=window.end_ns)
    began = time.perf_counter()
    if progress:
        inputs = tqdm(inputs, total=total, unit="rec", desc="backtest", mininterval=0.5)
    if events:
        engine.run_events(_checked(inputs, MarketEvent))
    else:
        engine.run_raw(_checked(inputs, RawFrame))
    return engine, start, time.perf_counter() - began


OutputRecord = BookTop | FeatureVector | Label | Prediction
"""A record of the files :func:`write_records` writes (:data:`RECORD_FILES`)."""
_OutputT = TypeVar("_OutputT", BookTop, FeatureVector, Label, Prediction)
_OUTPUT_CLASSES: dict[str, type[OutputRecord]] = {
    "book.top3": BookTop,
    "features": FeatureVector,
    "labels": Label,
    "predictions": Prediction,
}
RECORD_FILES = {suffix: f"quotewatch.{cls.__name__}" for suffix, cls in _OUTPUT_CLASSES.items()}
"""The record files of a backtest (``<topic suffix>.avro``) and their schemas."""


def write_records(directory: Path, engine: PipelineRun, scored: Sequence[ModelScores]) -> None:
    """The derived records as Avro container files ``<topic suffix>.avro`` (current schemas)."""
    import fastavro

    from quotewatch.core.schemas import default_store

    directory.mkdir(parents=True, exist_ok=True)
    store = default_store()
    predictions: list[Prediction] = []
    for scores in scored:
        predictions.extend(prediction_records(engine, scores))
    contents: dict[str, Sequence[Record]] = {
        "book.top3": engine.book_tops,
        "features": engine.feature_records,
        "labels": engine.label_records,
        "predictions": predictions,
    }
    for suffix, schema_name in RECORD_FILES.items():
        with (directory / f"{suffix}.avro").open("wb") as out:
            datums = (msgspec.to_builtins(record) for record in contents[suffix])
            fastavro.writer(out, store.current(schema_name).schema, datums)


def write_lake(lake_uri: str, prefix: str, engine: PipelineRun, scored: Sequence[ModelScores]) -> dict[str, int]:
    """File the derived records in the lake under namespace ``prefix`` (the lake sink's layout and chunk files).

    So ``quotewatch train`` (``TOPIC_PREFIX=prefix``) can train on a backtested window, e.g. a
    capture. These records never were in Kafka: each symbol is filed as its own "partition"
    (its index in sorted order) with offsets = its record numbers. Returns rows per dataset.
    """
    import pyarrow as pa

    from quotewatch.core import lake

    names = TopicNames(prefix)
    predictions: list[Prediction] = []
    for scores in scored:
        predictions.extend(prediction_records(engine, scores))
    datasets: tuple[tuple[str, Sequence[BookTop | FeatureVector | Label | Prediction]], ...] = (
        (names.book_top3, engine.book_tops),
        (names.features, engine.feature_records),
        (names.labels, engine.label_records),
        (names.predictions, predictions),
    )
    symbols = sorted({record.symbol for _, records in datasets for record in records})
    written = {}
    for topic, records in datasets:
        schema = lake.file_schema_for(topic)
        offsets = dict.fromkeys(range(len(symbols)), 0)
        runs: list[tuple[int, str, list[lake.LakeRow]]] = []
        open_run: dict[int, tuple[int, str, list[lake.LakeRow]]] = {}
        for record in records:
            partition = symbols.index(record.symbol)
            offset = offsets[partition]
            offsets[partition] = offset + 1
            row = lake.lake_row(record, topic, partition, offset, record.symbol, record.ts_init // 1_000_000)
            directory = lake.partition_dir(topic, row)
            run = open_run.get(partition)
            if run is not None and run[1] == directory:
                run[2].append(row)
            else:
                run = open_run[partition] = (partition, directory, [row])
                runs.append(run)
        for partition, directory, rows in runs:
            table = pa.Table.from_pylist(rows, schema=schema)
            lake.write_chunk(lake_uri, topic, partition, rows[0]["_offset"], rows[-1]["_offset"], [(directory, table)])
        written[topic] = len(records)
    return written


@overload
def read_records(path: Path) -> list[OutputRecord]: ...
@overload
def read_records(path: Path, cls: type[_OutputT]) -> list[_OutputT]: ...
def read_records(path: Path, cls: type[_OutputT] | None = None) -> list[OutputRecord] | list[_OutputT]:
    """The typed records of one file written by :func:`write_records` (``<topic suffix>.avro``);
    with ``cls``, checked to be the file's record class.

    Raises:
        ValueError: ``path`` is not one of :data:`RECORD_FILES`, or it holds other records than ``cls``.
    """
    import fastavro

    suffix = path.name.removesuffix(".avro")
    if suffix not in _OUTPUT_CLASSES:
        raise ValueError(f"{path.name} is not a backtest record file ({', '.join(RECORD_FILES)})")
    file_cls = _OUTPUT_CLASSES[suffix]
    if cls is not None and cls is not file_cls:
        raise ValueError(f"{path.name} holds {file_cls.__name__} records, not {cls.__name__}")
    with path.open("rb") as handle:
        return [msgspec.convert(datum, file_cls) for datum in fastavro.reader(handle)]
