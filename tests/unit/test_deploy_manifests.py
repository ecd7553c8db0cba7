"""The deployment files in docker/, checked offline: every Kubernetes manifest against the API schemas that
kubernetes-validate ships, the compose files against the Compose Specification schema that check-jsonschema
vendors, nginx.conf as the project's balancer writes it for the compose replicas (and `nginx -t` on it), and
the facts that tie them to the server: ports, probe paths, the pinned
image, environment names, Redis and the replicas, the HPA's metric. No Docker engine or cluster is needed, and
none of it is run here (docker/README.md says what that leaves unchecked)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tierserve.policy import Policy
from tierserve.state_store import STATE_ENV
from tierserve.tier_keys import TIER_KEYS_ENV
from tierserve.tools import balancer, cli
from tierserve.tools.balancer import BalancerSettings, Nginx, Replica
from tierserve.tools.paths import ADMIN_KEY_ENV, DEFAULT_REPOSITORY, PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
K8S = DOCKER / "k8s"
COMPOSE_FILES = (DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml")
# nginx.conf's pid, logs and temporary files: in the nginx image, access.log and error.log there lead to stdout and
# stderr, and compose mounts a tmpfs at tmp/
NGINX_PREFIX = "/var/log/nginx"
# The release docker/README.md justifies: the fixes of every Triton security bulletin up to September 2026 (26.07
# on) and model readiness that reflects Python stub health (25.12 on).
RELEASE = "26.11"
PINNED_BASE = f"nvcr.io/nvidia/tritonserver:{RELEASE}-py3"
IMAGE = f"tierserve:{metadata.version('tierserve')}-ngc{RELEASE}"
# A release of NGC's Triton named by an image (nvcr.io/...:26.11-py3-sdk), a tierserve tag (-ngc26.11) or in prose
RELEASE_NAMED = re.compile(r"nvcr\.io/nvidia/tritonserver:(\d+\.\d+)|-ngc(\d+\.\d+)\b|NGC (?:Triton )?(\d+\.\d+) image")
# The oldest Kubernetes the manifests are meant for, and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file, resource) for every resource of the files the kustomization applies."""
    return [(name, doc) for name in _kustomization()["resources"] for doc in _documents(K8S / name)]


def _resource(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in _manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in docker/k8s, found {len(found)}"
    return found[0]


def _container(kind: str, name: str) -> dict[str, Any]:
    (container,) = _resource(kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _server_defaults() -> Any:
    """The arguments `tierserve serve` runs with when given none (its ports), read from the CLI itself."""
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_serve", lambda args: seen.append(args) or 0)
        assert cli.main(["serve"]) == 0
    return seen[0]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container["env"]}


def _model_config(model: str) -> mc.ModelConfig:
    return text_format.Parse((DEFAULT_REPOSITORY / model / "config.pbtxt").read_text(), mc.ModelConfig())


# --- schemas -----------------------------------------------------------------------------------------------


def test_the_kustomization_applies_every_manifest():
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(_kustomization()["resources"]) == sorted(manifests)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_matches_the_kubernetes_api(version: str):
    errors = []
    for name, resource in _manifests():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            errors.append(f"{name}: {resource['kind']} {resource['metadata']['name']}: {error}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_refuses_a_misspelled_field():
    deployment = copy.deepcopy(_resource("Deployment", "tierserve"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the Compose Specification schema it vendors (offline)."""
    command = [Path(sys.executable).with_name("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", path]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_files_match_the_compose_specification(path: Path):
    result = _check_compose(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_check_refuses_a_misspelled_key(tmp_path: Path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((DOCKER / "compose.yaml").read_text().replace("shm_size:", "shm_sise:"))
    result = _check_compose(broken)
    assert result.returncode == 1 and "shm_sise" in result.stdout


def _compose_replicas() -> list[Replica]:
    """The tierserve containers of compose.yaml, by the names compose gives them (PROJECT-SERVICE-N), which
    Docker's DNS answers, on the server's ports."""
    compose, defaults = _compose(), _server_defaults()
    count = compose["services"]["tierserve"]["deploy"]["replicas"]
    names = [f"{compose['name']}-tierserve-{i}" for i in range(1, count + 1)]
    return [Replica(name=n, host=n, http_port=defaults.http_port, grpc_port=defaults.grpc_port) for n in names]


def test_the_load_balancer_is_the_projects_balancer_for_the_compose_replicas(capsys: pytest.CaptureFixture[str]):
    """docker/nginx.conf is what `python -m tierserve.tools.balancer` (docker/README.md) writes for them."""
    replicas = [f"--replica={r.name}={r.host}:{r.http_port}:{r.grpc_port}" for r in _compose_replicas()]
    assert balancer.main([*replicas, "--prefix", NGINX_PREFIX]) == 0
    assert (DOCKER / "nginx.conf").read_text() == capsys.readouterr().out, "regenerate docker/nginx.conf"
    assert _compose()["services"]["lb"]["tmpfs"] == [f"{NGINX_PREFIX}/tmp"]  # its temporary files' folder


def test_nginx_accepts_the_load_balancers_configuration(tmp_path: Path):
    if not balancer.NGINX.exists():
        pytest.skip(f"no {balancer.NGINX} (tools/bootstrap.sh installs Debian's nginx)")
    # the same configuration with addresses nginx can look up here: only Docker's DNS knows the container names
    replicas = [r.model_copy(update={"host": "127.0.0.1"}) for r in _compose_replicas()]
    defaults = _server_defaults()
    Nginx(replicas, BalancerSettings(http_port=defaults.http_port, grpc_port=defaults.grpc_port), tmp_path).check()


# --- facts that tie the files to the server ----------------------------------------------------------------


def test_the_image_is_built_on_the_pinned_release_and_tagged_with_it():
    assert [arguments for instruction, arguments in _dockerfile_instructions() if instruction == "FROM"] == [
        PINNED_BASE
    ]
    assert _compose()["services"]["tierserve"]["image"] == IMAGE
    assert _container("Deployment", "tierserve")["image"] == IMAGE


def test_every_file_names_the_pinned_release():
    """The SDK image for perf_analyzer, image tags in commands and the prose agree with the FROM line: moving the pin
    cannot leave the old release in the instructions."""
    texts = {
        path.relative_to(PROJECT_ROOT): path.read_text()
        for path in [PROJECT_ROOT / "README.md", *DOCKER.rglob("*")]
        if path.is_file() and path.suffix in {".md", ".yaml", ".yml", ".sh", ""}
    }
    named = {(str(path), "".join(found)) for path, text in texts.items() for found in RELEASE_NAMED.findall(text)}
    assert {path for path, _ in named} >= {"README.md", "docker/README.md", "docker/Dockerfile", "docker/compose.yaml"}
    assert {(path, found) for path, found in named if found != RELEASE} == set()


def test_ports_are_the_servers():
    defaults = _server_defaults()
    ports = {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}
    (exposed,) = [arguments for instruction, arguments in _dockerfile_instructions() if instruction == "EXPOSE"]
    assert sorted(map(int, exposed.split())) == sorted(ports.values())

    container = _container("Deployment", "tierserve")
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == ports
    service = _resource("Service", "tierserve")["spec"]["ports"]
    assert {port["name"]: (port["port"], port["targetPort"]) for port in service} == {
        "http": (ports["http"], "http"),
        "grpc": (ports["grpc"], "grpc"),
    }
    annotations = _resource("Deployment", "tierserve")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])

    compose = _compose()["services"]
    assert sorted(map(int, compose["tierserve"]["expose"])) == sorted(ports.values())
    published = {int(mapping.rsplit(":", 2)[-2]): int(mapping.rsplit(":", 1)[-1]) for mapping in compose["lb"]["ports"]}
    assert published == {ports["http"]: ports["http"], ports["grpc"]: ports["grpc"]}
    nginx = (DOCKER / "nginx.conf").read_text()
    assert sorted(int(port) for port in re.findall(r"^\s*listen [\d.]+:(\d+)", nginx, re.M)) == sorted(
        published.values()
    )


def test_probes_ask_triton_about_the_model_behind_digits():
    """Readiness is the router's: `digits` is an ensemble whose one step is the router, a Python model, and
    only a Python model's readiness reflects its stubs (Triton 2.64); startup waits for every model, liveness
    only for the server to answer."""
    digits = _model_config("digits")
    (step,) = digits.ensemble_scheduling.step
    assert digits.platform == "ensemble" and _model_config(step.model_name).backend == "python"
    readiness = f"/v2/models/{step.model_name}/ready"

    container = _container("Deployment", "tierserve")
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": readiness, "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}

    (healthcheck,) = [
        arguments for instruction, arguments in _dockerfile_instructions() if instruction == "HEALTHCHECK"
    ]
    http_port = _server_defaults().http_port
    assert f"http://127.0.0.1:{http_port}{readiness}'" in healthcheck
    assert "healthcheck" not in _compose()["services"]["tierserve"]  # the image's own, defined once


def test_replicas_share_state_in_redis():
    compose = _compose()["services"]
    assert compose["tierserve"]["deploy"]["replicas"] >= 2
    redis_port = 6379
    assert compose["tierserve"]["environment"][STATE_ENV] == f"redis://redis:{redis_port}/0"
    assert compose["tierserve"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert compose["redis"]["image"].startswith("redis:")

    hpa = _resource("HorizontalPodAutoscaler", "tierserve")["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    deployment = _resource("Deployment", "tierserve")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count; a re-apply must not reset it
    pdb = _resource("PodDisruptionBudget", "tierserve")["spec"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]

    redis_service = _resource("Service", "redis")
    (port,) = redis_service["spec"]["ports"]
    assert port["port"] == redis_port
    assert _env(_container("Deployment", "tierserve"))[STATE_ENV]["value"] == (
        f"redis://{redis_service['metadata']['name']}:{redis_port}/0"
    )
    redis_pods = _resource("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_pods.items()
    assert _container("StatefulSet", "redis")["image"] == compose["redis"]["image"]


def test_selectors_find_the_tierserve_pods():
    deployment = _resource("Deployment", "tierserve")
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pods.items()
    assert _resource("Service", "tierserve")["spec"]["selector"].items() <= pods.items()
    assert _resource("PodDisruptionBudget", "tierserve")["spec"]["selector"]["matchLabels"].items() <= pods.items()
    (allowed,) = _resource("NetworkPolicy", "redis-from-tierserve-only")["spec"]["ingress"]
    assert allowed["from"][0]["podSelector"]["matchLabels"].items() <= pods.items()
    target = _resource("HorizontalPodAutoscaler", "tierserve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_every_replica_gets_the_same_keys():
    """One admin key and one tier keys file for all replicas, under the names the server reads."""
    env = _env(_container("Deployment", "tierserve"))
    assert env[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"]["name"] == "tierserve-keys"
    pod = _resource("Deployment", "tierserve")["spec"]["template"]["spec"]
    (keys_volume,) = [volume for volume in pod["volumes"] if "secret" in volume]
    (mount,) = [m for m in _container("Deployment", "tierserve")["volumeMounts"] if m["name"] == keys_volume["name"]]
    (item,) = keys_volume["secret"]["items"]
    assert env[TIER_KEYS_ENV]["value"] == f"{mount['mountPath']}/{item['path']}"

    compose = _compose()
    environment = compose["services"]["tierserve"]["environment"]
    assert environment[ADMIN_KEY_ENV].startswith("${" + ADMIN_KEY_ENV + ":?")  # refused when unset
    (secret,) = compose["services"]["tierserve"]["secrets"]
    assert environment[TIER_KEYS_ENV] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["file"].startswith("${TIERSERVE_TIER_KEYS_FILE:?")


def test_the_hpa_scales_on_the_routers_load_gauge_before_shedding():
    (metric,) = _resource("HorizontalPodAutoscaler", "tierserve")["spec"]["metrics"]
    name, target = metric["pods"]["metric"]["name"], metric["pods"]["target"]
    assert metric["type"] == "Pods" and target["type"] == "AverageValue"
    exported = (PROJECT_ROOT / "python_backends" / "triton_router_metrics.py").read_text()
    assert f'"{name}"' in exported  # a gauge the router exports

    (rule,) = yaml.safe_load(_resource("ConfigMap", "adapter-config")["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}

    shedding = Policy.load(DEFAULT_REPOSITORY / "router" / "policy.yaml").shedding
    assert float(target["averageValue"]) <= shedding.degrade_best_effort_at_ms < shedding.shed_best_effort_at_ms


def test_compose_wires_prometheus_and_grafana_to_their_files():
    """The folders compose mounts hold what each image reads where it reads it: Prometheus scrapes every
    tierserve replica's metrics port, Grafana's provider loads the mounted dashboards from Prometheus."""
    compose = _compose()["services"]
    mounts = {
        service: dict(volume.removesuffix(":ro").split(":") for volume in compose[service]["volumes"])
        for service in ("prometheus", "grafana")
    }
    assert mounts["prometheus"]["./prometheus"] == "/etc/prometheus"  # the image reads prometheus.yml there
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        (name, sd["port"])
        for job in prometheus["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    assert ("tierserve", _server_defaults().metrics_port) in scraped  # one target per replica (Docker's DNS)
    assert all(list((DOCKER / "prometheus").glob(pattern)) for pattern in prometheus["rule_files"])

    assert mounts["grafana"]["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = DOCKER / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tierserve.yml").read_text())["providers"]
    assert mounts["grafana"]["./grafana/dashboards"] == provider["options"]["path"]
    assert list((DOCKER / "grafana" / "dashboards").glob("*.json"))
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    prometheus_port = compose["prometheus"]["ports"][0].rsplit(":", 1)[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    assert compose["grafana"]["depends_on"] == ["prometheus"]
