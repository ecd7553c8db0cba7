"""1,200 seeded malformed requests over HTTP and gRPC against `digits`, every public model, the router and the
critical lanes: each gets an answer (no hang), a refusal is a client error naming the problem (bar Triton's
own front-end 5xx, README), no message carries a traceback or a server path, every success is finite, and no
stub is lost."""

from __future__ import annotations

import http.client
import json
import re
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.server import TritonServer

from .fuzz import Case, cases, json_body, raw_contents

SEED = 20261123
COUNT = 600  # per protocol
TIMEOUT_S = 10.0
# Triton 2.51's HTTP front end answers some malformed requests with 5xx before any model sees them (README, Errors)
FRONT_END_5XX = re.compile(
    r"^(failed to parse the request JSON buffer|Unable to parse '\w+'|"
    r"string correlation ID cannot be longer than 128 characters)"
)
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}


SERVER_PATH = re.compile(r"(/(work|home|root|tmp|usr|opt|dev/shm)/|\.py\b|site-packages)")


# Triton 2.51 prefixes some refusals with the client's own request id, however long (README, Errors)
REQUEST_ID_ECHO = re.compile(r"^\[request id: [^\]]*\] ")


def _clean(message: str) -> bool:
    """No traceback, no server file path, and a bounded length (the client's own echoed request id aside)."""
    message = REQUEST_ID_ECHO.sub("", message)
    return "Traceback" not in message and not SERVER_PATH.search(message) and len(message) < 2000


def _finite_outputs(outputs: list[dict]) -> bool:
    return all(
        np.isfinite(np.asarray(o["data"], np.float64)).all() for o in outputs if o["datatype"] in ("FP32", "FP64")
    )


def _crashes_the_http_front_end(case: Case) -> bool:
    """A dimension of 2**31 or more crashes Triton 2.51's HTTP front end itself (README, Errors: supervision
    restarts it, test_supervision); over gRPC the same shapes are refused."""
    return any(dim >= 2**31 for _, _, shape, _ in case.inputs for dim in shape)


def _http(server: TritonServer, case: Case) -> str | None:
    """What is wrong with the server's answer to `case` over HTTP, or None."""
    connection = http.client.HTTPConnection(server.http_url, timeout=TIMEOUT_S)
    version = f"/versions/{case.version}" if case.version else ""
    try:
        connection.request(
            "POST",
            f"/v2/models/{case.model}{version}/infer",
            body=json_body(case),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        status, body = response.status, response.read()
    except TimeoutError:
        return "no answer (hang)"
    finally:
        connection.close()
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:100]!r}"
    if status == 200:
        return None if _finite_outputs(answer.get("outputs", [])) else f"non-finite success: {answer}"
    message = answer.get("error", "")
    if not message or not _clean(message):
        return f"{status} without a clean message: {message[:300]!r}"
    if 400 <= status < 500 or (status in (500, 501) and FRONT_END_5XX.search(message)):
        return None
    return f"{status}: {message[:300]}"


def _grpc(stub: service_pb2_grpc.GRPCInferenceServiceStub, case: Case) -> str | None:
    """What is wrong with the server's answer to `case` over gRPC, or None."""
    request = service_pb2.ModelInferRequest(model_name=case.model, model_version=case.version)
    for name, value in case.parameters.items():
        parameter = request.parameters[name]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = value
    for name, datatype, shape, values in case.inputs:
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(raw_contents(datatype, values))
    try:
        response = stub.ModelInfer(request, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "no answer (hang)"
        if error.code() not in CLIENT_ERRORS or not _clean(error.details() or ""):
            return f"{error.code()}: {(error.details() or '')[:300]}"
        return None
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "FP32" and not np.isfinite(np.frombuffer(raw, np.float32)).all():
            return f"non-finite success: {output.name}"
    return None


@pytest.mark.timeout(600)
def test_malformed_requests_are_refused_one_by_one_and_nothing_is_lost(triton: TritonServer, split: DigitsSplit):
    stubs_before = sorted(triton.stub_pids())
    problems: list[str] = []
    sent = 0
    started = time.monotonic()
    channel = grpc.insecure_channel(triton.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for case in cases(SEED, COUNT):
        sent += 1
        if not _crashes_the_http_front_end(case) and (problem := _http(triton, case)):
            problems.append(
                f"http {case.kind} {case.model} {[i[1:3] for i in case.inputs]} {str(case.parameters)[:80]}: {problem}"
            )
        if case.raw_body is None:
            sent += 1
            if problem := _grpc(stub, case):
                problems.append(
                    f"grpc {case.kind} {case.model} {[i[1:3] for i in case.inputs]} "
                    f"{str(case.parameters)[:80]}: {problem}"
                )
    channel.close()
    assert sent >= 1000 and time.monotonic() - started < 300
    assert problems == [], f"{len(problems)} of {sent}:\n" + "\n".join(problems[:30])
    assert sorted(triton.stub_pids()) == stubs_before, "no stub died"
    valid = service_pb2.ModelInferRequest(model_name="digits")
    valid.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 8, 8])
    valid.raw_input_contents.append(split.test.images[0].astype(np.float32).tobytes())
    valid.outputs.add(name="LABEL")
    channel = grpc.insecure_channel(triton.grpc_url)
    label = np.frombuffer(
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(valid, timeout=10).raw_output_contents[0],
        np.int64,
    )
    channel.close()
    assert label[0] == split.test.labels[0]
