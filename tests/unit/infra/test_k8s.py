"""infra/k8s (plain manifests, ``kubectl apply -k infra/k8s``), checked statically like the compose file.

Every manifest validates against the Kubernetes API's JSON schemas (``kubernetes-validate``, strict:
unknown fields are errors; the schemas ship in its wheel, so no cluster and no network are needed).
Then the manifests are held to the code: every container runs a CLI command that exists with those
options; its environment (the ConfigMap through ``envFrom`` plus its own ``env``) is exactly settings
its service accepts, with values that validate; secrets come from the Secret through
``secretKeyRef`` only; the probes and the Prometheus annotations point at METRICS_PORT, which binds
0.0.0.0 (in a pod the kubelet probes the pod's IP); replicas and rollout strategies are the ones the
services' delivery guarantees allow; images are pinned to the package version.
"""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from quotewatch.core.config import CommonSettings, load_settings
from tests.unit.infra.cli_resolve import resolve_cli
from tests.unit.infra.conftest import REPO
from tests.unit.infra.test_compose import STREAM_SERVICES, THIRD_PARTY_ENV, settings_class

K8S = REPO / "infra" / "k8s"
KUBERNETES_VERSION = "1.34.0"
"""The oldest API the manifests must validate against (current minor releases are 1.34 to 1.37)."""
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SECRET_NAME = "quotewatch-secrets"
REPLICATED = {"book", "labeler", "inference"}
SINGLE = {"ingest", "lake-sink"}
# Values the kubelet fills in (downward API), for building the settings offline.
FIELD_VALUES = {"metadata.name": "book-5d8f7c9b6-x2k4q", "status.podIP": "10.1.2.3"}
# Variables a container may carry that are not settings, and why.
HELPER_ENV = {"inference": {"POD_IP"}}  # expanded into WEBHOOK_URL: each replica's own webhook address


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def config_map() -> dict[str, str]:
    maps = by_kind("ConfigMap")
    assert set(maps) == {"quotewatch-config"}
    return {key: str(value) for key, value in maps["quotewatch-config"]["data"].items()}


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod template, container) of every Deployment and Job."""
    for kind in ("Deployment", "Job"):
        for name, doc in by_kind(kind).items():
            template = doc["spec"]["template"]
            for container in template["spec"]["containers"]:
                yield name, template, container


def environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it, with sample values for references."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"{container['name']}: envFrom only from the ConfigMap"
        assert source["configMapRef"]["name"] == "quotewatch-config"
        env.update(config_map())
    for item in container.get("env", []):
        if "value" in item:
            # $(VAR) expands variables defined before it, as the kubelet does.
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], str(item["value"]))
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = "from-the-secret"
    return env


def secret_fields(cls: type[CommonSettings]) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {name.upper() for name in cls.model_fields if SecretStr in (hints[name], *typing.get_args(hints[name]))}


# -- schema and structure ------------------------------------------------------------------------------


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    checked = 0
    for path, document in manifests():
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{path.name} {document['kind']}/{document['metadata']['name']}: {exc}") from exc
        checked += 1
    assert checked >= 9


def test_a_typo_is_caught_by_the_schema_check() -> None:
    deployment = dict(by_kind("Deployment")["book"])
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_deployments_replicas_and_rollouts() -> None:
    deployments = by_kind("Deployment")
    assert set(deployments) == REPLICATED | SINGLE
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        if name in REPLICATED:
            # One consumer group, several members: the input topics' partitions are split among them.
            assert spec["replicas"] >= 2, name
            assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
            assert by_kind("PodDisruptionBudget")[name]["spec"]["minAvailable"] == 1
        else:
            # One writer: the exchange connection / the lake's chunk files; never two during a rollout.
            assert spec["replicas"] == 1, name
            assert spec["strategy"] == {"type": "Recreate"}, name


# -- held to the code ------------------------------------------------------------------------------------


def test_every_container_runs_a_cli_command_that_exists() -> None:
    seen = set()
    for name, _, container in containers():
        assert "command" not in container, f"{name}: the image's entrypoint is the quotewatch CLI"
        command_path, _ = resolve_cli(list(container["args"]))
        seen.add(name)
        if name in STREAM_SERVICES:
            assert command_path == ["run", name], name
    assert seen == REPLICATED | SINGLE | {"quotewatch-topics"}


def test_every_environment_variable_is_a_setting_of_its_service_and_validates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problems = []
    for name, _, container in containers():
        command_path, _ = resolve_cli(list(container["args"]))
        cls = settings_class(command_path)
        assert cls is not None
        env = environment(container)
        known = {field.upper() for field in cls.model_fields}
        unknown = set(env) - known - THIRD_PARTY_ENV.get(name, set()) - HELPER_ENV.get(name, set())
        if unknown:
            problems.append(f"{name} ({cls.__name__}) does not accept {sorted(unknown)}")
            continue
        for variable in known | {"QUOTEWATCH_CONFIG_FILE"}:
            monkeypatch.delenv(variable, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            load_settings(cls)
        except Exception as exc:  # noqa: BLE001 - report every container
            problems.append(f"{name}: {exc}")
    assert not problems, "\n".join(problems)


def test_secrets_come_from_the_secret_only() -> None:
    assert not by_kind("Secret"), "no Secret in the repository: it is created in the cluster (README)"
    assert not set(config_map()) & secret_fields(CommonSettings)
    referenced = 0
    for name, _, container in containers():
        command_path, _ = resolve_cli(list(container["args"]))
        cls = settings_class(command_path)
        assert cls is not None
        secret_like = secret_fields(cls) | {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"}
        for item in container.get("env", []):
            if item["name"] in secret_like:
                assert "value" not in item, f"{name}: {item['name']} is a literal"
                assert item["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME, name
                referenced += 1
            elif "valueFrom" in item:
                assert "secretKeyRef" not in item["valueFrom"], f"{name}: {item['name']} is no secret setting"
    assert referenced >= 10


def test_probes_and_prometheus_annotations_point_at_the_metrics_port() -> None:
    for name, template, container in containers():
        if name not in STREAM_SERVICES:
            continue
        env = environment(container)
        port = int(env["METRICS_PORT"])
        assert port == STREAM_SERVICES[name], f"{name}: the config default and the compose file use {port}"
        assert env["METRICS_HOST"] == "0.0.0.0", f"{name}: the kubelet probes the pod IP, not loopback"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "metrics"}, f"{name} {probe}"
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(port), name
        assert annotations["prometheus.io/path"] == "/metrics", name


def test_replicas_have_their_own_instance_id_and_webhook_address() -> None:
    for name, _, container in containers():
        if name not in REPLICATED:
            continue
        items = {item["name"]: item for item in container["env"]}
        # A distinct transactional id per replica (the pod name); the group is the same.
        assert items["INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
        if name == "inference":
            env = environment(container)
            assert env["WEBHOOK_URL"] == f"http://{FIELD_VALUES['status.podIP']}:8091/mlflow-webhook"
            assert env["WEBHOOK_HOST"] == "0.0.0.0"


def test_images_are_pinned_to_the_package_version_and_run_unprivileged() -> None:
    for name, template, container in containers():
        assert container["image"] == f"quotewatch:{VERSION}", name
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert "memory" in container["resources"]["limits"], name
