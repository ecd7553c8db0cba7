"""The SDK's tier key reaches a Python model on the real tritonserver as a request parameter, over HTTP and gRPC,
sync and asyncio, and the model's stub knows where the keys file is (TIERSERVE_TIER_KEYS).

The server here serves a stand-in `digits` that answers every image with its request's parameters (in REASON)
and its keys file path (in PATH): this checks the transport only; what the router does with the key is its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierserve.client import AsyncTierserveClient, TierserveClient
from tierserve.tier_keys import TIER_KEYS_ENV, TierKeys, presented_key
from tierserve.tools.server import Ports, TritonServer

CONFIG = """
name: "digits"
backend: "python"
max_batch_size: 64
input [ { name: "PIXELS" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [
  { name: "LABEL" data_type: TYPE_INT64 dims: [ 1 ] },
  { name: "PROBS" data_type: TYPE_FP32 dims: [ 10 ] },
  { name: "CONFIDENCE" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "ROUTE" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "REASON" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "PATH" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "REQUEST_ID" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "ARMS" data_type: TYPE_STRING dims: [ 1 ] }
]
"""

MODEL = f"""
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = len(pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy())
            text = lambda value: np.array([[value.encode()]] * rows, dtype=object)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("LABEL", np.zeros((rows, 1), np.int64)),
                pb_utils.Tensor("PROBS", np.full((rows, 10), 0.1, np.float32)),
                pb_utils.Tensor("CONFIDENCE", np.full((rows, 1), 0.1, np.float32)),
                pb_utils.Tensor("ROUTE", text("echo:1")),
                pb_utils.Tensor("REASON", text(request.parameters())),
                pb_utils.Tensor("PATH", text(os.environ.get("{TIER_KEYS_ENV}", "unset"))),
                pb_utils.Tensor("REQUEST_ID", text("")),
                pb_utils.Tensor("ARMS", text("")),
            ]))
        return responses
"""


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    workdir = tmp_path_factory.mktemp("tier_key_transport")
    (workdir / "repository" / "digits" / "1").mkdir(parents=True)
    (workdir / "repository" / "digits" / "config.pbtxt").write_text(CONFIG)
    (workdir / "repository" / "digits" / "1" / "model.py").write_text(MODEL)
    with (
        (workdir / "tritonserver.log").open("wb") as log,
        TritonServer(workdir / "repository", Ports.free(), workdir, output=log) as server,
    ):
        server.wait_ready(timeout_s=120)
        yield server


IMAGE = np.zeros((8, 8), np.float32)


def _parameters(answer_reason: str) -> dict:
    return json.loads(answer_reason)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_sdks_tier_key_arrives_as_a_request_parameter(echo_server: TritonServer, protocol: str):
    url = echo_server.grpc_url if protocol == "grpc" else echo_server.http_url
    key = echo_server.tier_key
    assert key is not None
    with TierserveClient(url, protocol, tier_key=key) as client:
        (answer,) = client.classify(IMAGE, tier="critical", user_id="alice")
    parameters = _parameters(answer.reason)
    assert parameters["tierserve-tier-key"] == key and parameters["tier"] == "critical"
    assert presented_key(parameters) == key
    assert TierKeys.load(Path(answer.path)).verdict("critical", presented_key(parameters)).key_name == "local"
    with TierserveClient(url, protocol) as client:
        (answer,) = client.classify(IMAGE, tier="critical")
    assert presented_key(_parameters(answer.reason)) is None, "no key, no parameter"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_asyncio_sdk_sends_it_too(echo_server: TritonServer, protocol: str):
    url = echo_server.grpc_url if protocol == "grpc" else echo_server.http_url

    async def classify() -> str:
        async with AsyncTierserveClient(url, protocol, tier_key="async-key") as client:
            (answer,) = await client.classify(IMAGE, tier="critical")
            return answer.reason

    assert presented_key(_parameters(asyncio.run(classify()))) == "async-key"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_real_digits_takes_a_request_that_carries_its_servers_tier_key(triton: TritonServer, split, protocol: str):
    """Whatever the router does with the key, a valid one never makes a request fail."""
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with TierserveClient(url, protocol, tier_key=triton.tier_key) as client:
        answers = client.classify(split.test.images[:2], tier="critical")
    assert len(answers) == 2 and all(answer.route for answer in answers)


def test_the_stub_is_told_where_the_keys_file_is(echo_server: TritonServer):
    with TierserveClient(echo_server.grpc_url) as client:
        (answer,) = client.classify(IMAGE)
    assert answer.path == str(echo_server.tier_keys.resolve())
    assert [k.name for k in TierKeys.load(echo_server.tier_keys).keys] == ["local"]
