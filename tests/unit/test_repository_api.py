"""The router's reloads over its server's HTTP model repository API: the admin header read from tritonserver's
command line however the flag is written, the running configuration and versions loaded again with it, and
Triton's refusal said, not hidden."""

from __future__ import annotations

import json
import os

import pytest

from tierserve.repository_api import (
    RELOAD_MARK,
    NotLoaded,
    RepositoryApi,
    RepositoryError,
    command_line,
    ready_versions,
    reload_config,
    restricted_header,
)

from .http_stub import http_stub

KEY = ("tierserve-admin-key", "s3cret=with=equals")
FLAG = "--http-restricted-api"


@pytest.mark.parametrize(
    ("argv", "header"),
    [
        (
            ["tritonserver", "--http-restricted-api=model-repository,logging:tierserve-admin-key=s3cret=with=equals"],
            KEY,
        ),
        (
            [
                "tritonserver",
                "--http-restricted-api",
                "logging,model-repository:tierserve-admin-key=s3cret=with=equals",
            ],
            KEY,
        ),
        (
            ["tritonserver", "--http-restricted-api=logging:a=b", "--http-restricted-api=model-repository:c=d"],
            ("c", "d"),
        ),
        (["tritonserver", "--http-restricted-api=logging,trace:a=b"], None),  # the repository API is open
        (["tritonserver", "--grpc-restricted-protocol=model-repository:a=b"], None),  # gRPC's, not HTTP's
        (["tritonserver", "--http-restricted-api=model-repository"], None),  # no key: Triton refuses to start
        (["tritonserver"], None),
    ],
)
def test_the_admin_header_is_read_from_tritonservers_command_line(argv: list[str], header):
    assert restricted_header(argv) == header


def test_a_processs_command_line_is_read_from_proc():
    assert command_line(os.getpid())[0].endswith(("python", "python3", "python3.11", "pytest"))


def _repository(address: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> RepositoryApi:
    monkeypatch.setattr("tierserve.repository_api.command_line", lambda pid: argv)
    return RepositoryApi(12345, address, timeout_s=5.0)


RUNNING = {  # as Triton 2.51 reports it after a retirement of version 1: its last full load's version policy
    "name": "digits_heavy",
    "version_policy": {"specific": {"versions": [1, 2, 3]}},
    "parameters": {"fault_latency_ms": {"string_value": "40"}, RELOAD_MARK: {"string_value": "2"}},
}
INDEX = [
    {"name": "digits_heavy", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
    {"name": "digits_heavy", "version": "2", "state": "READY", "reason": ""},
    {"name": "digits_heavy", "version": "3", "state": "READY", "reason": ""},
    {"name": "digits_heavy_critical", "version": "1", "state": "READY", "reason": ""},
    {"name": "digits_rules"},  # a model never loaded: no version, no state
]


def test_a_reload_loads_the_running_configuration_and_versions_marked_with_the_admin_header(
    monkeypatch: pytest.MonkeyPatch,
):
    seen: list[dict[str, str]] = []
    bodies: list[bytes] = []
    reply = {
        "/v2/models/digits_heavy/config": (200, json.dumps(RUNNING).encode()),
        "POST /v2/repository/index": (200, json.dumps(INDEX).encode()),
    }
    with http_stub(lambda path: reply.get(path, (200, b"{}")), seen, bodies) as (address, paths):
        api = _repository(address, ["tritonserver", "--http-restricted-api=model-repository:k=v"], monkeypatch)
        api.reload("digits_heavy")
        assert api.ready("digits_heavy")
    assert paths == [
        "POST /v2/repository/index",
        "/v2/models/digits_heavy/config",
        "POST /v2/repository/models/digits_heavy/load",
        "/v2/models/digits_heavy/ready",
    ]
    assert [h.get("k") for h in seen] == ["v", "v", "v", None]  # the key goes only where the API needs it
    loaded = json.loads(json.loads(bodies[-1])["parameters"]["config"])
    assert loaded == {
        **RUNNING,
        "version_policy": {"specific": {"versions": [2, 3]}},  # not the retired version 1
        "parameters": {**RUNNING["parameters"], RELOAD_MARK: {"string_value": "3"}},
    }


def test_a_model_unloaded_meanwhile_is_not_loaded_again(monkeypatch: pytest.MonkeyPatch):
    unloaded = [{**entry, "state": "UNAVAILABLE"} if entry.get("name") == "digits_heavy" else entry for entry in INDEX]
    reply = {"POST /v2/repository/index": (200, json.dumps(unloaded).encode())}
    refused = pytest.raises(NotLoaded, match="no version of digits_heavy is READY")
    with http_stub(lambda path: reply.get(path, (200, b"{}"))) as (address, paths), refused:
        _repository(address, ["tritonserver"], monkeypatch).reload("digits_heavy")
    assert paths == ["POST /v2/repository/index"]  # nothing loaded


def test_the_versions_served_are_the_ready_ones_of_that_model_in_the_index():
    assert ready_versions(INDEX, "digits_heavy") == {2, 3}
    assert ready_versions(INDEX, "digits_rules") == set()
    assert ready_versions([], "digits_heavy") == set()


def test_a_reload_mark_counts_from_one_and_leaves_the_configuration_it_was_given_alone():
    config = {"name": "digits_rules", "max_batch_size": 64, "version_policy": {"latest": {"num_versions": 1}}}
    assert reload_config(config, set()) == {**config, "parameters": {RELOAD_MARK: {"string_value": "1"}}}
    assert config == {"name": "digits_rules", "max_batch_size": 64, "version_policy": {"latest": {"num_versions": 1}}}
    assert reload_config({"parameters": None}, {3})["parameters"] == {RELOAD_MARK: {"string_value": "1"}}
    assert reload_config(config, {3, 1})["version_policy"] == {"specific": {"versions": [1, 3]}}


def test_a_running_configuration_that_is_not_json_is_a_repository_error(monkeypatch: pytest.MonkeyPatch):
    def not_json(path: str) -> tuple[int, bytes]:
        if path == "POST /v2/repository/index":
            return 200, json.dumps(INDEX).encode()
        return (200, b"<html>") if path.endswith("/config") else (200, b"{}")

    with http_stub(not_json) as (address, paths), pytest.raises(RepositoryError, match="not JSON"):
        _repository(address, ["tritonserver"], monkeypatch).reload("digits_heavy")
    assert paths == ["POST /v2/repository/index", "/v2/models/digits_heavy/config"]  # nothing loaded


@pytest.mark.parametrize("index", [b"<html>", b"{}", b'["digits_heavy"]'])
def test_an_index_that_is_not_a_list_of_models_is_a_repository_error(monkeypatch: pytest.MonkeyPatch, index: bytes):
    refused = pytest.raises(RepositoryError, match="not a JSON list of models")
    with http_stub(lambda path: (200, index)) as (address, paths), refused:
        _repository(address, ["tritonserver"], monkeypatch).reload("digits_heavy")
    assert paths == ["POST /v2/repository/index"]  # nothing loaded


def test_a_refused_load_is_an_error_naming_tritons_reason(monkeypatch: pytest.MonkeyPatch):
    refusal = b'{"error":"This API is restricted, expecting header \'k\'"}'
    with http_stub(lambda path: (403, refusal) if path.startswith("POST") else (400, b"")) as (address, _):
        api = _repository(address, ["tritonserver"], monkeypatch)
        with pytest.raises(RepositoryError, match="HTTP 403: This API is restricted, expecting header 'k'"):
            api.load("digits_heavy", {"name": "digits_heavy"})
        assert not api.ready("digits_heavy")


def test_a_server_that_does_not_answer_is_an_oserror(monkeypatch: pytest.MonkeyPatch):
    with http_stub(lambda path: (200, b"")) as (address, _):
        pass  # closed: nothing listens there any more
    with pytest.raises(OSError):
        _repository(address, ["tritonserver"], monkeypatch).reload("digits_heavy")
