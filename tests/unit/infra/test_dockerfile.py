"""infra/Dockerfile, checked statically: hadolint, a pinned base, a non-root user, and the package
installed the way the README installs it (``pip install .`` of this repository, nothing else).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

from tests.unit.infra.conftest import REPO, tool

DOCKERFILE = REPO / "infra" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    buffer = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buffer += " " + stripped.removesuffix("\\").strip() if buffer else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = buffer.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            buffer = ""
    return result


def pip_install_targets(command: str) -> list[list[str]]:
    """The positional arguments of every ``pip install`` in a shell command line."""
    targets = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        for index, word in enumerate(words[:-1]):
            if word.endswith("pip") and words[index + 1] == "install":
                targets.append([w for w in words[index + 2 :] if not w.startswith("-")])
    return targets


def test_hadolint_passes_without_ignores() -> None:
    result = subprocess.run(
        [str(tool("hadolint")), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_hadolint_would_catch_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install quotewatch\n")
    result = subprocess.run(
        [str(tool("hadolint")), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_base_image_is_pinned_python_311() -> None:
    steps = instructions()
    args = dict(arg.split("=", 1) for keyword, arg in steps if keyword == "ARG" and "=" in arg)
    bases = [arg.split()[0] for keyword, arg in steps if keyword == "FROM"]
    assert len(bases) == 2, "a build stage and a runtime stage"
    for base in bases:
        image = args[base[2:-1]] if base.startswith("${") else base
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), image
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11")


def test_runs_as_an_unprivileged_numeric_user() -> None:
    steps = instructions()
    users = [arg for keyword, arg in steps if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), users[-1]
    assert int(uid) >= 1000, users[-1]
    assert not gid or int(gid) >= 1000, users[-1]
    created = " ".join(arg for keyword, arg in steps if keyword == "RUN")
    assert f"--uid {uid}" in created, "the USER is created in the image"
    # The last instructions after USER run nothing as root.
    after_user = steps[[keyword for keyword, _ in steps].index("USER") :]
    assert not [arg for keyword, arg in after_user if keyword == "RUN"]


def test_installs_the_package_the_way_the_readme_does() -> None:
    runs = [arg for keyword, arg in instructions() if keyword == "RUN"]
    installs = [target for run in runs for target in pip_install_targets(run)]
    assert installs == [["."]], f"exactly one `pip install .` and no other requirement: {installs}"
    readme_commands = re.findall(r"^(?:python3\.11 -m )?pip install [^\n]*$", (REPO / "README.md").read_text(), re.M)
    assert [pip_install_targets(command)[0] for command in readme_commands] == [["."]], readme_commands
    # `make setup` (the README's first command) installs the same project, editable, with dev extras.
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r'pip install --quiet -e "\.\[dev\]"', makefile)


def test_copies_everything_the_wheel_is_built_from() -> None:
    copies = [arg.split() for keyword, arg in instructions() if keyword == "COPY" and "--from" not in arg]
    sources = {source.rstrip("/") for parts in copies for source in parts[:-1]}
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= sources, f"pyproject package-dir not copied: {package_dirs - sources}"
    assert {"pyproject.toml", "setup.py", PYPROJECT["project"]["readme"]} <= sources  # setup.py: the compiled book
    ignore = (REPO / "infra" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the context is an allow-list"
    for source in sources:
        assert f"!{source}" in ignore or f"!{source}/" in ignore or f"!{Path(source).parent}/" in ignore, source


def test_entry_point_is_the_cli_and_env_names_are_settings() -> None:
    steps = instructions()
    entrypoints = [json.loads(arg) for keyword, arg in steps if keyword == "ENTRYPOINT"]
    assert entrypoints[-1] == ["quotewatch"]
    assert PYPROJECT["project"]["scripts"]["quotewatch"] == "quotewatch.cli:main"
    from quotewatch.core.config import CommonSettings

    runtime_stage = max(index for index, (keyword, _) in enumerate(steps) if keyword == "FROM")
    env_line = " ".join(arg for keyword, arg in steps[runtime_stage:] if keyword == "ENV")
    names = set(re.findall(r"([A-Z_]+)=", env_line))
    python_runtime = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    assert names - python_runtime <= {name.upper() for name in CommonSettings.model_fields}, names
