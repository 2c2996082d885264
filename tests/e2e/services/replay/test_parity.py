"""Live = replay = backtest: the same frames give byte-identical features, labels and predictions three ways.

The raw log (a recorded Advanced Trade capture, BTC-USD + ETH-USD, then a later synthetic session
of both symbols on a new connection) is written to ``A.md.raw``. Then, as real processes:

(a) live: ``quotewatch run ingest`` (INGEST_SOURCE=topic) -> book -> labeler -> inference on A,
    inference serving a pinned version ``models:/<name>/1`` of a real MLflow server;
(b) ``quotewatch replay --source topic:A --from X --to Y --prefix B`` (X inside the synthetic
    session: the replay must find its CONNECTED record behind the capture's connection) and the
    same four services on B;
(c) ``quotewatch backtest --source topic:A --from X --to Y --model models:/<name>/1 --records DIR``
    and ``quotewatch backtest --source capture:FILE`` (in-process, the capture through the same parser);
(d) ``quotewatch capture export --source topic:A --from X --to Y+Δ+5s`` and a backtest of that capture
    on [X, Y): its metrics are those of (a)'s live predictions and labels of the ticks in [X, Y).

Records are compared as bytes after serde (the backtest's records re-encoded with the topic serde),
``ts_init`` included, per symbol in stream order: (c) on the window = (a)'s synthetic session on
every tick before Y (the backtest reads on past Y for the labels of the last Δ); (b) = the start of
(a)'s synthetic session and of (c) (the replayed services see nothing past Y, so they lack those
labels); (c) on the capture = (a)'s capture session.

**Served with original timestamps** (issue 21): each real capture (2026 Advanced Trade, 2021 and
2018 Exchange) is served by ``quotewatch feed serve --timestamps original`` to a live
``quotewatch run ingest``, with book, labeler and inference behind it; then ``quotewatch backtest
--source topic:`` of the raw log the ingest wrote gives the same top-3, features, labels and
predictions, byte for byte. The run time is kept short by serving a window of each Exchange
capture: its first lines (:data:`SERVED`), with their receive-time sidecar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from mlflow import MlflowClient

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin, producer_config
from quotewatch.core.records import RawFrame
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.ml import evaluation
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.captures import read_capture, sidecar_path
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FEED_EXCHANGE
from quotewatch.local.kafka import free_port
from quotewatch.local.processes import tcp_open
from quotewatch.services.replay.backtest import read_records
from quotewatch.services.replay.engine import BacktestEngine
from quotewatch.services.replay.sources import format_time
from tests.broker.services.inference.registry_models import fitted_lr, register
from tests.helpers import read_topic, shared_data_dir, wait_for

QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))
CAPTURE = "advanced_trade_level2_BTC-USD_ETH-USD_2026-08-09_cryptofeed.jsonl.gz"
SYNTHETIC_START_NS = 1_786_309_700_000_000_000  # 2026-08-09T21:08:20Z, after the capture's last frame
SYNTHETIC_SECONDS = 40
SECOND = 1_000_000_000
DERIVED = ("book.top3", "features", "labels", "predictions")
SERVED = {
    # capture file -> lines served from its start (None: all of it)
    CAPTURE: None,  # 1,030 lines, 24 s of BTC-USD and ETH-USD
    "exchange_level2_ticker_matches_10products_2021-04-17_cryptofeed.jsonl": 3000,  # ~40 s of 10 products
    "exchange_level2_BTC-USD_2018-04-17_gdax-orderbook-ml.jsonl": 5000,  # ~2.5 min of BTC-USD
}


def raw_log(capture: Path) -> list[RawFrame]:
    """The capture's connection (closed by a DISCONNECTED), then a synthetic connection of both symbols."""
    log = list(read_capture(capture).raw_frames(disconnect=True))
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=21, start_ns=SYNTHETIC_START_NS)
    log.extend(synthetic_raw_frames(FEED_ADVANCED, config, SYNTHETIC_SECONDS * SECOND))
    return log


def produce_raw(settings: CommonSettings, records: list[RawFrame]) -> None:
    serde = AvroSerde()
    topic = TopicNames(settings.topic_prefix).md_raw
    producer = Producer(producer_config(settings, "parity-test"))
    for record in records:
        producer.produce(topic, serde.encode(topic, record), key=record.feed.encode())
        producer.poll(0)
    assert producer.flush(60) == 0


@contextmanager
def service(
    name: str, env: dict[str, str], log: Path, args: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``quotewatch run NAME`` (or ``quotewatch ARGS``) as a process, logging to ``log``; stopped on the way out."""
    argv = [QUOTEWATCH, *(args if args is not None else ["run", name])]
    with log.open("ab") as output:
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def pipeline(stack: ExitStack, base_env: dict[str, str], prefix: str, logs: Path) -> list[subprocess.Popen[bytes]]:
    env = {**base_env, "TOPIC_PREFIX": prefix}
    return [
        stack.enter_context(service(name, {**env, **extra}, logs / f"{prefix}-{name}.log"))
        for name, extra in (("ingest", {"INGEST_SOURCE": "topic"}), ("book", {}), ("labeler", {}), ("inference", {}))
    ]


def run_cli(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run([QUOTEWATCH, *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"quotewatch {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def topic_bytes(settings: CommonSettings, topic: str) -> dict[str, list[bytes]]:
    """Values of ``topic`` per key (= symbol), in stream order."""
    out: dict[str, list[bytes]] = defaultdict(list)
    for record in sorted(read_topic(settings, topic, decode=False), key=lambda r: (r["_partition"], r["_offset"])):
        out[record["_key"]].append(record["_raw"])
    return out


def file_bytes(path: Path, topic: str) -> dict[str, list[bytes]]:
    """A backtest records file re-encoded with the topic's serde, per symbol."""
    serde = AvroSerde()
    out: dict[str, list[bytes]] = defaultdict(list)
    for record in read_records(path):
        out[record.symbol].append(serde.encode(topic, record))
    return out


def split_at(
    values: dict[str, list[bytes]], topic: str, ts_ns: int, field: str = "ts_event"
) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """(records with ``field`` < ts_ns, the rest), per symbol."""
    serde = AvroSerde()
    before: dict[str, list[bytes]] = defaultdict(list)
    after: dict[str, list[bytes]] = defaultdict(list)
    for symbol, items in values.items():
        for item in items:
            (before if getattr(serde.decode(item, topic), field) < ts_ns else after)[symbol].append(item)
    return before, after


def count(values: dict[str, list[bytes]]) -> int:
    return sum(len(items) for items in values.values())


def test_live_replay_and_backtest_give_byte_identical_records(
    make_settings: Any, mlflow_server: Any, tmp_path: Path
) -> None:
    live: CommonSettings = make_settings()
    a = TopicNames(live.topic_prefix)
    b = TopicNames(f"{live.topic_prefix}-r")
    replayed: CommonSettings = make_settings(topic_prefix=b.prefix)
    capture = shared_data_dir() / CAPTURE
    ensure_topics(make_admin(live), a.prefix)
    log = raw_log(capture)
    produce_raw(live, log)
    expected = BacktestEngine(100, 500).run_raw(log).counts  # only to know when the services are done

    name = f"parity-{uuid.uuid4().hex[:8]}"
    version = register(mlflow_server.tracking_uri, name, fitted_lr())
    model_uri = f"models:/{name}/{version}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": live.kafka_bootstrap_servers,
        "METRICS_PORT": "0",
        "TICK_MS": "100",
        "DELTA_MS": "500",
        "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
        "MODEL_URI": model_uri,
        "CHALLENGER_URI": f"models:/{name}@no-challenger",
        "MODEL_POLL_SECONDS": "600",
        "LOG_LEVEL": "WARNING",
    }
    window_from = SYNTHETIC_START_NS + 10 * SECOND
    window_to = SYNTHETIC_START_NS + 30 * SECOND
    window = ["--from", format_time(window_from), "--to", format_time(window_to)]
    logs = tmp_path / "logs"
    logs.mkdir()
    with ExitStack() as stack:
        processes = pipeline(stack, env, a.prefix, logs) + pipeline(stack, env, b.prefix, logs)

        def alive() -> None:
            for process in processes:
                assert process.poll() is None, "\n".join(p.read_text()[-3000:] for p in logs.iterdir())

        # (b) the replay, as soon as A's raw log is complete (it is: the test wrote it).
        out = run_cli(["replay", "--source", f"topic:{a.prefix}", *window, "--prefix", b.prefix, "--no-progress"], env)
        assert "from the CONNECTED of synthetic" in out, out
        # (c) the backtests, in-process.
        run_cli(
            ["backtest", "--source", f"topic:{a.prefix}", *window, "--model", model_uri, "--records",
             str(tmp_path / "window"), "--output", str(tmp_path / "report"), "--no-mlflow", "--no-progress"],
            env,
        )  # fmt: skip
        # The capture backtest is also logged to MLflow as an evaluation run.
        run_cli(
            [
                "backtest",
                "--source",
                f"capture:{capture}",
                "--model",
                model_uri,
                "--records",
                str(tmp_path / "capture"),
                "--output",
                str(tmp_path / "report-capture"),
                "--no-progress",
            ],
            {**env, "BACKTEST_EXPERIMENT": f"backtest-{name}"},
        )
        # What the services on B make of the replayed raw records (the synthetic CONNECTED .. --to).
        replayed_raw = [r for r in log if SYNTHETIC_START_NS <= r.ts_init < window_to]
        assert replayed_raw[0].kind == "CONNECTED"
        expected_b = BacktestEngine(100, 500).run_raw(replayed_raw).counts  # only to know when B is done

        def done(settings: CommonSettings, topic: str, total: int) -> bool:
            alive()
            return len(read_topic(settings, topic, decode=False, timeout=20)) >= total

        wait_for(lambda: done(live, a.predictions, expected.feature_vectors), timeout=240, interval=2, message="A")
        wait_for(
            lambda: done(replayed, b.predictions, expected_b.feature_vectors), timeout=120, interval=2, message="B"
        )
        wait_for(lambda: done(live, a.labels, expected.labels), timeout=60, interval=2, message="A labels")
        wait_for(lambda: done(replayed, b.labels, expected_b.labels), timeout=60, interval=2, message="B labels")

    # The capture backtest's evaluation run: metrics per model and baseline, the plots.
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name(f"backtest-{name}")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["quotewatch.run_kind"] == "backtest-evaluation"
    assert {f"{name}_v{version}_roc_auc", "baseline_base_rate_brier"} <= set(run.data.metrics)
    plots = {item.path for item in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/roc.png", "plots/calibration.png"}

    for suffix in DERIVED:
        topic_a, topic_b = f"{a.prefix}.{suffix}", f"{b.prefix}.{suffix}"
        live_records = topic_bytes(live, topic_a)
        replay_records = topic_bytes(replayed, topic_b)
        window_records = file_bytes(tmp_path / "window" / f"{suffix}.avro", topic_a)
        capture_records = file_bytes(tmp_path / "capture" / f"{suffix}.avro", topic_a)
        live_capture, live_synthetic = split_at(live_records, topic_a, SYNTHETIC_START_NS)

        assert count(window_records) > 0, suffix
        assert set(window_records) == {"BTC-USD", "ETH-USD"}, suffix
        # (c) = (a): the backtest of the window gives the live records of every tick t < --to (a
        # label is its tick's record: t_event) from the synthetic connection on.
        tick = "t_event" if suffix == "labels" else "ts_event"
        live_before_to, _ = split_at(live_synthetic, topic_a, window_to, tick)
        assert dict(window_records) == dict(live_before_to), f"{suffix}: backtest != live before --to"
        # (b) = (a) and (c): the replay starts at the synthetic connection, so it is the start of the
        # live session, and of the backtest's records; --to cut it.
        for symbol, items in replay_records.items():
            assert items == live_synthetic[symbol][: len(items)], f"{suffix} {symbol}: replay != live"
            assert items == window_records[symbol][: len(items)], f"{suffix} {symbol}: replay != backtest"
            assert len(items) < len(live_synthetic[symbol]), f"{suffix} {symbol}: --to cut the window"
        if suffix == "labels":
            # The labels of the ticks of the last Δ before --to are known after it: the backtest
            # reads on for them, the services on the replayed window never see that input.
            for symbol, items in replay_records.items():
                assert len(items) < len(window_records[symbol]), symbol
        # (c) on the capture file = (a) on the capture's connection.
        assert count(capture_records) > 0, suffix
        assert dict(capture_records) == dict(live_capture), f"{suffix}: capture backtest != live"

    # (d) A capture exported from the live session (the synthetic connection, up to Δ + 5 s past --to
    # for the labels of the window's last ticks) backtests to the metrics of the live predictions.
    exported = tmp_path / "exported.jsonl.gz"
    lookahead = format_time(window_to + 6 * SECOND)
    out = run_cli(
        ["capture", "export", "--source", f"topic:{a.prefix}", "--from", format_time(window_from), "--to", lookahead,
         "--output", str(exported)],
        env,
    )  # fmt: skip
    assert "of connection synthetic" in out, out
    run_cli(
        ["backtest", "--source", f"capture:{exported}", *window, "--model", model_uri, "--output",
         str(tmp_path / "report-exported"), "--no-mlflow", "--no-progress"],
        env,
    )  # fmt: skip
    report = json.loads((tmp_path / "report-exported" / "metrics.json").read_text())
    live_p = {
        (r["symbol"], r["ts_event"]): r["p_change"]
        for r in read_topic(live, a.predictions)
        if r["model_role"] == "CHAMPION"
    }
    # The synced-only rule, as the backtest report applies it: a label across a resync is not evaluated.
    live_y = {(r["symbol"], r["t_event"]): r["label"] for r in read_topic(live, a.labels) if r["synced_over_horizon"]}
    rows = sorted(key for key in live_p if key in live_y and window_from <= key[1] < window_to)
    live_scores = evaluation.score([live_y[key] for key in rows], [live_p[key] for key in rows]).as_dict()
    backtest_scores = report["scores"][f"{name} v{version}"]
    assert backtest_scores["n"] == live_scores["n"] == len(rows)
    assert len(rows) > 100
    for metric, value in live_scores.items():
        # The same rows and p; only the order of the sums differs (emission order vs sorted).
        assert backtest_scores[metric] == pytest.approx(value, rel=1e-12, abs=1e-15), metric


# -- the real captures, served with their original timestamps ---------------------------------------


def capture_window(path: Path, lines: int | None, directory: Path) -> Path:
    """The first ``lines`` lines of a capture and of its receive-time sidecar, as a capture in ``directory``."""
    if lines is None:
        return path
    sidecar = sidecar_path(path)
    window = directory / path.name.removesuffix(".gz")
    opened = read_capture(path)
    window.write_text("\n".join(opened.lines[:lines]) + "\n")
    rows = sidecar.read_text().splitlines()
    (directory / sidecar.name).write_text("\n".join(rows[: lines + 1]) + "\n")  # the header and one row per line
    return window


def iso_ns(text: str) -> int:
    """An ISO-8601 UTC time of the raw JSON in ns (the recorded times have at most six decimals)."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    return seconds * SECOND + int((fraction + "000000")[:6]) * 1000


def last_book_changes(lines: tuple[str, ...]) -> dict[str, int]:
    """The exchange time of each product's last book change, read from the raw JSON (either protocol)."""
    latest: dict[str, int] = {}
    for line in lines:
        message = json.loads(line)
        if message.get("type") == "l2update":
            product, ts = message["product_id"], iso_ns(message["time"])
            latest[product] = max(latest.get(product, ts), ts)
        elif message.get("channel") == "l2_data":
            for event in message["events"]:
                for update in event["updates"]:
                    product, ts = event["product_id"], iso_ns(update["event_time"])
                    latest[product] = max(latest.get(product, ts), ts)
    return latest


@pytest.mark.parametrize("capture_name", sorted(SERVED), ids=lambda name: name.split("_")[0] + name.split("_20")[1][:2])
def test_a_capture_served_with_its_original_timestamps_gives_the_backtest_records_live(
    make_settings: Any, mlflow_server: Any, tmp_path: Path, capture_name: str
) -> None:
    """feed serve --timestamps original -> ingest, book, labeler, inference = backtest of the raw log, bytewise."""
    live: CommonSettings = make_settings()
    names = TopicNames(live.topic_prefix)
    ensure_topics(make_admin(live), names.prefix)
    path = capture_window(shared_data_dir() / capture_name, SERVED[capture_name], tmp_path)
    capture = read_capture(path)
    last_change = last_book_changes(capture.lines)
    protocol = "advanced" if capture.feed == FEED_ADVANCED else "exchange"
    assert capture.feed in (FEED_ADVANCED, FEED_EXCHANGE)

    name = f"parity-{uuid.uuid4().hex[:8]}"
    version = register(mlflow_server.tracking_uri, name, fitted_lr())
    model_uri = f"models:/{name}/{version}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": live.kafka_bootstrap_servers,
        "TOPIC_PREFIX": names.prefix,
        "METRICS_PORT": "0",
        "TICK_MS": "100",
        "DELTA_MS": "500",
        "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
        "MODEL_URI": model_uri,
        "CHALLENGER_URI": f"models:/{name}@no-challenger",
        "MODEL_POLL_SECONDS": "600",
        "LOG_LEVEL": "WARNING",
    }
    port = free_port()
    serve = ["feed", "serve", "--capture", str(path), "--timestamps", "original", "--speed", "max"]
    serve += ["--protocol", protocol, "--port", str(port)]
    ingest_env = {**env, "COINBASE_WS_URL": f"ws://127.0.0.1:{port}", "FEED": capture.feed}
    ingest_env["SYMBOLS"] = ",".join(capture.symbols)
    logs = tmp_path / "logs"
    logs.mkdir()
    with ExitStack() as stack:
        feed = stack.enter_context(service("feed-server", env, logs / "feed-server.log", serve))
        wait_for(lambda: tcp_open(port) or feed.poll() is not None, timeout=60, message="the feed server listening")
        ingest = stack.enter_context(service("ingest", ingest_env, logs / "ingest.log"))
        processes = [feed, ingest] + [
            stack.enter_context(service(service_name, env, logs / f"{service_name}.log"))
            for service_name in ("book", "labeler", "inference")
        ]

        def alive() -> None:
            for process in processes:
                assert process.poll() is None, "\n".join(p.read_text()[-3000:] for p in logs.iterdir())

        # The window's last book change of every product reached md.events, at its recorded time.
        def through_the_last_change() -> bool:
            alive()
            newest: dict[str, int] = {}
            for event in read_topic(live, names.md_events, timeout=30):
                if event["kind"] == "UPDATE":
                    newest[event["symbol"]] = max(newest.get(event["symbol"], 0), event["ts_event"])
            return all(newest.get(product, 0) >= ts for product, ts in last_change.items())

        wait_for(through_the_last_change, timeout=180, interval=2, message="every product's last book change")
        ingest.terminate()  # the raw log ends here (a DISCONNECTED record); what it holds is the backtest's input
        assert ingest.wait(60) == 0, (logs / "ingest.log").read_text()[-3000:]
        processes.remove(ingest)
        run_cli(
            ["backtest", "--source", f"topic:{names.prefix}", "--model", model_uri, "--records",
             str(tmp_path / "backtest"), "--output", str(tmp_path / "report"), "--no-mlflow", "--no-progress"],
            env,
        )  # fmt: skip
        backtest = {
            suffix: file_bytes(tmp_path / "backtest" / f"{suffix}.avro", f"{names.prefix}.{suffix}")
            for suffix in DERIVED
        }
        for suffix in DERIVED:

            def complete(topic: str = f"{names.prefix}.{suffix}", total: int = count(backtest[suffix])) -> bool:
                alive()
                return len(read_topic(live, topic, decode=False, timeout=30)) >= total

            wait_for(complete, timeout=240, interval=2, message=f"the backtest's {suffix} records live")

    # The recording's exchange times came through: every update is at its recorded time, months
    # (or years) before the ingest received it.
    updates = [e for e in read_topic(live, names.md_events, timeout=30) if e["kind"] == "UPDATE"]
    assert updates
    assert max(e["ts_event"] for e in updates) == max(last_change.values())
    assert all(e["ts_init"] - e["ts_event"] > 86_400 * SECOND for e in updates)
    for suffix in DERIVED:
        topic = f"{names.prefix}.{suffix}"
        records = backtest[suffix]
        assert set(records) == set(last_change), f"{suffix}: records of every product with book changes"
        assert dict(topic_bytes(live, topic)) == dict(records), f"{suffix}: live != backtest of the raw log"
