"""The README and the docs say what the code does.

The reference pages (docs/reference/) hold blocks generated from the code (:mod:`tests.readme`;
``python -m tests.readme`` rewrites them): they are current and name every CLI command and every
environment variable. Every ``quotewatch`` command and ``make`` target the README or a docs page
documents exists. The README is a front door: short, with a real screenshot of the dashboard.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from quotewatch.core.config import SERVICE_SETTINGS
from tests import readme

README_TEXT = readme.README.read_text()
MAKEFILE = (readme.REPO / "Makefile").read_text()
CLI_PAGE = readme.PAGES["cli"].read_text()
CONFIG_PAGE = readme.PAGES["config"].read_text()
DOCS = sorted((readme.REPO / "docs").rglob("*.md"))
DOCUMENTED_TEXTS = {"README.md": README_TEXT} | {str(p.relative_to(readme.REPO)): p.read_text() for p in DOCS}
README_MAX_LINES = 250


def test_generated_blocks_are_current() -> None:
    stale = readme.all_stale()
    assert not stale, f"generated blocks {stale} differ from the code: run `.venv/bin/python -m tests.readme`"


def test_every_block_lives_in_its_reference_page() -> None:
    for name, page in readme.PAGES.items():
        assert page.parent == readme.REFERENCE
        assert readme.begin_marker(name) in page.read_text(), f"{page} lost its block {name!r}"


def test_render_rewrites_a_stale_block_back_to_the_current_page() -> None:
    block = readme.current_block(CLI_PAGE, "cli")
    edited = CLI_PAGE.replace(block, block.replace("| `quotewatch train` |", "| `quotewatch train-old` |"))
    assert edited != CLI_PAGE
    assert readme.stale_blocks(edited) == ["cli"]
    assert readme.render(edited) == CLI_PAGE


def test_check_mode_exits_zero_on_the_committed_pages() -> None:
    assert readme.main(["--check"]) == 0


def test_the_cli_page_names_every_cli_command() -> None:
    commands = readme.cli_commands()
    assert len(commands) >= 20, [c.name for c in commands]  # the walk reached the lazy groups
    missing = [c.name for c in commands if f"`{c.name}" not in CLI_PAGE]
    assert not missing, f"commands missing from docs/reference/cli.md: {missing}"
    assert all(c.summary for c in commands), "every command has a one-line help"


def test_the_configuration_page_names_every_environment_variable() -> None:
    variables = {name.upper() for cls in SERVICE_SETTINGS.values() for name in cls.model_fields}
    missing = sorted(v for v in variables if f"`{v}`" not in CONFIG_PAGE)
    assert not missing, f"environment variables missing from docs/reference/configuration.md: {missing}"


def test_the_readme_is_a_front_door() -> None:
    lines = README_TEXT.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference material to docs/"
    assert "make demo" in README_TEXT
    assert "make test" in README_TEXT
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", README_TEXT)
    assert images, "the README shows a screenshot of the dashboard"
    for image in images:
        data = (readme.REPO / image).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), image
        assert len(data) > 20_000, f"{image} is too small to be a real screenshot"


def test_every_docs_link_of_the_readme_resolves() -> None:
    for target in re.findall(r"\]\(((?:docs|notebooks|infra)/[^)#]+)", README_TEXT):
        assert (readme.REPO / target).exists(), target


def test_every_setting_docstring_names_its_variable() -> None:
    for setting in readme.all_settings():
        assert setting.env == setting.field.upper(), f"{setting.service}.{setting.field} documents {setting.env}"


def _number(text: str) -> float | None:
    """The first number in ``text``, with a binary size unit applied (``64 MiB`` -> 67108864)."""
    match = re.search(r"-?\d+(?:\.\d+)?(?:\s*(KiB|MiB|GiB))?", text)
    if match is None:
        return None
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}.get(match.group(1) or "", 1)
    return float(match.group(0).split()[0].removesuffix(match.group(1) or "")) * scale


def _documented_default_matches(default: Any, text: str) -> bool:
    if default is None:
        return True  # computed elsewhere or unset: the text explains it ("unset", "DELTA_MS, never less", …)
    if isinstance(default, bool):
        return text.lower() == str(default).lower()
    if isinstance(default, int | float):
        return _number(text) == pytest.approx(float(default))
    if isinstance(default, tuple):
        return text == ",".join(str(part) for part in default)
    return text == str(default)


def test_every_documented_default_is_the_fields_default() -> None:
    wrong = [
        f"{s.service}.{s.field}: documented {s.default_text!r}, actual {s.default!r}"
        for s in readme.all_settings()
        if not _documented_default_matches(s.default, s.default_text)
    ]
    assert not wrong, wrong


def _code(text: str) -> list[str]:
    """The contents of the fenced blocks and inline code spans of ``text``."""
    fenced = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    outside = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    return fenced + re.findall(r"`([^`\n]+)`", outside)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_TEXTS))
def test_every_documented_quotewatch_command_exists(name: str) -> None:
    paths = {command.path[1:] for command in readme.cli_commands()}
    groups = {path[:i] for path in paths for i in range(1, len(path))}
    documented = [
        match.split()
        for snippet in _code(DOCUMENTED_TEXTS[name])
        for match in re.findall(r"(?:^|[\s/])quotewatch((?: [a-z][a-z-]*)+)", snippet)
    ]
    unknown = []
    for words in documented:
        prefix: tuple[str, ...] = ()
        for word in words:
            if prefix in paths:
                break  # the rest are arguments
            prefix = (*prefix, word)
        if prefix not in paths and prefix not in groups:
            unknown.append("quotewatch " + " ".join(words))
    assert not unknown, f"{name} documents commands the CLI does not have: {unknown}"


def _make_targets(text: str) -> set[str]:
    return {target for snippet in _code(text) for target in re.findall(r"(?:^|\n|&& |; )make ([a-z][a-z-]*)", snippet)}


def test_every_documented_make_target_exists() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.M))
    documented = {target for text in DOCUMENTED_TEXTS.values() for target in _make_targets(text)}
    assert {"demo", "test"} <= _make_targets(README_TEXT)
    assert documented <= targets, f"make targets the Makefile lacks: {documented - targets}"
