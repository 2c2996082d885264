"""``quotewatch demo`` end to end: the whole local stack as real processes on the synthetic feed.

One run of the real command per module (its own Kafka broker, MLflow server, feed server, every
service and the dashboard, on free ports in a temporary run directory), checked the way a user
would, by the tests below in order:

1. a first model is trained on the lake the stack fills and promoted: a ``champion`` is registered;
   inference serves it: predictions from that champion version; records on every topic (and no
   dead letters), lake files for every dataset; the dashboard, in headless Chromium, shows a live
   p_change from the champion;
2. the notebooks (``notebooks/*.ipynb``) run, as a user runs them, on that run's lake and MLflow
   server, every cell (a failing cell or assertion fails the test);
3. Ctrl-C stops everything: exit code 0 and not one process of the stack left.

The stack is started once (a module-scoped fixture) because it takes minutes to train a first
champion; each test also works alone (``-k``), waiting for what it needs.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from quotewatch.core.config import CommonSettings
from quotewatch.core.tail import tail_topic
from quotewatch.core.topics import CATALOG, TopicNames
from quotewatch.local.champion import champion_version
from tests.e2e.stack.demo_run import DemoRun, alive, running_demo
from tests.helpers import read_topic, wait_for

pytestmark = pytest.mark.slow

SYMBOLS = ("BTC-USD", "ETH-USD")
# Topics the lake sink writes (every topic with market or model data; the snapshot topic is the
# dashboard's compacted view and the dead letters are not data).
LAKE_TOPICS = ("md.raw", "md.events", "book.top3", "features", "labels", "predictions")
START_TIMEOUT = 180.0
CHAMPION_TIMEOUT = 420.0
NOTEBOOKS = Path(__file__).resolve().parents[3] / "notebooks"
NOTEBOOK_TIMEOUT = 300  # seconds per cell
NOTEBOOK_EXPERIMENT = "quotewatch-notebooks-e2e"


@dataclass
class ChampionDemo:
    """The module's demo run and its first champion (waited for once per module)."""

    run: DemoRun
    _serving: tuple[dict[str, Any], str] | None = field(default=None, init=False)
    _failed: BaseException | None = field(default=None, init=False)

    def serving(self) -> tuple[dict[str, Any], str]:
        """(status, champion version) once a first champion is registered; waited for once per module."""
        if self._failed is not None:
            raise AssertionError("the demo never registered a champion (see the first failing test)") from self._failed
        if self._serving is None:
            try:
                status = self.run.started(START_TIMEOUT)

                def champion() -> str | None:
                    self.run.alive_or_fail()
                    return champion_version(status["mlflow"])

                version = wait_for(champion, timeout=CHAMPION_TIMEOUT, interval=2, message="a registered champion")
            except BaseException as exc:
                self._failed = exc
                raise
            self._serving = (status, version)
        return self._serving


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChampionDemo]:
    args = ["--symbols", ",".join(SYMBOLS), "--bootstrap-interval", "40"]
    with running_demo(tmp_path_factory.mktemp("stack"), args) as run:
        yield ChampionDemo(run)


def test_demo_trains_a_champion_and_serves_it_everywhere(demo: ChampionDemo) -> None:
    # A first champion, trained on the lake the running stack filled.
    status, version = demo.serving()
    dashboard_url = status["dashboard"]
    settings = CommonSettings(kafka_bootstrap_servers=status["kafka"], topic_prefix=status["topic_prefix"])
    topics = TopicNames(status["topic_prefix"])

    # Inference serves it.
    def champion_predictions() -> list[dict[str, Any]]:
        demo.run.alive_or_fail()
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

    from tests.browser.chromium import chromium_options

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
        save_dashboard_screenshot(browser)
    finally:
        browser.quit()


README_SCREENSHOT = Path(__file__).resolve().parents[3] / "docs" / "images" / "dashboard.png"
"""The README's picture of the dashboard: this test takes it (QUOTEWATCH_UPDATE_SCREENSHOT=1 rewrites it)."""


def save_dashboard_screenshot(browser: Any) -> Path:
    """A screenshot of the live dashboard serving the champion, kept with the test's artifacts.

    With ``QUOTEWATCH_UPDATE_SCREENSHOT=1`` it also replaces the README's screenshot
    (docs/images/dashboard.png), so the picture the README shows is one this test took.
    """
    root = os.environ.get("QUOTEWATCH_ARTIFACTS_DIR")
    directory = Path(root) / "e2e" if root else Path(tempfile.mkdtemp(prefix="quotewatch-e2e-"))
    directory.mkdir(parents=True, exist_ok=True)
    shot = directory / "dashboard-demo.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000, "a real, populated dashboard"
    if os.environ.get("QUOTEWATCH_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        README_SCREENSHOT.write_bytes(shot.read_bytes())
    return shot


# -- the notebooks on the demo's lake and MLflow ----------------------------------------------------


def execute_notebook(path: Path, env: dict[str, str], kernels: Path) -> dict[str, Any]:
    """Run every cell of the notebook at ``path`` in a fresh kernel of this interpreter; its ``summary``.

    The notebook runs as in Jupyter (working directory ``notebooks/``) with ``env`` as the kernel's
    environment. One cell is appended that prints the notebook's ``summary`` dict as JSON. Raises
    ``nbclient.exceptions.CellExecutionError`` (with the cell and its traceback) when a cell fails.
    """
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # An explicit kernel spec for this interpreter (the venv): a `python3` spec found elsewhere on the
    # Jupyter path (a user's or the system's) could start another Python without quotewatch.
    spec_dir = kernels / "quotewatch-e2e"
    if not spec_dir.exists():
        write_kernel_spec(spec_dir, overrides={"display_name": "quotewatch e2e"})
    manager = KernelManager(
        kernel_name="quotewatch-e2e", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import json\nprint(json.dumps(summary))"))
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=NOTEBOOK_TIMEOUT,
        startup_timeout=120,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=env)
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs if output.get("name") == "stdout")
    summary: dict[str, Any] = json.loads(printed.strip().splitlines()[-1])
    return summary


def champion_rows_in_lake(lake_uri: str, prefix: str, version: str) -> int:
    """Predictions of champion ``version`` in the lake whose label is in the lake too."""
    from quotewatch.core import lake

    topics = TopicNames(prefix)
    predictions = lake.read_dataset(
        lake_uri, topics.predictions, columns=["symbol", "ts_event", "model_role", "model_version"]
    )
    labels = lake.read_dataset(lake_uri, topics.labels, columns=["symbol", "t_event"])
    champion = predictions[(predictions["model_role"] == "CHAMPION") & (predictions["model_version"] == version)]
    joined = champion.merge(labels, left_on=["symbol", "ts_event"], right_on=["symbol", "t_event"])
    return len(joined)


def test_notebooks_run_on_the_demo_lake_and_mlflow(demo: ChampionDemo, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    status, version = demo.serving()
    lake_uri, prefix, tracking_uri = status["lake"], status["topic_prefix"], status["mlflow"]
    # The lake sink flushes every 10 s: wait until the champion's predictions and their labels are filed.
    wait_for(
        lambda: champion_rows_in_lake(lake_uri, prefix, version) >= 100,
        timeout=90,
        interval=2,
        message=f"100 labelled predictions of champion v{version} in the lake",
    )
    env = {
        **os.environ,
        "LAKE_URI": lake_uri,
        "TOPIC_PREFIX": prefix,
        "SYMBOLS": ",".join(SYMBOLS),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "NOTEBOOK_EXPERIMENT": NOTEBOOK_EXPERIMENT,
    }

    explored = execute_notebook(NOTEBOOKS / "explore_lake.ipynb", env, tmp_path / "kernels")
    demo.run.alive_or_fail()
    assert explored["lake"] == lake_uri
    assert explored["symbols"] == list(SYMBOLS)
    assert all(explored["rows"][f"{prefix}.{suffix}"] > 0 for suffix in LAKE_TOPICS), explored["rows"]
    assert 0.0 < explored["base_rate"] < 1.0
    assert explored["label_agreement"] == 1.0
    assert explored["join_coverage"] >= 0.9
    assert explored["scored_rows"].get(f"CHAMPION v{version}", 0) >= 100, explored["scored_rows"]
    assert 0.0 <= explored["auc"][f"CHAMPION v{version}"] <= 1.0

    trained = execute_notebook(NOTEBOOKS / "training_walkthrough.ipynb", env, tmp_path / "kernels")
    demo.run.alive_or_fail()
    assert trained["labelled_rows"] >= 200
    assert 0.0 < trained["base_rate"] < 1.0
    assert trained["split"]["gap_ms"] >= 500
    assert trained["split"]["train_end_ns"] < trained["split"]["test_start_ns"]
    assert set(trained["test_auc"]) >= {"lr", "xgb", "baseline: base_rate", "baseline: changed_last_delta"}
    # Logged and registered on the demo's MLflow server, without moving an alias.
    client = MlflowClient(tracking_uri)
    run = client.get_run(trained["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == NOTEBOOK_EXPERIMENT
    assert run.data.metrics["test_roc_auc"] == pytest.approx(trained["test_auc"][trained["candidate"]])
    assert "champion_test_roc_auc" in run.data.metrics, "the champion is scored on the same test window"
    registered = client.get_model_version("quotewatch", trained["registered_version"])
    assert registered.run_id == trained["mlflow_run_id"]
    assert registered.tags["quotewatch.gate"] in {"passed", "refused"}
    assert champion_version(tracking_uri) == version, "the notebook must not move the champion alias"


def test_ctrl_c_stops_everything_and_leaves_nothing_behind(demo: ChampionDemo) -> None:
    run = demo.run
    run.started(START_TIMEOUT)
    run.alive_or_fail()
    started_pids = run.tree()
    assert len(started_pids) >= 9, started_pids  # broker, mlflow (+ worker), feed server, 5 services, dashboard
    os.kill(run.process.pid, signal.SIGINT)
    assert run.process.wait(timeout=120) == 0, run.output.read_text()[-4000:]
    leftovers = {pid: psutil.Process(pid).cmdline() for pid in started_pids if alive(pid)}
    assert not leftovers, f"still running after Ctrl-C: {leftovers}"
    assert not (run.run_dir / "stack.json").exists()
    logs = {path.stem for path in (run.run_dir / "logs").glob("*.log")}
    assert {"mlflow", "feed-server", "ingest", "book", "labeler", "inference", "lake-sink", "dashboard"} <= logs
