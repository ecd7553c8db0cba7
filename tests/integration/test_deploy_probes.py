"""The paths the Kubernetes probes of docker/k8s/ ask are Triton's own: on a real, ready server each answers 200,
and the readiness path is about one model (another name is not ready). Triton 2.51 here; the image runs 2.64,
where the readiness path also turns false while the router has a dead stub (not checked here: docker/README.md)."""

from __future__ import annotations

import urllib.error
import urllib.request

import yaml

from tierserve.tools.paths import PROJECT_ROOT
from tierserve.tools.server import TritonServer

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _probe_paths() -> dict[str, str]:
    manifest = PROJECT_ROOT / "docker" / "k8s" / "tierserve-deployment.yaml"
    (deployment,) = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc and doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {probe: container[probe]["httpGet"]["path"] for probe in PROBES}


def _status(triton: TritonServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{triton.http_url}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_every_probe_path_answers_200_on_a_ready_server(triton: TritonServer):
    triton.wait_ready(timeout_s=60)  # a test before may have had the supervisor restart it
    assert {probe: _status(triton, path) for probe, path in _probe_paths().items()} == dict.fromkeys(PROBES, 200)


def test_the_readiness_path_is_about_its_model(triton: TritonServer):
    path = _probe_paths()["readinessProbe"]
    assert path.startswith("/v2/models/") and path.endswith("/ready")
    assert _status(triton, path.replace("/v2/models/", "/v2/models/no_such_model_", 1)) != 200
