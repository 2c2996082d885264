"""``quotewatch demo`` end to end: the whole local stack as real processes on the synthetic feed.

One run of the real command (its own Kafka broker, MLflow server, feed server, every service and
the dashboard, on free ports in a temporary run directory), checked the way a user would:

- a first model is trained on the lake the stack fills and promoted: a ``champion`` is registered;
- inference serves it: predictions from that champion version;
- records on every topic (and no dead letters), lake files for every dataset;
- the dashboard, in headless Chromium, shows a live p_change from the champion;
- Ctrl-C stops everything: exit code 0 and not one process of the stack left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from quotewatch.core.config import CommonSettings
from quotewatch.core.tail import tail_topic
from quotewatch.core.topics import CATALOG, TopicNames
from quotewatch.local.stack import champion_version
from tests.helpers import read_topic, wait_for

pytestmark = pytest.mark.slow

SYMBOLS = ("BTC-USD", "ETH-USD")
# Topics the lake sink writes (every topic with market or model data; the snapshot topic is the
# dashboard's compacted view and the dead letters are not data).
LAKE_TOPICS = ("md.raw", "md.events", "book.top3", "features", "labels", "predictions")
START_TIMEOUT = 180.0
CHAMPION_TIMEOUT = 420.0


@dataclass
class DemoRun:
    process: subprocess.Popen[bytes]
    run_dir: Path
    output: Path

    def status(self) -> dict[str, Any]:
        path = self.run_dir / "stack.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def alive_or_fail(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"quotewatch demo exited with {self.process.returncode}:\n{self.output.read_text()[-4000:]}"
            )

    def tree(self) -> set[int]:
        """Every process the demo started (children, grandchildren and the detached broker)."""
        pids = {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        status = self.status()
        pids |= {entry["pid"] for entry in status.get("processes", {}).values() if entry.get("pid")}
        if status.get("kafka_pid"):
            pids.add(status["kafka_pid"])
        return pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoRun]:
    run_dir = tmp_path / "demo"
    output = tmp_path / "demo.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quotewatch.cli",
                "demo",
                "--run-dir",
                str(run_dir),
                "--free-ports",
                "--symbols",
                ",".join(SYMBOLS),
                "--bootstrap-interval",
                "40",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the test sends SIGINT to the demo alone, as a terminal would
        )
    run = DemoRun(process, run_dir, output)
    try:
        yield run
    finally:
        if process.poll() is None:  # the test failed before its own Ctrl-C: do not leave the stack running
            leftovers = run.tree()
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for pid in leftovers:
                if alive(pid):
                    psutil.Process(pid).kill()


def test_demo_runs_the_whole_system_and_stops_cleanly(demo: DemoRun) -> None:
    def started() -> dict[str, Any] | None:
        demo.alive_or_fail()
        status = demo.status()
        return status if status.get("processes", {}).get("dashboard") else None

    status = wait_for(started, timeout=START_TIMEOUT, interval=1, message="every process of the stack ready")
    mlflow_url, dashboard_url = status["mlflow"], status["dashboard"]
    settings = CommonSettings(kafka_bootstrap_servers=status["kafka"], topic_prefix=status["topic_prefix"])
    topics = TopicNames(status["topic_prefix"])

    # A first champion, trained on the lake the running stack filled.
    def champion() -> str | None:
        demo.alive_or_fail()
        return champion_version(mlflow_url)

    version = wait_for(champion, timeout=CHAMPION_TIMEOUT, interval=2, message="a registered champion")

    # Inference serves it.
    def champion_predictions() -> list[dict[str, Any]]:
        demo.alive_or_fail()
        latest = [orjson.loads(line) for line in tail_topic(settings, topics.predictions, count=300, timeout=30)]
        return [
            record
            for record in latest
            if record.get("model_role") == "CHAMPION" and str(record.get("model_version")) == version
        ]

    predictions = wait_for(champion_predictions, timeout=120, interval=2, message="predictions from the champion")
    assert {record["symbol"] for record in predictions} <= set(SYMBOLS)
    assert all(0.0 <= record["p_change"] <= 1.0 for record in predictions)

    # Records on every topic, and a clean run dead-letters nothing.
    for suffix in CATALOG:
        topic = f"{topics.prefix}.{suffix}"
        if suffix == "dlq":
            dead_letters = read_topic(settings, topic, timeout=30)
            assert dead_letters == [], f"dead letters in a clean run: {dead_letters[:3]}"
        else:
            assert read_topic(settings, topic, expected=1, timeout=30), f"no records on {topic}"

    # Lake files for every dataset.
    lake = Path(status["lake"])
    for suffix in LAKE_TOPICS:
        dataset = lake / f"{topics.prefix}.{suffix}"

        def lake_files(dataset: Path = dataset) -> list[Path]:
            return list(dataset.rglob("*.parquet"))

        wait_for(lake_files, timeout=60, message=f"lake files in {dataset}")

    # The dashboard shows a live p_change from the champion, in a real browser.
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    from tests.browser.conftest import chromium_options

    browser = webdriver.Chrome(options=chromium_options())
    try:
        browser.get(dashboard_url)

        def champion_on_screen() -> tuple[str, str, str] | None:
            try:  # Dash renders the layout in the browser: the cards appear after the first callbacks
                role = browser.find_element(By.ID, "kpi-model-role").text
                model = browser.find_element(By.ID, "kpi-model").text
                p_change = browser.find_element(By.ID, "kpi-p-change").text
            except (NoSuchElementException, StaleElementReferenceException):
                return None
            return (role, model, p_change) if role == "CHAMPION" and model.endswith(f"v{version}") else None

        _role, _model, p_change = wait_for(
            champion_on_screen, timeout=60, interval=0.5, message="the champion on screen"
        )
        assert 0.0 <= float(p_change) <= 1.0, p_change
    finally:
        browser.quit()

    # Ctrl-C: everything stops, nothing is left behind.
    started_pids = demo.tree()
    assert len(started_pids) >= 9, started_pids  # broker, mlflow (+ worker), feed server, 5 services, dashboard
    os.kill(demo.process.pid, signal.SIGINT)
    assert demo.process.wait(timeout=120) == 0, demo.output.read_text()[-4000:]
    leftovers = {pid: psutil.Process(pid).cmdline() for pid in started_pids if alive(pid)}
    assert not leftovers, f"still running after Ctrl-C: {leftovers}"
    assert not (demo.run_dir / "stack.json").exists()
    logs = {path.stem for path in (demo.run_dir / "logs").glob("*.log")}
    assert {"mlflow", "feed-server", "ingest", "book", "labeler", "inference", "lake-sink", "dashboard"} <= logs
