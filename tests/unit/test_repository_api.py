"""The router's reloads over its server's HTTP model repository API: the admin header read from tritonserver's
command line however the flag is written, unload then load sent with it, and Triton's refusal said, not hidden."""

from __future__ import annotations

import os

import pytest

from tierserve.repository_api import RepositoryApi, RepositoryError, command_line, restricted_header

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


def test_a_reload_is_an_unload_then_a_load_with_the_admin_header(monkeypatch: pytest.MonkeyPatch):
    seen: list[dict[str, str]] = []
    with http_stub(lambda path: (200, b"{}"), seen) as (address, paths):
        api = _repository(address, ["tritonserver", "--http-restricted-api=model-repository:k=v"], monkeypatch)
        api.unload("digits_heavy")
        api.load("digits_heavy")
        assert api.ready("digits_heavy")
    assert paths == [
        "POST /v2/repository/models/digits_heavy/unload",
        "POST /v2/repository/models/digits_heavy/load",
        "/v2/models/digits_heavy/ready",
    ]
    assert [h.get("k") for h in seen] == ["v", "v", None]  # the key goes only where the API needs it


def test_a_refused_load_is_an_error_naming_tritons_reason(monkeypatch: pytest.MonkeyPatch):
    refusal = b'{"error":"This API is restricted, expecting header \'k\'"}'
    with http_stub(lambda path: (403, refusal) if path.startswith("POST") else (400, b"")) as (address, _):
        api = _repository(address, ["tritonserver"], monkeypatch)
        with pytest.raises(RepositoryError, match="HTTP 403: This API is restricted, expecting header 'k'"):
            api.load("digits_heavy")
        assert not api.ready("digits_heavy")


def test_a_server_that_does_not_answer_is_an_oserror(monkeypatch: pytest.MonkeyPatch):
    with http_stub(lambda path: (200, b"")) as (address, _):
        pass  # closed: nothing listens there any more
    with pytest.raises(OSError):
        _repository(address, ["tritonserver"], monkeypatch).unload("digits_heavy")
