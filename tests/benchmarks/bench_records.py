"""Typed records: msgspec ``Struct`` (frozen) against ``@dataclass(frozen=True, slots=True)``, side by side.

Both kinds are generated from the same schemas by :mod:`quotewatch.core.codegen` and each is put in
place of ``quotewatch.core.records`` in its own interpreter (a subprocess, before anything imports
the package), so the same code measures both. Runs alternate (msgspec, dataclass, msgspec, ...)
and each row reports the median over its runs: the machine is shared and noisy.

Measured per kind, on the real per-tick path of the backtest:

- *normaliser*: the synthetic market's raw log (Advanced Trade, 2 symbols) -> MarketEvent records;
- *pipeline*: :class:`BookPipeline` over those events -> BookTop + FeatureVector per tick, the
  :class:`Labeler` on every BookTop, and a Prediction (``prediction_record``) per FeatureVector;
  µs per tick, everything included;
- *serde*: ``AvroSerde`` encode and decode of a MarketEvent (an update) and of a FeatureVector.

``python -m tests.benchmarks.bench_records [--quick]`` prints the table on its own.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from quotewatch.core import codegen
from tests.benchmarks.harness import Context, Result

SUITE = "records"
KINDS: tuple[codegen.ClassKind, ...] = ("msgspec", "dataclass")

_WORKER = r"""
import importlib.util, json, sys, time, timeit
spec = importlib.util.spec_from_file_location("quotewatch.core.records", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["quotewatch.core.records"] = module
spec.loader.exec_module(module)
seconds = float(sys.argv[2])

from quotewatch.core.serde import AvroSerde
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler
from quotewatch.domain.ml.models import prediction_record
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import Normaliser

config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=7, rate=300.0)
raws = list(synthetic_raw_frames(FEED_ADVANCED, config, int(seconds * 1e9)))
started = time.perf_counter()
events = Normaliser().process_all(raws)[0]
normaliser = time.perf_counter() - started

started = time.perf_counter()
pipeline, labeler = BookPipeline(100), Labeler(500, 100)
ticks = labels = 0
for position, event in enumerate(events):
    for tick in pipeline.process(event, position):
        ticks += 1
        if labeler.process(tick.book_top) is not None:
            labels += 1
        if tick.features is not None:
            prediction_record(tick.features, 0.5, "bench", "1", "CHAMPION")
pipeline_seconds = time.perf_counter() - started

serde = AvroSerde()
update = next(e for e in events if e.kind == "UPDATE")
vector = None
pipeline = BookPipeline(100)
for event in events:
    vector = next((t.features for t in pipeline.process(event) if t.features is not None), vector)
    if vector is not None:
        break
out = {"normaliser_us_per_event": normaliser / len(events) * 1e6, "ticks": ticks, "labels": labels,
       "pipeline_us_per_tick": pipeline_seconds / ticks * 1e6, "events": len(events)}
for name, topic, record in (("MarketEvent", "qw.md.events", update), ("FeatureVector", "qw.features", vector)):
    data = serde.encode(topic, record)
    n = 3000
    out[f"{name}_encode_us"] = min(timeit.repeat(lambda: serde.encode(topic, record), number=n, repeat=3)) / n * 1e6
    out[f"{name}_decode_us"] = min(timeit.repeat(lambda: serde.decode(data, topic), number=n, repeat=3)) / n * 1e6
print(json.dumps(out))
"""

_ROWS = (
    ("normaliser_us_per_event", "normaliser: raw log -> MarketEvent", "µs/event"),
    ("pipeline_us_per_tick", "pipeline: MarketEvent -> BookTop + FeatureVector, Label, Prediction", "µs/tick"),
    ("MarketEvent_encode_us", "serde encode MarketEvent (UPDATE)", "µs"),
    ("MarketEvent_decode_us", "serde decode MarketEvent (UPDATE)", "µs"),
    ("FeatureVector_encode_us", "serde encode FeatureVector", "µs"),
    ("FeatureVector_decode_us", "serde decode FeatureVector", "µs"),
)


def measure(rounds: int, seconds: float) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` interleaved runs of each kind: kind -> the runs' measurements."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as folder:
        modules = {}
        for kind in KINDS:
            modules[kind] = Path(folder) / f"records_{kind}.py"
            codegen.write(modules[kind], kind=kind)
        for _ in range(rounds):
            for kind in KINDS:
                done = subprocess.run(
                    [sys.executable, "-c", _WORKER, str(modules[kind]), str(seconds)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def run(ctx: Context) -> list[Result]:
    rounds, seconds = (3, 20.0) if ctx.quick else (5, 60.0)
    runs = measure(rounds, seconds)
    first = runs["msgspec"][0]
    for kind in KINDS:  # the same work: identical tick and label counts
        assert all((r["ticks"], r["labels"]) == (first["ticks"], first["labels"]) for r in runs[kind]), runs
    results = []
    for key, name, unit in _ROWS:
        struct = statistics.median(r[key] for r in runs["msgspec"])
        dataclass = statistics.median(r[key] for r in runs["dataclass"])
        results.append(
            Result(
                SUITE,
                name,
                struct,
                unit,
                peer="dataclass(frozen, slots)",
                peer_value=dataclass,
                notes=(
                    f"median of {rounds} interleaved runs per kind; {first['events']:,} events, "
                    f"{first['ticks']:,} ticks of 2 synthetic symbols at 300 updates/s"
                ),
            )
        )
    return results


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for result in run(Context(bootstrap_servers=None, shared_dir=Path(), scratch=Path(), quick=quick)):
        ratio = (result.peer_value or float("nan")) / result.value
        print(
            f"{result.name:<72} {result.value:8.2f} {result.unit:<9} dataclass {result.peer_value:8.2f} ({ratio:.2f}x)"
        )
