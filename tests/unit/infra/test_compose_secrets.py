"""docker-compose.yml holds no secret: passwords and keys come from the environment (``.env``).

Checked statically, like the rest of tests/unit/infra: no secret has a value or a non-empty
default in the file, what needs a secret refuses to start without it (compose itself for Grafana,
MinIO's entry command for MinIO), Grafana has no anonymous access unless asked for, and the
committed ``.env.example`` lists every variable the file reads, with no secret value in it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.infra.conftest import COMPOSE_FILE, ENV_EXAMPLE, REPO, TEST_SECRETS

# Names of variables that hold secrets (AWS_SECRET_ACCESS_KEY, GF_SECURITY_ADMIN_PASSWORD, ...).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|PASSPHRASE|TOKEN|API_KEY|USER_INFO|SIGNING_KEY")
# One whole reference to a variable: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}.
REFERENCE = re.compile(r"^\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}$")
ANY_REFERENCE = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def raw_compose() -> dict[str, Any]:
    """The file as written (before interpolation): where a value comes from is what is checked."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def test_no_secret_is_written_in_the_compose_file() -> None:
    problems = []
    for name, service in raw_compose()["services"].items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: environment as a mapping, please"
        for key, value in environment.items():
            if not SECRET_NAME.search(key):
                continue
            match = REFERENCE.match(str(value))
            if match is None:
                problems.append(f"{name}: {key} is written in the file ({value!r}), not read from the environment")
            elif match["op"] in ("-", ":-") and match["arg"]:
                problems.append(f"{name}: {key} defaults to {match['arg']!r}; a secret has no default")
    # Anywhere else in the file too (commands, healthchecks): no secret variable with a default.
    for match in ANY_REFERENCE.finditer(COMPOSE_FILE.read_text()):
        if SECRET_NAME.search(match["name"]) and match["op"] in ("-", ":-") and match["arg"]:
            problems.append(f"${{{match['name']}}} defaults to {match['arg']!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("missing", sorted(TEST_SECRETS))
def test_without_each_required_secret_compose_refuses_to_start(run_compose: Any, missing: str) -> None:
    given = {name: value for name, value in TEST_SECRETS.items() if name != missing}
    result = run_compose("--profile", "*", "config", "--format", "json", env=given, secrets=False)
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value" in result.stderr
    assert ".env" in result.stderr, "the message says where to set it"
    assert all(f"required variable {name}" not in result.stderr for name in given)


def test_grafana_admin_password_comes_from_the_environment_and_anonymous_access_is_opt_in(
    default_model: dict[str, Any], resolve_compose: Any
) -> None:
    grafana = default_model["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == TEST_SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    opted_in = resolve_compose(env={"GRAFANA_ANONYMOUS_ENABLED": "true"})["services"]["grafana"]["environment"]
    assert opted_in["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert opted_in["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_the_lake_clients_use_the_minio_credentials_from_the_environment(resolve_compose: Any) -> None:
    given = {"MINIO_ROOT_USER": "lake-user", "MINIO_ROOT_PASSWORD": "from-the-environment"}
    services = resolve_compose("*", env=given)["services"]
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "from-the-environment"
    for name in ("lake-sink", "trainer"):
        environment = services[name]["environment"]
        assert environment["AWS_ACCESS_KEY_ID"] == "lake-user", name
        assert environment["AWS_SECRET_ACCESS_KEY"] == "from-the-environment", name
    unset = resolve_compose("*")["services"]
    assert unset["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == ""
    assert unset["lake-sink"]["environment"]["AWS_SECRET_ACCESS_KEY"] == ""


def test_minio_refuses_to_start_without_a_password(full_model: dict[str, Any], tmp_path: Path) -> None:
    """MinIO would otherwise start with its well-known minioadmin/minioadmin."""
    minio = full_model["services"]["minio"]
    # `config` writes a literal $ as $$ again; the container's shell gets one.
    argv = [*minio["entrypoint"], *(part.replace("$$", "$") for part in minio["command"])]
    assert argv[:2] == ["/bin/sh", "-c"]
    stub = tmp_path / "bin" / "minio"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "minio $*"\n')
    stub.chmod(0o755)
    path = f"{stub.parent}:/usr/bin:/bin"

    def start(password: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": path, "MINIO_ROOT_USER": "quotewatch", "MINIO_ROOT_PASSWORD": password}
        return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=30)

    refused = start("")
    assert refused.returncode == 1
    assert "MINIO_ROOT_PASSWORD is not set" in refused.stderr
    assert "minio server" not in refused.stdout
    started = start("a-long-enough-password")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "minio server /data --console-address :9001"


def test_env_example_lists_every_variable_the_file_reads_and_no_secret_value() -> None:
    assert ENV_EXAMPLE.exists(), "commit .env.example next to docker-compose.yml"
    listed: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*(?P<name>[A-Z_][A-Z0-9_]*)=(?P<value>.*)$", line)
        if match:
            listed[match["name"]] = match["value"]
    read = {match["name"] for match in ANY_REFERENCE.finditer(COMPOSE_FILE.read_text())}
    assert sorted(read - set(listed)) == [], "variables docker-compose.yml reads that .env.example does not list"
    assert sorted(set(listed) - read) == [], ".env.example lists variables docker-compose.yml does not read"
    with_values = {name: value for name, value in listed.items() if SECRET_NAME.search(name) and value}
    assert with_values == {}, "a secret has a value in .env.example"
    assert set(TEST_SECRETS) <= set(listed)
    ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()}
    assert ".env" in ignored, ".env holds the secrets: git must ignore it"
