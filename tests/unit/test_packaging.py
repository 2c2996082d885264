"""The wheel must contain every package: the package list in pyproject.toml is explicit."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "quotewatch"


def test_every_package_under_src_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        "quotewatch" + ("." + ".".join(init.parent.relative_to(PACKAGE).parts) if init.parent != PACKAGE else "")
        for init in PACKAGE.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert "quotewatch.schemas" in listed


def test_schemas_ship_as_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["quotewatch.schemas"] == "schemas"
    assert config["package-dir"][""] == "src", "src layout: the package lives where its name says"
    assert "*.avsc" in config["package-data"]["quotewatch.schemas"]


def test_the_compiled_order_book_is_built_from_the_current_source() -> None:
    import quotewatch.domain.market._orderbook as compiled

    source = PACKAGE / "domain" / "market" / "_orderbook.pyx"
    built = Path(compiled.__file__ or "")
    assert built.suffix == ".so", f"not the compiled module: {built}"
    assert built.stat().st_mtime >= source.stat().st_mtime, (
        f"{source} changed after {built} was built: run `make setup`"
    )
