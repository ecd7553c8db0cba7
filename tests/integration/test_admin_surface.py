"""Every state-changing API of the real tritonserver needs the admin key, over HTTP (header tierserve-admin-key)
and gRPC (metadata triton-grpc-protocol-tierserve-admin-key); inference, health, metadata, model config and
statistics stay open. The key reaches neither the stubs' environment nor a plain refusal's retry loop."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tierserve.tier_keys import TIER_KEYS_ENV
from tierserve.tools.model_control import AdminKeyRefused, ModelControl
from tierserve.tools.paths import ADMIN_KEY_ENV
from tierserve.tools.server import ADMIN_HEADER, GRPC_ADMIN_HEADER, TritonServer

# (method, path, body): each admin API over HTTP, harmless with the key (reads, or writes of what is set)
HTTP_ADMIN_CALLS = [
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/logging", None),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/nothing/unregister", {}),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("POST", "/v2/cudasharedmemory/region/nothing/unregister", {}),
]
HTTP_OPEN_CALLS = [
    "/v2",
    "/v2/health/ready",
    "/v2/models/digits_rules",
    "/v2/models/digits_rules/config",
    "/v2/models/stats",
]


def _http(
    server: TritonServer, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{server.http_url}{path}",
        method=method,
        headers=headers or {},
        data=None if body is None else json.dumps(body).encode(),
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize(("method", "path", "body"), HTTP_ADMIN_CALLS)
def test_http_admin_apis_need_the_admin_key(triton: TritonServer, method: str, path: str, body: dict | None):
    for headers in (None, {ADMIN_HEADER: "not-the-key"}, {GRPC_ADMIN_HEADER: triton.admin_key}):
        status, text = _http(triton, method, path, body, headers)
        assert (status, json.loads(text)) == (
            403,
            {"error": "This API is restricted, expecting header 'tierserve-admin-key'"},
        )
    status, _ = _http(triton, method, path, body, {ADMIN_HEADER: triton.admin_key})
    assert status == 200


def test_http_state_changes_are_refused_without_the_key(triton: TritonServer):
    before = _http(triton, "GET", "/v2/logging", headers={ADMIN_HEADER: triton.admin_key})[1]
    changes = [
        ("/v2/logging", {"log_verbose_level": 3}),
        ("/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
        ("/v2/systemsharedmemory/region/x/register", {"key": "/x", "offset": 0, "byte_size": 8}),
        ("/v2/repository/models/digits_rules/unload", {}),
    ]
    for path, body in changes:
        assert _http(triton, "POST", path, body)[0] == 403, path
    assert _http(triton, "GET", "/v2/logging", headers={ADMIN_HEADER: triton.admin_key})[1] == before
    level = {"log_verbose_level": json.loads(before)["log_verbose_level"]}
    status, text = _http(triton, "POST", "/v2/logging", level, {ADMIN_HEADER: triton.admin_key})
    assert status == 200 and json.loads(text) == json.loads(before), "with the key, the same level set again"


@pytest.mark.parametrize("path", HTTP_OPEN_CALLS)
def test_http_read_only_apis_stay_open(triton: TritonServer, path: str):
    assert _http(triton, "GET", path)[0] == 200


GRPC_ADMIN_CALLS: dict[str, Callable[[grpcclient.InferenceServerClient, dict | None], object]] = {
    "repository index": lambda client, headers: client.get_model_repository_index(headers=headers),
    "unload": lambda client, headers: client.unload_model("no_such_model", headers=headers),
    "log settings": lambda client, headers: client.get_log_settings(headers=headers),
    "update log settings": lambda client, headers: client.update_log_settings({}, headers=headers),
    "trace settings": lambda client, headers: client.get_trace_settings(headers=headers),
    "system shm status": lambda client, headers: client.get_system_shared_memory_status(headers=headers),
    "system shm unregister": lambda client, headers: client.unregister_system_shared_memory(headers=headers),
    "cuda shm status": lambda client, headers: client.get_cuda_shared_memory_status(headers=headers),
}


@pytest.mark.parametrize("name", GRPC_ADMIN_CALLS)
def test_grpc_admin_apis_need_the_admin_key_under_its_grpc_name(triton: TritonServer, name: str):
    call = GRPC_ADMIN_CALLS[name]
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        # the HTTP header name does not do over gRPC; and Triton 2.51 refuses with UNAVAILABLE, not a permission code
        for headers in (None, {ADMIN_HEADER: triton.admin_key}, {GRPC_ADMIN_HEADER: "not-the-key"}):
            with pytest.raises(InferenceServerException) as refused:
                call(client, headers)
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            assert refused.value.message() == (
                "This protocol is restricted, expecting header 'triton-grpc-protocol-tierserve-admin-key'"
            )
        try:
            call(client, {GRPC_ADMIN_HEADER: triton.admin_key})
        except InferenceServerException as error:  # past the key: only the unload of a model that is not there
            assert name == "unload" and "restricted" not in (error.message() or ""), error
    finally:
        client.close()


def test_grpc_read_only_apis_stay_open(triton: TritonServer):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert client.is_server_ready() and client.get_server_metadata().version
        assert client.get_model_config("digits_rules", as_json=True)["config"]["name"] == "digits_rules"
        assert client.get_inference_statistics("digits_rules", as_json=True)["model_stats"]
        pixels = grpcclient.InferInput("PIXELS", [1, 8, 8], "FP32")
        pixels.set_data_from_numpy(np.zeros((1, 8, 8), np.float32))
        assert client.infer("digits_rules", [pixels]).as_numpy("PROBS").shape == (1, 10)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_control_sends_the_right_header_per_protocol_and_a_refusal_is_a_permission_error(
    triton: TritonServer, protocol: str
):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    intruder = ModelControl(url, "not-the-key", protocol)
    try:
        with pytest.raises(AdminKeyRefused, match="unload digits_rules: the server refused the admin key") as refused:
            intruder.unload("digits_rules")
        assert ADMIN_HEADER in str(refused.value) and GRPC_ADMIN_HEADER in str(refused.value)
    finally:
        intruder.close()
    control = ModelControl(url, triton.admin_key, protocol)
    try:
        config = control.config("digits_rules")
        control.load_with("digits_rules", config)  # unchanged: Triton keeps the running instance
        assert control.config("digits_rules")["name"] == "digits_rules"
    finally:
        control.close()


def test_stubs_get_the_tier_keys_path_and_never_the_admin_key(triton: TritonServer):
    for pid in triton.stub_pids():
        environment = dict(
            entry.split(b"=", 1) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in entry
        )
        assert environment[TIER_KEYS_ENV.encode()] == str(triton.tier_keys.resolve()).encode()
        assert ADMIN_KEY_ENV.encode() not in environment
        assert triton.admin_key.encode() not in b"".join(environment.values())
