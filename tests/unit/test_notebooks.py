"""The notebooks in notebooks/ are committed without outputs and are parameterised by the environment.

They are executed, every cell, on a real lake and MLflow server by ``tests/e2e/stack/`` (after a
``quotewatch demo`` run); here only what can be checked without running them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PARAMETERS = ("LAKE_URI", "TOPIC_PREFIX", "SYMBOLS")


def test_the_two_notebooks_exist() -> None:
    assert {path.name for path in NOTEBOOKS} == {"explore_lake.ipynb", "training_walkthrough.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_no_outputs_are_committed(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    with_outputs = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not with_outputs, f"cells {with_outputs} carry outputs: run `.venv/bin/nbstripout {path.name}`"


def test_nbstripout_would_change_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nbstripout", "--verify", *map(str, NOTEBOOKS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_first_code_cell_reads_the_parameters_from_the_environment(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), "papermill-style parameters cell"
    for name in PARAMETERS:
        assert f'{name} = os.environ.get("{name}"' in first.source, name
    assert notebook.metadata["kernelspec"]["language"] == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_every_code_cell_is_python(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            try:
                ast.parse(cell.source)
            except SyntaxError as exc:
                pytest.fail(f"{path.name} cell {index}: {exc}")


def test_the_training_notebook_uses_the_trainers_functions() -> None:
    source = "\n".join(
        cell.source for cell in nbformat.read(NOTEBOOK_DIR / "training_walkthrough.ipynb", as_version=4).cells
    )
    for name in ("load_lake_frames", "build_training_set", "time_split", "train(", "gate(", "publish("):
        assert name in source, name
    assert "alias=None" in source, "the walk-through never moves an alias"
