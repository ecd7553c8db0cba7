"""The SDK without a server: what each failure becomes in TierserveError, argument checks, what a request sends
and how an answer is read."""

from __future__ import annotations

import asyncio
import pickle
import re
from http import HTTPStatus

import numpy as np
import pytest
from geventhttpclient.response import HTTPConnectionClosed
from grpc import StatusCode
from tritonclient.utils import InferenceServerException

from tierserve.client import AsyncTierserveClient, Classification, TierserveClient, TierserveError
from tierserve.client.classification import decode, feedback_tensors, request_parameters
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
        (HTTPStatus.BAD_GATEWAY, True),
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


def test_an_http_error_page_of_a_proxy_is_named_as_such_and_a_lost_answer_is_retryable():
    """nginx's own 502 page when the server behind it died mid-answer: not Triton's JSON."""
    page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>nginx</body>\r\n</html>\r\n"
    raw = InferenceServerException(
        "an exception occurred in the client while decoding the response: Parse error at offset 0: Invalid value.",
        status="502",
        debug_details=page,
    )
    error = _raised("http", raw)
    assert error.status == HTTPStatus.BAD_GATEWAY and error.retryable
    assert error.message == (
        "host:1 answered with a body that is not Triton's (a proxy in between?): "
        "'<html> <head><title>502 Bad Gateway</title></head> <body>nginx</body> </html>'"
    )


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


def test_each_call_sends_headers_of_its_own():
    """tritonclient.http's infer() writes the call's Inference-Header-Content-Length into the headers dict it is given.
    With one dict for every call, threads sharing a client sent each other's lengths: under load, requests the server
    could not parse ("expecting 4 additional bytes", "Missing a closing quotation mark")."""
    seen = []

    def infer(request, timeout_s):
        seen.append(dict(request["headers"]))
        request["headers"]["Inference-Header-Content-Length"] = 123  # as tritonclient.http does
        return _NoAnswer()

    with TierserveClient("127.0.0.1:1", "http", tier_key="k") as client:
        client._calls.infer = infer
        client.classify([[0.0] * 8] * 8)
        client.classify([[0.0] * 8] * 8)
    assert seen == [{"tierserve-tier-key": "k"}] * 2


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


class _Result:
    """An InferResult holding the given outputs."""

    def __init__(self, **outputs: np.ndarray) -> None:
        self._outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray:
        return self._outputs[name]


def _digits_answer(request_ids: list[bytes], arms: list[bytes]) -> _Result:
    n = len(request_ids)
    return _Result(
        LABEL=np.full((n, 1), 3, np.int64),
        PROBS=np.full((n, 10), 0.1, np.float32),
        CONFIDENCE=np.full((n, 1), 0.5, np.float32),
        ROUTE=np.full((n, 1), b"digits_light:1", np.object_),
        REASON=np.full((n, 1), b"cascade", np.object_),
        PATH=np.full((n, 1), b"digits_light:1 ok", np.object_),
        REQUEST_ID=np.array([[i] for i in request_ids], np.object_),
        ARMS=np.array([[a] for a in arms], np.object_),
    )


def test_decode_reads_each_rows_request_id_and_arms():
    answers = decode(_digits_answer([b"r1.sig", b"r2.sig"], [b"", b"cascade_ab=treatment,mirror_v3=mirrored"]))
    assert [a.request_id for a in answers] == ["r1.sig", "r2.sig"]
    assert answers[0].arms == {}
    assert answers[1].arms == {"cascade_ab": "treatment", "mirror_v3": "mirrored"}
    assert (answers[1].label, answers[1].route, answers[1].path) == (3, "digits_light:1", "digits_light:1 ok")


def test_a_classification_built_from_the_first_six_fields_has_no_id_and_no_arms():
    answer = Classification(1, np.zeros(10), 0.9, "digits_light:1", "cascade", "digits_light:1 ok")
    assert (answer.request_id, answer.arms) == ("", {})


def _sent(client: TierserveClient, answer: object) -> list[dict]:
    """Replace the client's transport: every request is recorded and gets `answer`."""
    sent: list[dict] = []
    client._calls.infer = lambda request, timeout_s: sent.append(request) or answer
    return sent


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_attributes_go_as_request_parameters_of_their_own_names(protocol: str):
    with TierserveClient("127.0.0.1:1", protocol) as client:
        sent = _sent(client, _NoAnswer())
        client.classify(np.zeros((8, 8)), tier="standard", attributes={"region": "eu", "account_age_days": 40})
        client.classify(np.zeros((8, 8)), attributes={})
    assert sent[0]["parameters"] == {"tier": "standard", "region": "eu", "account_age_days": 40}
    assert type(sent[0]["parameters"]["account_age_days"]) is int
    assert sent[1]["parameters"] is None


@pytest.mark.parametrize("name", ["tier", "user_id", "deadline_ms"])
def test_an_attribute_named_like_classifys_own_arguments_is_refused_before_sending(name: str):
    with TierserveClient("127.0.0.1:1") as client:
        sent = _sent(client, _NoAnswer())
        with pytest.raises(ValueError, match=f"attribute {name!r} is not an attribute"):
            client.classify(np.zeros((8, 8)), attributes={"region": "eu", name: "1"})
    assert sent == []


@pytest.mark.parametrize("value", [True, 1.5, None, ["eu"]])
def test_an_attribute_that_is_neither_a_string_nor_an_int_is_refused(value: object):
    with pytest.raises(ValueError, match="attribute 'region' must be a string or an int"):
        request_parameters(None, None, None, {"region": value})


def _accepted(n: int) -> _Result:
    return _Result(ACCEPTED=np.ones((n, 1), bool))


def _inputs(request: dict) -> dict[str, tuple[list[int], str]]:
    return {tensor.name(): (list(tensor.shape()), tensor.datatype()) for tensor in request["inputs"]}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_feedback_is_one_call_of_the_feedback_model_with_a_row_per_id(protocol: str):
    with TierserveClient("127.0.0.1:1", protocol, tier_key="k") as client:
        sent = _sent(client, _accepted(3))
        assert client.feedback(["a.sig", "b.sig", "c.sig"], [1, 7, 0]) is None
        sent_one = _sent(client, _accepted(1))
        client.feedback("a.sig", 4, timeout_s=0.5)
    (request,) = sent
    assert request["model_name"] == "feedback" and request["parameters"] is None
    assert _inputs(request) == {"REQUEST_ID": ([3, 1], "BYTES"), "LABEL": ([3, 1], "INT64")}
    assert [output.name() for output in request["outputs"]] == ["ACCEPTED"]
    assert request["headers"] == {"tierserve-tier-key": "k"}
    assert _inputs(sent_one[0]) == {"REQUEST_ID": ([1, 1], "BYTES"), "LABEL": ([1, 1], "INT64")}


def test_feedback_tensors_hold_the_ids_as_bytes_and_the_labels_as_int64():
    tensors = feedback_tensors(("a.sig", "b.sig"), np.array([2, 9]))
    assert tensors["REQUEST_ID"].tolist() == [[b"a.sig"], [b"b.sig"]] and tensors["REQUEST_ID"].dtype == np.object_
    assert tensors["LABEL"].tolist() == [[2], [9]] and tensors["LABEL"].dtype == np.int64


@pytest.mark.parametrize(
    ("request_ids", "labels", "message"),
    [
        (["a", "b"], [1], "one label per request id, at least one: got 2 ids and 1 labels"),
        ([], [], "got 0 ids and 0 labels"),
        ([b"a"], [1], "request ids are the non-empty REQUEST_ID strings of answers, got b'a'"),
        (["a"], [1.0], "labels must be ints, got 1.0"),
        (["a"], [True], "labels must be ints, got True"),
    ],
)
def test_malformed_feedback_is_refused_before_sending(request_ids: object, labels: object, message: str):
    with TierserveClient("127.0.0.1:1") as client:
        sent = _sent(client, _accepted(1))
        with pytest.raises(ValueError, match=re.escape(message)):
            client.feedback(request_ids, labels)
    assert sent == []


@pytest.mark.parametrize(("protocol", "status"), [("grpc", "StatusCode.INVALID_ARGUMENT"), ("http", "400")])
def test_refused_feedback_is_a_tierserve_error_that_is_not_retryable_with_the_servers_message(
    protocol: str, status: str
):
    refusal = "feedback: REQUEST_ID 'a.sig' already has feedback"

    def refuse(request: dict, timeout_s: float) -> None:
        raise InferenceServerException(refusal, status=status)

    with TierserveClient("127.0.0.1:1", protocol) as client:
        client._calls.infer = refuse
        with pytest.raises(TierserveError) as caught:
            client.feedback("a.sig", 1)
    assert caught.value.status == {"grpc": StatusCode.INVALID_ARGUMENT, "http": HTTPStatus.BAD_REQUEST}[protocol]
    assert not caught.value.retryable and caught.value.message == refusal


def test_feedback_answered_but_not_accepted_is_an_error():
    with TierserveClient("127.0.0.1:1") as client:
        _sent(client, _Result(ACCEPTED=np.array([[True], [False]])))
        with pytest.raises(TierserveError, match=re.escape("feedback for rows [1] was answered but not accepted")):
            client.feedback(["a", "b"], [1, 2])


def test_a_closed_client_refuses_feedback():
    client = TierserveClient("127.0.0.1:1")
    client.close()
    with pytest.raises(ValueError, match="feedback on a closed client"):
        client.feedback("a", 1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_asyncio_client_sends_attributes_and_feedback_as_the_blocking_one(protocol: str):
    sent: list[dict] = []

    async def calls() -> list:
        async with AsyncTierserveClient("127.0.0.1:1", protocol) as client:

            async def infer(**request: object) -> object:
                sent.append(request)
                return _accepted(1) if request["model_name"] == "feedback" else _digits_answer([b"r"], [b"ab=b"])

            client._client.infer = infer
            answers = await client.classify(np.zeros((8, 8)), attributes={"device": "mobile"})
            await client.feedback(answers[0].request_id, 5)
            with pytest.raises(ValueError, match="attribute 'tier' is not an attribute"):
                await client.classify(np.zeros((8, 8)), attributes={"tier": "critical"})
            return answers

    answers = asyncio.run(calls())
    assert (answers[0].request_id, answers[0].arms) == ("r", {"ab": "b"})
    assert [request["model_name"] for request in sent] == ["digits", "feedback"]
    assert sent[0]["parameters"] == {"device": "mobile"}
    assert _inputs(sent[1]) == {"REQUEST_ID": ([1, 1], "BYTES"), "LABEL": ([1, 1], "INT64")}
