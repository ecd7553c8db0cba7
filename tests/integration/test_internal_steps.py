"""Internal steps are internal: `digits` is one step, the router, whose inputs are the client's own PIXELS and
parameters; nothing a client sends can pose as another step's output, and the load signal is Triton's own
count of queue time. The critical lanes serve only the router. Each forgery an outside client tried is
refused or harmless, and harms no other client."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tierserve.client import TierserveClient
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.load import SteadyLoad
from tierserve.tools.server import TritonServer

from .prometheus import metric_values


def _tensors(**values: np.ndarray) -> list[grpcclient.InferInput]:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.object_): "BYTES"}
    tensors = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), datatypes[value.dtype])
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def _old_router_request(image: np.ndarray, stamp: float) -> list[grpcclient.InferInput]:
    """What the router took when `preprocess` was a step of `digits`: a stamp a client could hold back or forge."""
    return _tensors(
        IMAGE=image[None].astype(np.float32),
        SOURCE=np.array([[8, 8, 0, 0]], np.float32),
        STAMP=np.array([[stamp]], np.float64),
        SEAL=np.array([[b""]], dtype=np.object_),
    )


def _refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert "Traceback" not in caught.value.message()
    return caught.value


def test_the_routers_former_internal_inputs_are_refused_by_triton(triton: TritonServer, split: DigitsSplit):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        error = _refusal(lambda: client.infer("router", _old_router_request(split.test.images[0], 0.0)))
    finally:
        client.close()
    assert str(error.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected inference input" in error.message() or "expected 1 inputs" in error.message()


@pytest.mark.parametrize(
    ("pixels", "parameters", "expected"),
    [
        (np.full((1, 8, 8), np.inf, np.float32), {}, "PIXELS has 64 infinite value(s)"),
        (np.zeros((1, 8, 8), np.float32), {"tier": "critical"}, "'critical' needs a tier key"),
        (np.zeros((1, 3, 3), np.float32), {}, "PIXELS images must be 4x4 to 64x64, got 3x3"),
    ],
)
def test_a_direct_call_to_the_router_is_judged_as_a_digits_request(
    triton: TritonServer, pixels: np.ndarray, parameters: dict, expected: str
):
    """The router's contract is digits' own: called straight, it refuses what digits refuses, with the same words."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        direct = _refusal(lambda: client.infer("router", _tensors(PIXELS=pixels), parameters=parameters))
        through = _refusal(lambda: client.infer("digits", _tensors(PIXELS=pixels), parameters=parameters))
    finally:
        client.close()
    assert str(direct.status()) == str(through.status()) == "StatusCode.INVALID_ARGUMENT"
    assert expected in direct.message() and expected in through.message()


def test_a_held_back_request_is_not_read_as_load(triton: TritonServer, split: DigitsSplit):
    """The gap the two-step layout left: `preprocess`'s sealed rows, held back 3 s and then sent to the router,
    read as 3 s of queue wait. Now a held-back image is just an image: the load gauge stays at Triton's count."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        image = client.infer("preprocess", _tensors(PIXELS=split.test.images[:1].astype(np.float32))).as_numpy("IMAGE")
        time.sleep(3)
        for _ in range(20):
            client.infer("router", _tensors(PIXELS=image))
    finally:
        client.close()
    time.sleep(0.3)  # a few readings of the statistics
    assert max(metric_values(triton, "tierserve_router_queue_wait_ms")) < 10.0, "3 s of holding is no queue wait"


def test_forged_and_direct_calls_shed_nobody_and_eject_nothing(triton: TritonServer, split: DigitsSplit):
    """Stamps of 0 (a wait of days) and infinite pixels at ~50 calls/s for 3 s once shed 257 of 264 standard
    requests and opened digits_rules:1's breaker; now they are refused before they touch shared state."""
    stop = threading.Event()
    refused = 0

    def forge() -> None:
        nonlocal refused
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        infinite = _tensors(PIXELS=np.full((1, 8, 8), np.inf, np.float32))
        while not stop.is_set():
            for model, inputs in (("router", _old_router_request(split.test.images[0], 0.0)), ("router", infinite)):
                try:
                    client.infer(model, inputs)
                except InferenceServerException:
                    refused += 1
            time.sleep(0.02)
        client.close()

    forger = threading.Thread(target=forge)
    forger.start()
    with SteadyLoad(triton.grpc_url, split.test.images[:100], tiers=("standard",), pause_s=0.0) as load:
        time.sleep(3)
    stop.set()
    forger.join(10)
    assert refused > 50, "the forger was refused many times"
    assert [s.error for s in load.sent if s.error] == [] and load.sent
    assert max(metric_values(triton, "tierserve_breaker_state")) == 0.0, "no breaker was opened by a forgery"


@pytest.mark.parametrize("lane", ["digits_light_critical", "digits_heavy_critical"])
def test_a_critical_lane_refuses_direct_callers_and_serves_digits(
    triton: TritonServer, split: DigitsSplit, doubted_image, lane
):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    pixels = grpcclient.InferInput("PIXELS", [1, 8, 8], "FP32")
    pixels.set_data_from_numpy(split.test.images[:1].astype(np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(lane, [pixels], parameters={"tierserve_lane_token": "guess"})
    client.close()
    assert str(caught.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert (
        f"{lane}:" in caught.value.message()
        and "reserved for critical rows that digits routes" in caught.value.message()
    )
    with TierserveClient(triton.grpc_url, tier_key=triton.tier_key) as sdk:
        (answer,) = sdk.classify(doubted_image, tier="critical")
    assert answer.path.startswith("digits_light:2 "), "the light model runs inside the router: it needs no lane"
    assert answer.path.endswith(">digits_heavy_critical:3 ok"), "digits still routes critical escalations to a lane"


def test_concurrent_direct_callers_of_a_lane_are_each_refused_and_the_server_lives(
    triton: TritonServer, split: DigitsSplit
):
    """Refusals batched together once shared one TritonError, and Triton 2.51 died of it (signal 11): two
    clients calling a lane at once killed the server in 4 runs of 4."""
    refusals: list[str] = []

    def call_lane() -> None:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            for _ in range(20):
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("digits_light_critical", _tensors(PIXELS=split.test.images[:2].astype(np.float32)))
                refusals.append(str(caught.value.status()))
        finally:
            client.close()

    callers = [threading.Thread(target=call_lane) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    assert refusals == ["StatusCode.INVALID_ARGUMENT"] * 80
    assert triton.is_ready()
