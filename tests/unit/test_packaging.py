"""The wheel must contain every package: the package list in pyproject.toml is explicit."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_under_services_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        "quotewatch"
        + ("." + ".".join(init.parent.relative_to(REPO / "services").parts) if init.parent != REPO / "services" else "")
        for init in (REPO / "services").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert "quotewatch.schemas" in listed


def test_schemas_ship_as_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["quotewatch.schemas"] == "schemas"
    assert "*.avsc" in config["package-data"]["quotewatch.schemas"]


def test_the_compiled_order_book_is_built_from_the_current_source() -> None:
    import quotewatch.domain._orderbook as compiled

    source = REPO / "services" / "domain" / "_orderbook.pyx"
    built = Path(compiled.__file__ or "")
    assert built.suffix == ".so", f"not the compiled module: {built}"
    assert built.stat().st_mtime >= source.stat().st_mtime, (
        f"{source} changed after {built} was built: run `make setup`"
    )
