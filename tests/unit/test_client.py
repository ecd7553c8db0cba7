"""The SDK's error mapping and argument checks, without a server: what each failure becomes in TierserveError."""

from __future__ import annotations

import asyncio
import pickle
from http import HTTPStatus

import pytest
from geventhttpclient.response import HTTPConnectionClosed
from grpc import StatusCode
from tritonclient.utils import InferenceServerException

from tierserve.client import AsyncTierserveClient, TierserveClient, TierserveError
from tierserve.client.errors import call_errors, status_from


@pytest.mark.parametrize(
    ("protocol", "raw", "typed"),
    [
        ("grpc", "StatusCode.INVALID_ARGUMENT", StatusCode.INVALID_ARGUMENT),
        ("grpc", "StatusCode.UNAVAILABLE", StatusCode.UNAVAILABLE),
        ("http", "400", HTTPStatus.BAD_REQUEST),
        ("http", "503", HTTPStatus.SERVICE_UNAVAILABLE),
        ("http", "599", 599),
        ("grpc", None, None),
    ],
)
def test_tritonclient_status_strings_become_typed_values(protocol: str, raw: str | None, typed: object):
    status = status_from(protocol, raw)
    assert status == typed and type(status) is type(typed)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (StatusCode.UNAVAILABLE, True),
        (StatusCode.DEADLINE_EXCEEDED, True),
        (StatusCode.INVALID_ARGUMENT, False),
        (HTTPStatus.SERVICE_UNAVAILABLE, True),
        (504, True),
        (HTTPStatus.BAD_REQUEST, False),
        (None, False),
    ],
)
def test_only_unreachable_shed_or_timed_out_calls_are_retryable(status: object, retryable: bool):
    assert TierserveError(status, "why").retryable is retryable


def test_the_error_names_its_status_and_keeps_the_message():
    assert str(TierserveError(StatusCode.UNAVAILABLE, "shed")) == "UNAVAILABLE: shed"
    assert str(TierserveError(HTTPStatus.SERVICE_UNAVAILABLE, "shed")) == "503 Service Unavailable: shed"
    assert TierserveError(599, "odd").message == "odd"


def test_the_error_crosses_a_process_boundary_whole():
    error = pickle.loads(pickle.dumps(TierserveError(StatusCode.DEADLINE_EXCEEDED, "late")))
    assert (error.status, error.message) == (StatusCode.DEADLINE_EXCEEDED, "late")
    assert str(error) == "DEADLINE_EXCEEDED: late"


def _raised(protocol: str, error: BaseException, connection_errors: tuple[type[BaseException], ...] = ()) -> object:
    with pytest.raises(TierserveError) as caught, call_errors(protocol, "host:1", 0.5, connection_errors):
        raise error
    return caught.value


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_timeouts_of_every_kind_become_the_protocols_timeout_status(protocol: str):
    expected = StatusCode.DEADLINE_EXCEEDED if protocol == "grpc" else HTTPStatus.GATEWAY_TIMEOUT
    for raw in (TimeoutError(), asyncio.TimeoutError()):
        error = _raised(protocol, raw)
        assert error.status == expected and error.message == "no answer from host:1 within 0.5 s"


def test_a_lost_or_refused_http_connection_is_unreachable():
    for raw in (ConnectionRefusedError(111, "Connection refused"), HTTPConnectionClosed("connection closed.")):
        error = _raised("http", raw, (HTTPConnectionClosed, OSError))
        assert error.status == HTTPStatus.SERVICE_UNAVAILABLE and error.message.startswith("cannot reach host:1: ")
        assert type(raw).__name__ in error.message and error.__cause__ is raw


def test_a_server_refusal_keeps_the_servers_message():
    error = _raised("grpc", InferenceServerException("no such tier", status="StatusCode.INVALID_ARGUMENT"))
    assert error.status == StatusCode.INVALID_ARGUMENT and error.message == "no such tier"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_call_refused_for_want_of_a_restricted_apis_header_is_not_retryable(protocol: str):
    """Triton 2.51 answers it with UNAVAILABLE over gRPC, which would read as "retry later"."""
    raw = {
        "grpc": InferenceServerException(
            "This protocol is restricted, expecting header 'triton-grpc-protocol-tierserve-admin-key'",
            status="StatusCode.UNAVAILABLE",
        ),
        "http": InferenceServerException(
            "This API is restricted, expecting header 'tierserve-admin-key'", status="403"
        ),
    }[protocol]
    error = _raised(protocol, raw)
    assert error.status == {"grpc": StatusCode.PERMISSION_DENIED, "http": HTTPStatus.FORBIDDEN}[protocol]
    assert not error.retryable and error.message.startswith("This ")
    shed = _raised("grpc", InferenceServerException("shed", status="StatusCode.UNAVAILABLE"))
    assert shed.status == StatusCode.UNAVAILABLE and shed.retryable


def test_other_exceptions_are_not_swallowed():
    with pytest.raises(KeyError), call_errors("http", "host:1", 0.5, (OSError,)):
        raise KeyError("a bug stays a bug")


@pytest.mark.parametrize("client", [TierserveClient, AsyncTierserveClient])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"url": "http://localhost:8000", "protocol": "http"}, "url is host:port, without a scheme"),
        ({"protocol": "rest"}, "protocol must be 'grpc' or 'http'"),
        ({"timeout_s": 0}, "timeout_s must be a positive, finite number of seconds, got 0"),
        ({"timeout_s": float("inf")}, "got inf"),
    ],
)
def test_bad_arguments_are_refused_by_name(client: type, arguments: dict[str, object], message: str):
    with pytest.raises(ValueError, match=message):
        client(**arguments)


@pytest.mark.parametrize("client", [TierserveClient, AsyncTierserveClient])
@pytest.mark.parametrize("tier_key", ["", "with space", "line\nbreak", "caf\u00e9", 7])
def test_a_tier_key_that_cannot_travel_as_a_header_is_refused(client: type, tier_key: object):
    with pytest.raises(ValueError, match="tier_key must be a non-empty string of printable ASCII"):
        client("127.0.0.1:1", tier_key=tier_key)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_tier_key_goes_with_every_call_as_a_header(protocol: str):
    sent = []
    with TierserveClient("127.0.0.1:1", protocol, tier_key="k-1_x") as client:
        client._calls.infer = lambda request, timeout_s: sent.append(request) or _NoAnswer()
        client.classify([[0.0] * 8] * 8, tier="critical")
        client.classify([[0.0] * 8] * 8)
    assert [request["headers"] for request in sent] == [{"tierserve-tier-key": "k-1_x"}] * 2
    with TierserveClient("127.0.0.1:1", protocol) as client:
        client._calls.infer = lambda request, timeout_s: sent.append(request) or _NoAnswer()
        client.classify([[0.0] * 8] * 8)
    assert sent[-1]["headers"] is None


class _NoAnswer:
    """An InferResult with no rows."""

    def as_numpy(self, name: str) -> list:
        return []


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_closed_client_refuses_calls(protocol: str):
    client = TierserveClient("127.0.0.1:1", protocol)
    client.close()
    client.close()
    with pytest.raises(ValueError, match="classify on a closed client"):
        client.classify([[0.0] * 8] * 8)


def test_a_bad_per_call_timeout_is_refused_before_anything_is_sent():
    with TierserveClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="got -1"):
        client.classify([[0.0] * 8] * 8, timeout_s=-1)
