"""Type-check the notebooks' code against the package they call (``make lint``).

The notebooks run end to end only in the stack e2e test (minutes, a broker and MLflow). A signature that
changes under them (``training.gate`` gained ``lift=``) must fail at lint time instead: the code cells of
each notebook are written out as one module and type-checked with the project's mypy settings.

    python -m tests.notebook_types
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# `display` is Jupyter's builtin.
PRELUDE = "from IPython.display import display\n\n"
# pandas' stubs type a `.loc` scalar as anything, bytes included, which an f-string check then flags.
DISABLED = ("str-bytes-safe",)


def notebook_code(path: Path) -> str:
    """The code cells of ``path`` as one module; IPython magics cannot be type-checked and are refused."""
    cells = json.loads(path.read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    magics = [line for source in sources for line in source.splitlines() if line.lstrip().startswith(("%", "!"))]
    if magics:
        raise SystemExit(f"{path.name}: IPython magics cannot be type-checked: {magics}")
    return PRELUDE + "\n\n".join(sources) + "\n"


def main() -> int:
    if not NOTEBOOKS:
        raise SystemExit("no notebooks under notebooks/")
    with tempfile.TemporaryDirectory(prefix="qw-notebooks-") as tmp:
        modules = []
        for notebook in NOTEBOOKS:
            module = Path(tmp) / f"{notebook.stem}.py"
            module.write_text(notebook_code(notebook))
            modules.append(str(module))
        disabled = [f"--disable-error-code={code}" for code in DISABLED]
        out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), *disabled, *modules])
    sys.stdout.write(out.replace(tmp, "notebooks"))
    sys.stderr.write(err)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
