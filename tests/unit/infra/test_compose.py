"""docker-compose.yml, checked statically (there is no Docker engine on the CI machine).

Docker Compose itself parses and normalises the file (``docker-compose config``); these tests then
hold it to the code: every QuoteWatch container runs a CLI command that exists with those options,
its environment is exactly settings its service accepts (with values that validate), images are
pinned, host ports do not collide and bind to loopback, topics come from the catalog, and the
services find each other where the file says they are.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet

from quotewatch.core.config import SERVICE_SETTINGS, CommonSettings, load_settings
from quotewatch.local.mlflow import SERVER_ENVIRONMENT
from tests.unit.infra.cli_resolve import resolve_cli
from tests.unit.infra.conftest import COMPOSE_FILE, REPO, tool

QUOTEWATCH_IMAGE = "quotewatch"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# What `docker compose up` starts without a profile, and what each profile adds.
DEFAULT_SERVICES = {
    "redpanda",
    "redpanda-config",
    "topics-init",
    "console",
    "mlflow",
    "ingest",
    "book",
    "labeler",
    "inference",
    "lake-sink",
    "dashboard",
    "prometheus",
    "grafana",
}
PROFILE_SERVICES = {"sim": {"feed-server"}, "train": {"trainer"}, "minio": {"minio", "minio-init"}}
# The long-running stream services and their METRICS_PORT defaults (src/quotewatch/core/config.py).
STREAM_SERVICES = {"ingest": 9101, "book": 9102, "labeler": 9103, "inference": 9104, "lake-sink": 9105}
# Variables a container may carry that are not QuoteWatch settings, and why.
MLFLOW_CLIENT_ENV = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
"""Read by MLflow's client itself: the basic-auth credentials of the registry."""
THIRD_PARTY_ENV = {
    # Read by the S3 filesystem of the lake when LAKE_URI is s3://… (profile minio).
    "lake-sink": {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"},
    "trainer": {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", *MLFLOW_CLIENT_ENV},
    "inference": MLFLOW_CLIENT_ENV,
}


def quotewatch_services(model: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in model["services"].items()
        if service["image"].split(":")[0] == QUOTEWATCH_IMAGE
    }


def settings_class(command_path: list[str]) -> type[CommonSettings] | None:
    """The settings class a container's command builds its configuration from (None: options only)."""
    match command_path:
        case ["run", service]:
            return SERVICE_SETTINGS[service.replace("-", "_")]
        case ["train"]:
            return SERVICE_SETTINGS["trainer"]
        case ["topics", _]:
            return CommonSettings
        case ["feed", _]:
            return None  # the feed server is configured by its options only
    raise AssertionError(f"no settings class is known for `quotewatch {' '.join(command_path)}`")


def env_names(cls: type[CommonSettings]) -> set[str]:
    return {name.upper() for name in cls.model_fields}


# -- the file parses and has the services the issue lists ---------------------------------------


def test_compose_file_parses_as_yaml_and_compose_validates_it(run_compose: Any) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert raw["name"] == "quotewatch"
    result = run_compose("--profile", "*", "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_default_services_and_profiles(default_model: dict[str, Any], resolve_compose: Any) -> None:
    assert set(default_model["services"]) == DEFAULT_SERVICES
    for profile, extra in PROFILE_SERVICES.items():
        assert set(resolve_compose(profile)["services"]) == DEFAULT_SERVICES | extra, profile


def test_a_broken_file_is_rejected_by_the_validator(run_compose: Any, tmp_path: Any) -> None:
    # The validation step above can fail: an unknown key in a service is an error.
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  a:\n    image: busybox:1.36\n    imagee: typo\n")
    result = run_compose("-f", str(broken), "config", "--quiet")
    assert result.returncode != 0
    assert "imagee" in result.stderr


# -- commands and environment -------------------------------------------------------------------


def test_every_quotewatch_command_exists_in_the_cli(full_model: dict[str, Any]) -> None:
    services = quotewatch_services(full_model)
    assert set(services) >= set(STREAM_SERVICES) | {"dashboard", "topics-init", "feed-server", "trainer"}
    missing = []
    for name, service in sorted(services.items()):
        entrypoint = service["entrypoint"] or ["quotewatch"]
        assert entrypoint[-1] == "quotewatch", f"{name}: the container runs the quotewatch CLI"
        try:
            resolve_cli(list(service["command"]))
        except AssertionError as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, "compose commands the CLI does not have:\n" + "\n".join(missing)


def test_every_environment_variable_is_a_setting_of_its_service(
    full_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    problems = []
    for name, service in sorted(quotewatch_services(full_model).items()):
        try:
            command_path, _ = resolve_cli(list(service["command"]))
        except AssertionError:
            continue  # reported by test_every_quotewatch_command_exists_in_the_cli
        cls = settings_class(command_path)
        environment: dict[str, str] = {key: str(value) for key, value in (service.get("environment") or {}).items()}
        if cls is None:
            if environment:
                problems.append(f"{name} reads no settings, yet is given {sorted(environment)}")
            continue
        unknown = set(environment) - env_names(cls) - THIRD_PARTY_ENV.get(name, set())
        if unknown:
            problems.append(f"{name} ({cls.__name__}) does not accept {sorted(unknown)}")
            continue
        # The values must validate too: build the settings from exactly this environment.
        for variable in env_names(cls) | {"QUOTEWATCH_CONFIG_FILE"}:
            monkeypatch.delenv(variable, raising=False)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        try:
            load_settings(cls)
        except Exception as exc:  # noqa: BLE001 - report every container, not only the first
            problems.append(f"{name}: {exc}")
    assert not problems, "\n".join(problems)


def test_stream_services_expose_metrics_on_their_default_port(
    full_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, port in STREAM_SERVICES.items():
        environment = full_model["services"][name]["environment"]
        assert int(environment["METRICS_PORT"]) == port, name
        assert environment["METRICS_HOST"] == "0.0.0.0", f"{name}: Prometheus scrapes from another container"
        monkeypatch.delenv("METRICS_PORT", raising=False)
        assert SERVICE_SETTINGS[name.replace("-", "_")]().metrics_port == port, f"{name}: config default moved"


def test_services_share_one_broker_registry_and_mlflow(full_model: dict[str, Any]) -> None:
    redpanda = " ".join(full_model["services"]["redpanda"]["command"])
    internal_kafka = re.search(r"--advertise-kafka-addr=internal://([\w.-]+:\d+)", redpanda)
    internal_registry = re.search(r"--schema-registry-addr=internal://0\.0\.0\.0:(\d+)", redpanda)
    assert internal_kafka
    assert internal_registry
    registry_url = f"http://redpanda:{internal_registry.group(1)}"
    console = yaml.safe_load((REPO / "infra/redpanda/console-config.yaml").read_text())
    assert console["schemaRegistry"] == {"enabled": True, "urls": [registry_url]}
    assert console["kafka"]["brokers"] == [internal_kafka.group(1)]
    for name, service in quotewatch_services(full_model).items():
        if name == "feed-server":
            continue  # a WebSocket server: no broker
        environment = service["environment"]
        assert environment["KAFKA_BOOTSTRAP_SERVERS"] == internal_kafka.group(1), name
        assert environment["SCHEMA_REGISTRY_URL"] == registry_url, f"{name}: Console could not decode its topics"
        assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name


def test_feed_defaults_to_live_coinbase_and_sim_profile_serves_it_locally(resolve_compose: Any) -> None:
    live = resolve_compose()["services"]["ingest"]["environment"]
    assert live["FEED"] == "coinbase-advanced"
    # Empty is ignored by the settings (env_ignore_empty): the feed's public Coinbase endpoint.
    assert live["COINBASE_WS_URL"] == ""
    sim = resolve_compose("sim", env={"COINBASE_WS_URL": "ws://feed-server:8765"})["services"]
    assert sim["ingest"]["environment"]["COINBASE_WS_URL"] == "ws://feed-server:8765"
    command = sim["feed-server"]["command"]
    assert "--synthetic" in command
    assert command[command.index("--port") + 1] == "8765"
    assert sim["ingest"]["depends_on"]["feed-server"]["required"] is False
    assert "COINBASE_WS_URL=ws://feed-server:8765 docker compose --profile sim up" in COMPOSE_FILE.read_text()


# -- topics ---------------------------------------------------------------------------------------


def test_topics_are_created_from_the_catalog_never_auto_created(full_model: dict[str, Any]) -> None:
    services = full_model["services"]
    (script,) = services["redpanda-config"]["command"]
    assert "rpk cluster config set auto_create_topics_enabled false -X admin.hosts=redpanda:9644" in script
    assert services["topics-init"]["command"] == ["topics", "create"]
    assert services["topics-init"]["depends_on"]["redpanda-config"]["condition"] == "service_completed_successfully"
    for name in (*STREAM_SERVICES, "dashboard"):
        condition = services[name]["depends_on"]["topics-init"]["condition"]
        assert condition == "service_completed_successfully", name


# -- images, ports, volumes -----------------------------------------------------------------------


def test_every_image_is_pinned_by_an_explicit_version(full_model: dict[str, Any]) -> None:
    for name, service in full_model["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image} is not pinned to a version"
    version = PYPROJECT["project"]["version"]
    for name, service in quotewatch_services(full_model).items():
        assert service["image"] == f"{QUOTEWATCH_IMAGE}:{version}", f"{name}: image tag is the package version"
        assert service["build"]["dockerfile"] == "infra/Dockerfile"
    mlflow_pin = next(dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("mlflow=="))
    version = mlflow_pin.split("==")[1]
    mlflow = full_model["services"]["mlflow"]
    assert mlflow["image"] == f"quotewatch-mlflow:{version}"
    assert mlflow["build"]["dockerfile"] == "infra/mlflow/Dockerfile"
    # Built on the official image of the pinned MLflow, plus the basic-auth app's dependency.
    dockerfile = (REPO / "infra/mlflow/Dockerfile").read_text()
    assert f"\nFROM ghcr.io/mlflow/mlflow:v{version}\n" in dockerfile
    (install,) = re.findall(r"^RUN pip install --no-cache-dir (.+)$", dockerfile, re.MULTILINE)
    assert install == '"Flask-WTF==1.3.0" "WTForms==3.3.2"', "pinned: mlflow's auth extra, which the image lacks"


def test_the_mlflow_image_passes_hadolint() -> None:
    result = subprocess.run(
        [str(tool("hadolint")), "--no-color", str(REPO / "infra/mlflow/Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_external_image_says_where_its_tag_came_from() -> None:
    lines = COMPOSE_FILE.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s+image: (\S+)$", line)
        if not match or match.group(1).startswith(QUOTEWATCH_IMAGE + ":"):
            continue
        above = "\n".join(lines[max(0, number - 4) : number])
        assert "#" in above, f"line {number + 1}: say in a comment where the tag of {match.group(1)} came from"


def test_host_ports_do_not_collide_and_bind_to_loopback(full_model: dict[str, Any], resolve_compose: Any) -> None:
    published: dict[int, str] = {}
    for name, service in full_model["services"].items():
        for port in service.get("ports", []):
            host_port = int(port["published"])
            assert host_port not in published, f"host port {host_port}: {published.get(host_port)} and {name}"
            published[host_port] = name
            assert port["host_ip"] == "127.0.0.1", f"{name}: {host_port} must bind to 127.0.0.1 unless configured"
    assert published[8050] == "dashboard"
    assert {19092, 18081, 5000, 8080, 9090, 3000} <= set(published)
    exposed = resolve_compose("*", env={"QW_BIND_ADDRESS": "0.0.0.0"})
    assert {p["host_ip"] for s in exposed["services"].values() for p in s.get("ports", [])} == {"0.0.0.0"}


def test_mlflow_server_is_reachable_from_containers_and_can_deliver_webhooks(full_model: dict[str, Any]) -> None:
    mlflow = full_model["services"]["mlflow"]
    options = dict(arg.split("=", 1) for arg in mlflow["command"] if arg.startswith("--") and "=" in arg)
    assert "mlflow" in options["--allowed-hosts"].split(",")
    assert "mlflow:*" in options["--allowed-hosts"].split(",")
    # Webhooks need a SQL backend; the database and the artifacts live on named volumes.
    assert options["--backend-store-uri"].startswith("sqlite:////mlflow/db/")
    mounts = {mount["target"]: mount for mount in mlflow["volumes"]}
    assert mounts["/mlflow/db"]["type"] == "volume"
    assert mounts[options["--artifacts-destination"]]["type"] == "volume"
    # The same server environment as the local MLflow server of `make demo` and the tests.
    assert SERVER_ENVIRONMENT.items() <= mlflow["environment"].items()
    assert mlflow["environment"]["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https"
    assert mlflow["environment"]["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    # The webhook-secret key survives restarts: the entry point keeps it on the database volume.
    assert mlflow["entrypoint"] == ["/bin/sh", "/opt/quotewatch/mlflow-entrypoint.sh"]
    assert mounts["/opt/quotewatch/mlflow-entrypoint.sh"]["source"] == str(REPO / "infra/docker/mlflow-entrypoint.sh")
    assert "/mlflow/db/webhook-secret.key" in (REPO / "infra/docker/mlflow-entrypoint.sh").read_text()
    inference = full_model["services"]["inference"]
    assert inference["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert inference["environment"]["WEBHOOK_HOST"] == "0.0.0.0"
    port = int(inference["environment"]["WEBHOOK_PORT"])
    assert port > 0
    assert inference["environment"]["WEBHOOK_URL"].startswith(f"http://inference:{port}/"), "reachable from mlflow"


def test_lake_is_a_volume_shared_by_the_sink_and_the_trainer(full_model: dict[str, Any]) -> None:
    for name in ("lake-sink", "trainer"):
        service = full_model["services"][name]
        lake = service["environment"]["LAKE_URI"]
        assert any(mount["source"] == "lake" and mount["target"] == lake for mount in service["volumes"]), name
    assert full_model["services"]["minio"]["profiles"] == ["minio"]
    assert "mc mb --ignore-existing lake/quotewatch-lake" in full_model["services"]["minio-init"]["command"][0]


def test_dashboard_listens_on_8050_in_the_container(full_model: dict[str, Any]) -> None:
    dashboard = full_model["services"]["dashboard"]
    assert dashboard["environment"]["DASH_HOST"] == "0.0.0.0"
    assert [(p["published"], p["target"]) for p in dashboard["ports"]] == [("8050", 8050)]


def test_mlflow_entrypoint_keeps_one_webhook_key_across_restarts(tmp_path: Any) -> None:
    key_file = tmp_path / "webhook-secret.key"
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
        "MLFLOW_WEBHOOK_KEY_FILE": str(key_file),
        "MLFLOW_FLASK_KEY_FILE": str(tmp_path / "flask-secret.key"),
    }
    script = str(REPO / "infra/docker/mlflow-entrypoint.sh")
    command = ["/bin/sh", script, "sh", "-c", 'printf %s "$MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"']
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    assert first == second == key_file.read_text().strip()
    Fernet(first.encode())  # a valid Fernet key, as MLflow needs
    assert key_file.stat().st_mode & 0o077 == 0, "the key file is private"


def test_inference_gets_a_webhook_secret_when_none_is_given(full_model: dict[str, Any], tmp_path: Any) -> None:
    inference = full_model["services"]["inference"]
    assert inference["entrypoint"] == ["with-webhook-secret", "quotewatch"]
    dockerfile = (REPO / "infra/Dockerfile").read_text()
    assert "COPY infra/docker/with-webhook-secret.sh /usr/local/bin/with-webhook-secret" in dockerfile
    script = str(REPO / "infra/docker/with-webhook-secret.sh")
    show = ["sh", "-c", 'printf %s "$MLFLOW_WEBHOOK_SECRET"']
    env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    generated = subprocess.run(["/bin/sh", script, *show], env=env, capture_output=True, text=True, check=True)
    assert len(generated.stdout) >= 32
    again = subprocess.run(["/bin/sh", script, *show], env=env, capture_output=True, text=True, check=True)
    assert again.stdout != generated.stdout, "random per start"
    given = {**env, "MLFLOW_WEBHOOK_SECRET": "pinned"}
    pinned = subprocess.run(["/bin/sh", script, *show], env=given, capture_output=True, text=True, check=True)
    assert pinned.stdout == "pinned"


# -- authentication ---------------------------------------------------------------------------------


def shell_run(script: str, env: dict[str, str]) -> list[list[str]]:
    """The argv of each command of a one-shot ``a && b && c`` script, its ``$NAME`` expanded from ``env``
    as the container's shell would (``config`` keeps the file's ``$$``; compose passes ``$`` to the container)."""
    commands = [shlex.split(part) for part in script.replace("$$", "$").split("&&")]
    expand = re.compile(r"\$(\w+)")
    return [[expand.sub(lambda m: env[m.group(1)], arg) for arg in command] for command in commands]


def test_kafka_requires_sasl_scram_of_one_superuser_from_the_environment(resolve_compose: Any) -> None:
    given = {"KAFKA_SASL_USERNAME": "qw-user", "KAFKA_SASL_PASSWORD": "from-env"}
    services = resolve_compose("*", env=given)["services"]
    # Redpanda creates the SCRAM user when the cluster forms...
    assert services["redpanda"]["environment"]["RP_BOOTSTRAP_USER"] == "qw-user:from-env:SCRAM-SHA-256"
    # ...redpanda-config makes it the superuser and requires SASL, before any client connects.
    config = services["redpanda-config"]
    assert config["entrypoint"] == ["/bin/sh", "-c"]
    commands = shell_run(config["command"][0], config["environment"])
    settings = {tuple(c[4:6]) for c in commands if c[:4] == ["rpk", "cluster", "config", "set"]}
    assert ("superusers", '["qw-user"]') in settings
    assert ("enable_sasl", "true") in settings
    assert commands[-1][4:6] == ["enable_sasl", "true"], "SASL goes on last, once its superuser exists"
    assert all(c[-2:] == ["-X", "admin.hosts=redpanda:9644"] for c in commands)
    assert services["topics-init"]["depends_on"]["redpanda-config"]["condition"] == "service_completed_successfully"
    assert services["console"]["depends_on"]["redpanda-config"]["condition"] == "service_completed_successfully"
    # Every client of the broker authenticates with that user: the services...
    for name, service in quotewatch_services({"services": services}).items():
        if name == "feed-server":
            continue
        environment = service["environment"]
        assert environment["KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        assert environment["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-256", name
        assert (environment["KAFKA_SASL_USERNAME"], environment["KAFKA_SASL_PASSWORD"]) == ("qw-user", "from-env")
    # ...and Console (its kafka.sasl.* settings as environment variables).
    console = services["console"]["environment"]
    assert console["KAFKA_SASL_ENABLED"] == "true"
    assert console["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-256"
    assert (console["KAFKA_SASL_USERNAME"], console["KAFKA_SASL_PASSWORD"]) == ("qw-user", "from-env")


def test_the_admin_api_and_console_stay_on_loopback(full_model: dict[str, Any]) -> None:
    ports = {
        (name, port["target"]): port["host_ip"]
        for name, service in full_model["services"].items()
        for port in service.get("ports", [])
    }
    assert ports[("redpanda", 9644)] == "127.0.0.1", "the admin API (no authentication) is not on the network"
    assert ports[("console", 8080)] == "127.0.0.1"


def test_mlflow_runs_the_basic_auth_app_with_the_admin_from_the_environment(
    resolve_compose: Any, tmp_path: Any
) -> None:
    given = {"MLFLOW_TRACKING_USERNAME": "registry-admin", "MLFLOW_TRACKING_PASSWORD": "from-env"}
    services = resolve_compose("*", env=given)["services"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    environment = mlflow["environment"]
    assert environment["MLFLOW_AUTH_ADMIN_USERNAME"] == "registry-admin"
    assert environment["MLFLOW_AUTH_ADMIN_PASSWORD"] == "from-env"
    mounts = {mount["target"]: mount for mount in mlflow["volumes"]}
    ini = mounts[environment["MLFLOW_AUTH_CONFIG_PATH"]]
    assert ini["source"] == str(REPO / "infra/mlflow/basic_auth.ini")
    assert ini["read_only"] is True
    # MLflow's own reader of the file: the user database on the database volume, nobody else trusted.
    # Read as MLflow reads it (mlflow/server/auth/config.py: configparser, section [mlflow]).
    parser = configparser.ConfigParser()
    parser.read(ini["source"])
    config = parser["mlflow"]
    assert config["database_uri"].startswith("sqlite:////mlflow/db/"), "the auth database survives restarts"
    assert config["default_permission"] == "NO_PERMISSIONS"
    assert "admin_password" not in config, "no admin password in the file: it comes from the environment"
    # The clients of the registry log in with the same account.
    for name in ("inference", "trainer"):
        client = services[name]["environment"]
        assert (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]) == (
            "registry-admin",
            "from-env",
        )
    # The health check needs no login (/health is not protected by the app).
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])


def test_mlflow_entrypoint_keeps_one_flask_secret_across_restarts(tmp_path: Any) -> None:
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
        "MLFLOW_WEBHOOK_KEY_FILE": str(tmp_path / "webhook-secret.key"),
        "MLFLOW_FLASK_KEY_FILE": str(tmp_path / "flask-secret.key"),
    }
    script = str(REPO / "infra/docker/mlflow-entrypoint.sh")
    command = ["/bin/sh", script, "sh", "-c", 'printf %s "$MLFLOW_FLASK_SERVER_SECRET_KEY"']
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    assert len(first) >= 32
    assert first == second == (tmp_path / "flask-secret.key").read_text().strip()
    assert (tmp_path / "flask-secret.key").stat().st_mode & 0o077 == 0, "the key file is private"


def test_the_trainer_signs_with_the_key_inference_checks(resolve_compose: Any) -> None:
    services = resolve_compose("*", env={"MODEL_SIGNING_KEY": "k" * 64})["services"]
    assert services["trainer"]["environment"]["MODEL_SIGNING_KEY"] == "k" * 64
    assert services["inference"]["environment"]["MODEL_SIGNING_KEY"] == "k" * 64
    unset = resolve_compose("*")["services"]
    assert unset["inference"]["environment"]["MODEL_SIGNING_KEY"] == "", "optional: digests only"
