"""No module of the package is over 600 lines: a file that grows past it is split along its seams."""

from __future__ import annotations

from pathlib import Path

import quotewatch

MAX_LINES = 600
PACKAGE = Path(quotewatch.__file__).parent


def test_no_file_in_the_package_is_over_600_lines() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))  # the generated core/records.py included
    assert len(sources) > 100, "the package was not found"
    too_long = {
        str(path.relative_to(PACKAGE)): lines
        for path in sources
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert too_long == {}, f"split these along their seams (at most {MAX_LINES} lines each): {too_long}"
