"""The cluster's deployment files: docker/compose.cluster.yml and deploy/kubernetes/, checked offline.

Every Kubernetes manifest is validated against the schemas bundled in kubernetes-validate, strictly (an
unknown field, a typo in a probe, fails) for a pinned Kubernetes version. KEDA's ScaledObject and the
Kustomization have no bundled schema: their structure is asserted here. The compose file is parsed and
its structure asserted. Every ``UPSCALE_*`` variable the files name must be a field of
:class:`~upscale_server.config.Settings`, and the settings each file gives a node must parse.

No cluster, no Docker engine and no network: a test that tried to connect anywhere fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from upscale_server.config import Settings

#: Manifests must be valid for this Kubernetes release and every later one; 1.30 is the oldest the
#: pinned kubernetes-validate range (>=1.30) is sure to bundle.
KUBERNETES_VERSION = "1.30"

KUBE_DIR = REPO / "deploy" / "kubernetes"
COMPOSE = REPO / "docker" / "compose.cluster.yml"
SINGLE_COMPOSE = REPO / "docker" / "compose.yml"
ENV_EXAMPLE = REPO / "docker" / "cluster.env.example"
NGINX_CONF = REPO / "docker" / "nginx.cluster.conf"
SEAWEEDFS_ENTRYPOINT = REPO / "docker" / "seaweedfs-entrypoint.sh"
SCALING_DOC = REPO / "docs" / "scaling.md"

#: Kinds without a schema in kubernetes-validate, checked structurally below instead.
NO_BUNDLED_SCHEMA = {("keda.sh/v1alpha1", "ScaledObject"), ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
#: Files kept out of kustomization.yaml on purpose: a Secret of placeholders, and the optional autoscalers.
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "secret.example.yaml", "keda-scaledobject.yaml", "api-hpa.yaml"}

SETTINGS_VARIABLES = frozenset(f"UPSCALE_{name.upper()}" for name in Settings.model_fields)
UPSCALE_NAME = re.compile(r"\bUPSCALE_[A-Z0-9_]*[A-Z0-9]\b")
#: ``${UPSCALE_BIND:-...}`` in a compose file: a variable of the host's shell, read by Compose itself.
COMPOSE_INTERPOLATION = re.compile(r"\$\{(UPSCALE_[A-Z0-9_]+)")
DEPENDENT_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Schemas are bundled and nothing here needs a network: make any attempt fail loudly."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"test_deploy tried to use the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --------------------------------------------------------------------------- loading


def load_all(path: Path) -> list[dict[str, Any]]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    assert documents, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in documents), path
    return documents


def manifest_files() -> list[Path]:
    files = sorted(KUBE_DIR.glob("*.yaml"))
    assert files, f"no manifests in {KUBE_DIR}"
    return files


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        for doc in load_all(path):
            key = (doc["kind"], doc.get("metadata", {}).get("name", path.name))
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    container: dict[str, Any] = containers[0]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's port, resolving a named one to its number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"no container port named {port}"
    return int(numbers[0])


def workloads(manifests: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for (kind, _), doc in manifests.items() if kind in ("Deployment", "StatefulSet")]


def compose_command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), "exec form: no shell between Docker and the process"
    return [str(part) for part in command]


def api_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if "command" in service and compose_command(service)[:1] == ["serve"]
    }


def worker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if "command" in service and compose_command(service)[:1] == ["worker"]
    }


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def env_file_variables(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file, as Compose reads them (comments and blank lines skipped, one pair of
    quotes around a value removed)."""
    variables: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, value = line.partition("=")
        assert separator, f"not NAME=value: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        variables[name.strip()] = value
    return variables


def settings_from(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process with exactly these ``UPSCALE_*`` variables builds."""
    for name in list(os.environ):
        if name.startswith("UPSCALE_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings()


# --------------------------------------------------------------------------- Kubernetes: schemas


def test_every_manifest_is_valid_for_the_pinned_kubernetes_version() -> None:
    checked = 0
    for path in manifest_files():
        for doc in load_all(path):
            if (doc["apiVersion"], doc["kind"]) in NO_BUNDLED_SCHEMA:
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(part) for part in error.path)
                pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                pytest.fail(f"{path.name}: {error.message}")
            checked += 1
    assert checked >= 7


def test_strict_validation_rejects_a_misspelt_field(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The check above has teeth: a typo that kubectl would ignore is an error here."""
    broken = json.loads(json.dumps(manifests[("Deployment", "upscale-worker")]))
    container = only_container(broken)
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_manifests_are_namespace_free(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), doc in manifests.items():
        assert "namespace" not in doc.get("metadata", {}), f"{kind}/{name}: the user chooses the namespace"
        assert kind != "Namespace"


def test_kustomization_lists_the_core_files() -> None:
    (kustomization,) = load_all(KUBE_DIR / "kustomization.yaml")
    assert (kustomization["apiVersion"], kustomization["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert "namespace" not in kustomization
    expected = {path.name for path in manifest_files()} - NOT_IN_KUSTOMIZATION
    assert sorted(kustomization["resources"]) == sorted(expected)


# --------------------------------------------------------------------------- Kubernetes: the workloads


def test_api_deployment(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = manifests[("Deployment", "upscale-api")]
    assert deployment["spec"]["replicas"] == 2
    container = only_container(deployment)
    assert container["args"][:3] == ["serve", "--role", "api"]
    assert flag(container["args"], "--host") == "0.0.0.0"
    assert flag(container["args"], "--port") == "8000"
    assert container_port(container, container["readinessProbe"]["httpGet"]["port"]) == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container_port(container, container["livenessProbe"]["httpGet"]["port"]) == 8000
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    resources = container["resources"]
    assert "cpu" in resources["requests"] and "memory" in resources["requests"]
    assert not any("gpu" in key for key in {**resources["requests"], **resources.get("limits", {})})
    assert container["image"].endswith(":cpu"), "API nodes load no model: the CPU image"


def test_worker_deployment(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = manifests[("Deployment", "upscale-worker")]
    container = only_container(deployment)
    assert container["args"][0] == "worker"
    assert flag(container["args"], "--port") == "8001"
    assert flag(container["args"], "--device") in ("cuda", "cuda:0"), "the pod sees its one GPU as cuda:0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert container[probe]["httpGet"]["path"] == path
        assert container_port(container, container[probe]["httpGet"]["port"]) == 8001
    assert container["image"].endswith(":cuda")
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    dead_seconds = Settings.model_fields["worker_dead_seconds"].default
    assert grace >= 120 and grace > dead_seconds, "a stopping worker finishes the task it runs"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout needs no spare GPU"


def test_pods_running_the_server_get_no_service_links(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Service links inject ``<SERVICE>_PORT=tcp://...``: for a Service named ``upscale`` that is UPSCALE_PORT,
    which the server would read as its port and refuse to start."""
    for name in ("upscale-api", "upscale-worker"):
        assert pod_spec(manifests[("Deployment", name)])["enableServiceLinks"] is False, name
    for kind, name in manifests:
        if kind == "Service":
            assert name.replace("-", "_").upper() != "UPSCALE", "a Service named upscale shadows UPSCALE_PORT"


def test_pods_run_as_non_root(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for workload in workloads(manifests):
        security = pod_spec(workload)["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, workload["metadata"]["name"]
        assert only_container(workload)["securityContext"]["allowPrivilegeEscalation"] is False


def test_services_select_their_pods_on_the_right_ports(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for service_name, workload_key in (
        ("upscale-api", ("Deployment", "upscale-api")),
        ("redis", ("StatefulSet", "redis")),
    ):
        service = manifests[("Service", service_name)]
        workload = manifests[workload_key]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), service_name
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), service_name
        container = only_container(workload)
        for port in service["spec"]["ports"]:
            assert container_port(container, port["targetPort"]) == port["port"], service_name


def test_workload_selectors_are_disjoint(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Two workloads whose selectors match each other's pods would fight over them."""
    all_workloads = workloads(manifests)
    for workload in all_workloads:
        selector = workload["spec"]["selector"]["matchLabels"].items()
        matched = [w for w in all_workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matched == [workload], workload["metadata"]["name"]


def test_redis_statefulset(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    statefulset = manifests[("StatefulSet", "redis")]
    assert statefulset["spec"]["replicas"] == 1
    container = only_container(statefulset)
    repository, _, tag = container["image"].partition(":")
    assert repository in ("redis", "valkey/valkey") and int(tag.split(".")[0]) >= 7, "lag needs Redis 7+"
    args = container["args"]
    assert flag(args, "--appendonly") == "yes"
    assert flag(args, "--appendfsync") in ("always", "everysec")
    assert flag(args, "--maxmemory-policy") == "noeviction"
    assert "--maxmemory" in args, "noeviction only acts under a maxmemory limit"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == flag(args, "--dir"), "the AOF lives on the persistent volume"
    assert claim["spec"]["resources"]["requests"]["storage"]


def test_redis_url_points_at_the_redis_service(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = manifests[("Service", "redis")]
    port = service["spec"]["ports"][0]["port"]
    secret_keys = set(manifests[("Secret", "upscale-secrets")]["stringData"])
    for name in ("upscale-api", "upscale-worker"):
        container = only_container(manifests[("Deployment", name)])
        env = [item["name"] for item in container["env"]]
        url = container["env"][env.index("UPSCALE_REDIS_URL")]["value"]
        assert re.fullmatch(rf"redis://:\$\(REDIS_PASSWORD\)@redis:{port}/\d+", url), url
        # $(VAR) expands only a variable defined before it: by envFrom, or earlier in env.
        assert {"secretRef": {"name": "upscale-secrets"}} in container["envFrom"]
        defined_before = secret_keys | set(env[: env.index("UPSCALE_REDIS_URL")])
        assert set(DEPENDENT_VARIABLE.findall(url)) <= defined_before, name


def test_secret_example_holds_only_placeholders(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = manifests[("Secret", "upscale-secrets")]
    assert "data" not in secret, "stringData: readable placeholders, no base64"
    values = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "UPSCALE_API_KEYS", "REDIS_PASSWORD"} <= set(values)
    for name, value in values.items():
        assert "replace" in value, f"{name} must be an obvious placeholder"
    assert isinstance(json.loads(values["UPSCALE_API_KEYS"]), list), "API keys are a JSON list"


def test_references_resolve(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Every ConfigMap and Secret a pod reads exists, and every key it names is in it."""
    for workload in workloads(manifests):
        container = only_container(workload)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert ("ConfigMap", source["configMapRef"]["name"]) in manifests
            if "secretRef" in source:
                assert ("Secret", source["secretRef"]["name"]) in manifests
        for item in container.get("env", []):
            reference = item.get("valueFrom", {})
            if "secretKeyRef" in reference:
                secret = manifests[("Secret", reference["secretKeyRef"]["name"])]
                assert reference["secretKeyRef"]["key"] in secret["stringData"]
            if "configMapKeyRef" in reference:
                config_map = manifests[("ConfigMap", reference["configMapKeyRef"]["name"])]
                assert reference["configMapKeyRef"]["key"] in config_map["data"]


def container_environment(manifests: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, str]:
    """The environment the container of ``deployment`` starts with, $(VAR) references expanded."""
    container = only_container(manifests[("Deployment", deployment)])
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(manifests[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            environment.update(manifests[("Secret", source["secretRef"]["name"])]["stringData"])
    for item in container.get("env", []):
        if "value" in item:
            environment[item["name"]] = DEPENDENT_VARIABLE.sub(lambda m: environment[m.group(1)], item["value"])
        elif "fieldRef" in item["valueFrom"]:
            environment[item["name"]] = f"{deployment}-6d4cf56db6-x2x7k"  # what metadata.name gives
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            environment[item["name"]] = manifests[("Secret", ref["name"])]["stringData"][ref["key"]]
    return environment


@pytest.mark.parametrize("deployment", ["upscale-api", "upscale-worker"])
def test_kubernetes_settings_parse(
    manifests: dict[tuple[str, str], dict[str, Any]], deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = container_environment(manifests, deployment)
    upscale = {name: value for name, value in environment.items() if name.startswith("UPSCALE_")}
    assert set(upscale) <= SETTINGS_VARIABLES, set(upscale) - SETTINGS_VARIABLES
    settings = settings_from(upscale, monkeypatch)
    assert settings.redis_url == "redis://:replace-with-a-random-password@redis:6379/0"
    assert settings.s3_bucket and settings.node_id
    assert settings.redis_prefix == Settings.model_fields["redis_prefix"].default
    assert environment["AWS_ACCESS_KEY_ID"] and environment["AWS_SECRET_ACCESS_KEY"]


# --------------------------------------------------------------------------- Kubernetes: KEDA (optional)


def test_keda_scaled_object(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    path = KUBE_DIR / "keda-scaledobject.yaml"
    assert "OPTIONAL" in path.read_text(encoding="utf-8").splitlines()[0], "the file says it is optional"
    (scaled,) = load_all(path)
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert ("Deployment", target["name"]) in manifests
    assert only_container(manifests[("Deployment", target["name"])])["args"][0] == "worker"
    assert isinstance(spec["minReplicaCount"], int) and isinstance(spec["maxReplicaCount"], int)
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "trigger metadata is a map of strings"
    prefix = manifests[("ConfigMap", "upscale-config")]["data"]["UPSCALE_REDIS_PREFIX"]
    assert metadata["stream"] == prefix + "jobs"
    assert metadata["consumerGroup"] == "workers"
    assert int(metadata["lagCount"]) >= 1
    assert int(metadata["activationLagCount"]) >= 0
    assert "pendingEntriesCount" not in metadata and "streamLength" not in metadata, "lagCount is the metric"
    host, _, port = metadata["address"].rpartition(":")
    assert host.startswith("redis.") and host.endswith(".svc.cluster.local"), "KEDA connects from its namespace"
    assert int(port) == manifests[("Service", "redis")]["spec"]["ports"][0]["port"]
    assert metadata["passwordFromEnv"] in container_environment(manifests, target["name"])


# --------------------------------------------------------------------------- compose


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "seaweedfs", "lb"} <= set(services)
    apis = api_services(compose)
    assert sum(service.get("deploy", {}).get("replicas", 1) for service in apis.values()) >= 2, "two API nodes"
    assert worker_services(compose), "at least one worker"


def test_compose_api_nodes(compose: dict[str, Any]) -> None:
    for name, service in api_services(compose).items():
        command = compose_command(service)
        assert command[:3] == ["serve", "--role", "api"], name
        assert flag(command, "--host") == "0.0.0.0" and flag(command, "--port") == "8000"
        assert "devices" not in str(service.get("deploy", {})), "API nodes need no GPU"
        assert "ports" not in service, "clients come in through the load balancer"
        assert service["image"] == "upscale-server:cpu"
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cpu"}
        assert any("/health" in part for part in service["healthcheck"]["test"])


def test_compose_workers(compose: dict[str, Any]) -> None:
    single = yaml.safe_load(SINGLE_COMPOSE.read_text(encoding="utf-8"))["services"]["upscale"]
    for service in worker_services(compose).values():
        command = compose_command(service)
        assert command[0] == "worker"
        assert flag(command, "--port") == "8001"
        assert re.fullmatch(r"cuda(:\d+)?", flag(command, "--device"))
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device.get("device_ids", [None])) == 1 or device.get("count") == 1, "one GPU per worker"
        assert service["image"] == single["image"] == "upscale-server:cuda"
        assert service["build"] == single["build"]
        assert any("8001/health" in part for part in service["healthcheck"]["test"]), "the worker's own port"
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace >= 120, "a stopping worker finishes its tasks"


def test_compose_redis_is_durable(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    repository, _, tag = redis["image"].partition(":")
    assert repository in ("redis", "valkey/valkey") and int(tag.split(".")[0]) >= 7
    command = compose_command(redis)
    assert command[0] == "redis-server"
    assert flag(command, "--appendonly") == "yes"
    assert flag(command, "--appendfsync") in ("always", "everysec")
    assert flag(command, "--maxmemory-policy") == "noeviction"
    assert "--maxmemory" in command
    volume, target = redis["volumes"][0].split(":")[:2]
    assert target == flag(command, "--dir") and volume in compose["volumes"], "the AOF lives on a named volume"
    assert any("PONG" in part for part in redis["healthcheck"]["test"])
    assert "ports" not in redis


def test_compose_seaweedfs(compose: dict[str, Any]) -> None:
    seaweedfs = compose["services"]["seaweedfs"]
    assert seaweedfs["image"].startswith("chrislusf/seaweedfs:") and not seaweedfs["image"].endswith(":latest")
    command = compose_command(seaweedfs)
    assert command[1] in ("mini", "server")
    config = next(part.partition("=")[2] for part in command if part.startswith("-s3.config="))
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in seaweedfs["volumes"]}
    (entrypoint,) = seaweedfs["entrypoint"]
    assert (COMPOSE.parent / mounts[entrypoint]).resolve() == SEAWEEDFS_ENTRYPOINT
    assert config == "/etc/seaweedfs/s3.json", "where seaweedfs-entrypoint.sh writes it"
    bucket = seaweedfs["environment"]["UPSCALE_S3_BUCKET"]
    assert seaweedfs["environment"]["S3_BUCKET"] == bucket, "the bucket mini creates is the one granted"
    for name, service in {**api_services(compose), **worker_services(compose)}.items():
        assert service["environment"]["UPSCALE_S3_BUCKET"] == bucket, name
        assert service["environment"]["UPSCALE_S3_ENDPOINT"] == "http://seaweedfs:8333", name
        assert service["depends_on"]["seaweedfs"]["condition"] == "service_healthy", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["environment"]["UPSCALE_REDIS_URL"].startswith("redis://redis:6379/"), name
    assert "ports" not in seaweedfs


def test_compose_load_balancer(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    assert lb["image"].startswith("nginx:")
    mounted = {volume.split(":")[1]: (COMPOSE.parent / volume.split(":")[0]).resolve() for volume in lb["volumes"]}
    assert mounted["/etc/nginx/conf.d/default.conf"] == NGINX_CONF
    assert [str(port).rsplit(":", 1)[1] for port in lb["ports"]] == ["80"]
    conf = NGINX_CONF.read_text(encoding="utf-8")
    (api,) = api_services(compose)
    assert re.search(rf"server\s+{api}:8000\b", conf), "nginx proxies to the api service"
    assert "proxy_set_header Upgrade $http_upgrade;" in conf, "WebSocket upgrades pass"
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    assert "proxy_http_version 1.1;" in conf
    body_limit = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert body_limit and int(body_limit.group(1)) * 2**20 >= Settings.model_fields["max_body_bytes"].default
    directives = re.sub(r"#.*", "", conf)
    assert not re.search(r"^\s*(ip_hash|hash|sticky)\b", directives, re.MULTILINE), "any node serves any request"


def test_compose_secrets_come_from_the_env_file(compose: dict[str, Any]) -> None:
    secrets = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "UPSCALE_API_KEYS"}
    for name, service in compose["services"].items():
        assert not secrets & set(service.get("environment", {})), f"{name}: secrets inline"
        if name in api_services(compose) or name in worker_services(compose) or name == "seaweedfs":
            assert service["env_file"] == "cluster.env", name
    example = env_file_variables(ENV_EXAMPLE)
    assert secrets <= set(example)
    for name in secrets:
        assert "replace" in example[name], f"{name} must be an obvious placeholder"


@pytest.mark.parametrize("kind", ["api", "worker"])
def test_compose_settings_parse(compose: dict[str, Any], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    services = api_services(compose) if kind == "api" else worker_services(compose)
    for service in services.values():
        environment = {**env_file_variables(ENV_EXAMPLE), **{k: str(v) for k, v in service["environment"].items()}}
        upscale = {name: value for name, value in environment.items() if name.startswith("UPSCALE_")}
        assert set(upscale) <= SETTINGS_VARIABLES, set(upscale) - SETTINGS_VARIABLES
        settings = settings_from(upscale, monkeypatch)
        assert settings.redis_url and settings.s3_bucket and settings.s3_endpoint
        assert settings.api_keys, "the example's keys parse as a JSON list"


# --------------------------------------------------------------------------- every UPSCALE_ name is a setting


def deployment_texts() -> dict[str, str]:
    paths = [*manifest_files(), COMPOSE, ENV_EXAMPLE, NGINX_CONF, SEAWEEDFS_ENTRYPOINT, SCALING_DOC]
    return {str(path.relative_to(REPO)): path.read_text(encoding="utf-8") for path in paths}


def test_every_upscale_variable_named_is_a_setting() -> None:
    """Settings ignore an unknown UPSCALE_ variable silently, so a misspelt one would just not apply."""
    interpolated = set()
    for path in (COMPOSE, SINGLE_COMPOSE):
        interpolated |= set(COMPOSE_INTERPOLATION.findall(path.read_text(encoding="utf-8")))
    host_only = interpolated - SETTINGS_VARIABLES
    assert host_only <= {"UPSCALE_BIND", "UPSCALE_HOST_PORT"}, "the host-side variables Compose reads itself"
    unknown = {}
    for name, text in deployment_texts().items():
        names = set(UPSCALE_NAME.findall(text)) - SETTINGS_VARIABLES - host_only
        if names:
            unknown[name] = sorted(names)
    assert not unknown, f"not fields of upscale_server.config.Settings: {unknown}"


def test_scaling_doc_links_configuration_and_benchmarks() -> None:
    text = SCALING_DOC.read_text(encoding="utf-8")
    assert "configuration.md" in text and "benchmarks.md" in text
    assert re.search(r"^#+ Benchmarks", text, re.MULTILINE)
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (SCALING_DOC.parent / link).exists(), f"broken link in docs/scaling.md: {link}"


# --------------------------------------------------------------------------- seaweedfs-entrypoint.sh, run


@pytest.fixture
def identity_config(tmp_path: Path) -> Path:
    return tmp_path / "s3.json"


def run_seaweedfs_entrypoint(config: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "S3_IDENTITY_CONFIG": str(config), **variables}
    probe = 'echo "key=${AWS_ACCESS_KEY_ID:-unset} secret=${AWS_SECRET_ACCESS_KEY:-unset} args=$*"'
    return subprocess.run(
        [str(SEAWEEDFS_ENTRYPOINT), "/bin/sh", "-c", probe, "sh", "mini", "-dir=/data"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_seaweedfs_entrypoint_writes_a_bucket_scoped_identity(identity_config: Path) -> None:
    assert os.access(SEAWEEDFS_ENTRYPOINT, os.X_OK), "docker/seaweedfs-entrypoint.sh must be executable"
    result = run_seaweedfs_entrypoint(
        identity_config, AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="s3cr3t/Key+1", UPSCALE_S3_BUCKET="pics"
    )
    assert result.returncode == 0, result.stderr
    # The command runs, exec'd, with its arguments and without the AWS variables (no second, admin identity).
    assert result.stdout.strip() == "key=unset secret=unset args=mini -dir=/data"
    assert stat.S_IMODE(identity_config.stat().st_mode) == 0o600
    (identity,) = json.loads(identity_config.read_text(encoding="utf-8"))["identities"]
    assert identity["credentials"] == [{"accessKey": "AKIDEXAMPLE", "secretKey": "s3cr3t/Key+1"}]
    assert sorted(identity["actions"]) == ["List:pics", "Read:pics", "Tagging:pics", "Write:pics"]
    assert not list(identity_config.parent.glob("*.partial"))


@pytest.mark.parametrize(
    "variables",
    [
        {"AWS_SECRET_ACCESS_KEY": "s", "UPSCALE_S3_BUCKET": "b"},
        {"AWS_ACCESS_KEY_ID": "k", "UPSCALE_S3_BUCKET": "b"},
        {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
        {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": 'a"b', "UPSCALE_S3_BUCKET": "b"},
        {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "a\\b", "UPSCALE_S3_BUCKET": "b"},
        {"AWS_ACCESS_KEY_ID": "k k", "AWS_SECRET_ACCESS_KEY": "s", "UPSCALE_S3_BUCKET": "b"},
    ],
    ids=["no-key", "no-secret", "no-bucket", "quote", "backslash", "space"],
)
def test_seaweedfs_entrypoint_refuses_missing_or_unsafe_values(
    identity_config: Path, variables: dict[str, str]
) -> None:
    result = run_seaweedfs_entrypoint(identity_config, **variables)
    assert result.returncode != 0
    assert result.stderr.strip(), "it says why"
    assert "args=" not in result.stdout, "SeaweedFS is not started"
    assert not identity_config.exists()
