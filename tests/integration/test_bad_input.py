"""Bad input gets a clear error naming the problem, and the server keeps answering valid requests."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.server import TritonServer


@pytest.fixture(autouse=True)
def server_still_answers(triton_client, split: DigitsSplit):
    """After every bad request, a valid one must still be answered correctly."""
    yield
    probs = triton_client.probs("digits_light", split.test.images[:8])
    assert (probs.argmax(axis=1) == split.test.labels[:8]).mean() >= 0.75


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def _is_invalid_argument(error: InferenceServerException) -> bool:
    """INVALID_ARGUMENT over gRPC, 400 over HTTP."""
    return str(error.status()) in {"StatusCode.INVALID_ARGUMENT", "400"}


def _is_client_error(error: InferenceServerException) -> bool:
    """A 4xx-style status: the request was wrong, not the server."""
    status = str(error.status())
    return status in {
        "StatusCode.INVALID_ARGUMENT",
        "StatusCode.NOT_FOUND",
        "StatusCode.UNAVAILABLE",
    } or status.startswith("4")


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "FP16"])
def test_wrong_datatype_is_rejected(triton_client, split: DigitsSplit, datatype: str):
    dtype = {"FP64": np.float64, "INT32": np.int32, "FP16": np.float16}[datatype]
    error = _error(lambda: triton_client.infer("digits_heavy", split.test.images[:2].astype(dtype), datatype=datatype))
    assert _is_client_error(error)
    assert "data-type" in error.message() and datatype in error.message() and "FP32" in error.message()


@pytest.mark.parametrize("shape", [(1, 7, 8), (1, 64), (1, 8, 8, 1)])
def test_wrong_shape_is_rejected(triton_client, shape: tuple[int, ...]):
    error = _error(lambda: triton_client.infer("digits_heavy", np.zeros(shape, np.float32)))
    assert _is_client_error(error)
    assert "shape" in error.message() and "[-1,8,8]" in error.message()


def test_batch_above_the_maximum_is_rejected(triton_client):
    error = _error(lambda: triton_client.infer("digits_light", np.zeros((65, 8, 8), np.float32)))
    assert _is_client_error(error)
    assert "batch-size must be <= 64" in error.message()


def test_unknown_model_is_rejected(triton_client):
    error = _error(lambda: triton_client.infer("digits_nonexistent", np.zeros((1, 8, 8), np.float32)))
    assert _is_client_error(error)
    assert "digits_nonexistent" in error.message()


def test_unknown_version_is_rejected(triton_client):
    error = _error(lambda: triton_client.infer("digits_heavy", np.zeros((1, 8, 8), np.float32), version="7"))
    assert _is_client_error(error)
    assert "digits_heavy" in error.message() and "7" in error.message()


def test_missing_pixels_sent_to_a_model_that_needs_complete_images_are_rejected(triton_client, split: DigitsSplit):
    images = split.test.images[:3].copy()
    images[1, 2, 3] = np.nan
    error = _error(lambda: triton_client.infer("digits_heavy", images))
    assert _is_invalid_argument(error)
    assert "digits_heavy:3" in error.message() and "1 missing (NaN) pixel" in error.message()


def test_infinite_pixels_are_rejected_even_by_the_safe_default(triton_client, split: DigitsSplit):
    images = split.test.images[:2].copy()
    images[0, 0, 0] = np.inf
    error = _error(lambda: triton_client.infer("digits_rules", images))
    assert _is_invalid_argument(error)
    assert "infinite" in error.message()


def test_a_bad_request_does_not_fail_the_good_ones_batched_with_it(triton: TritonServer, grpc, split: DigitsSplit):
    """Requests that share one dynamic batch are answered or rejected one by one."""
    bad = split.test.images[:1].copy()
    bad[0, 4, 4] = np.nan
    outcomes: dict[int, object] = {}
    done = threading.Event()
    total = 40

    def record(index: int):
        def callback(result, error):
            outcomes[index] = error or result.as_numpy("PROBS")
            if len(outcomes) == total:
                done.set()

        return callback

    for index in range(total):
        image = bad if index % 4 == 0 else split.test.images[index : index + 1]
        tensor = grpc.module.InferInput("PIXELS", [1, 8, 8], "FP32")
        tensor.set_data_from_numpy(image)
        grpc.client.async_infer("digits_heavy", [tensor], callback=record(index))
    assert done.wait(60)
    expected = grpc.probs("digits_heavy", split.test.images[:total])
    for index, outcome in outcomes.items():
        if index % 4 == 0:
            assert isinstance(outcome, InferenceServerException) and "missing (NaN)" in outcome.message()
        else:
            np.testing.assert_allclose(outcome[0], expected[index], atol=1e-6)


@pytest.mark.parametrize("body", [b"{not json", b'{"inputs": [{"name": "PIXELS"', b"", b"[1, 2, 3]"])
def test_malformed_json_over_http_is_answered_with_an_error(triton: TritonServer, triton_client, body: bytes):
    """Triton 2.51's own HTTP front end parses the JSON; it answers 400 or 500 with a message (README)."""
    request = urllib.request.Request(
        f"http://{triton.http_url}/v2/models/digits_light/infer",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code in {400, 500}
    message = json.loads(caught.value.read())["error"]
    assert message, "the error body names the problem"
