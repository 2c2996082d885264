"""``quotewatch train`` fails with one clear line before touching the registry when it cannot train."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from quotewatch.cli import main
from tests.unit.services.trainer.market_data import synthetic_ticks, write_lake


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in ("MLFLOW_TRACKING_URI", "TOPIC_PREFIX", "SYMBOLS", "QUOTEWATCH_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LAKE_URI", str(tmp_path / "lake"))
    return tmp_path / "lake"


def test_no_tracking_server_is_a_config_error(env: Path) -> None:
    result = CliRunner().invoke(main, ["train"])
    assert result.exit_code == 1
    assert "error: MLFLOW_TRACKING_URI is not set" in result.output


def test_an_empty_lake_says_there_is_nothing_to_train_on(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    result = CliRunner().invoke(main, ["train", "--quiet"])
    assert result.exit_code == 1
    assert "error: nothing to train on: 0 feature rows, 0 label rows" in result.output


def test_too_short_a_window_is_refused_with_the_counts(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    features, labels = synthetic_ticks(10)
    write_lake(env, "qw", features, labels)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setenv("SYMBOLS", "BTC-USD,ETH-USD")
    result = CliRunner().invoke(main, ["train", "--quiet"])
    assert result.exit_code == 1
    assert "error: too little data:" in result.output
    assert "training rows (need 200)" in result.output


def test_times_need_a_zone(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    result = CliRunner().invoke(main, ["train", "--from", "2026-08-09T21:00:00"])
    assert result.exit_code == 2
    assert "has no time zone" in result.output
