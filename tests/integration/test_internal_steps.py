"""Internal steps are internal: a request that did not come through `digits` cannot use the router's shared
state or the critical lanes. Each forgery an outside client tried is refused and harms no other client."""

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


def _router_request(image: np.ndarray, stamp: float, source: list[float], seal: bytes = b"") -> list:
    tensors = []
    for name, datatype, value in (
        ("IMAGE", "FP32", image[None].astype(np.float32)),
        ("SOURCE", "FP32", np.array([source], np.float32)),
        ("STAMP", "FP64", np.array([[stamp]], np.float64)),
        ("SEAL", "BYTES", np.array([[seal]], dtype=np.object_)),
    ):
        tensor = grpcclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


FORGERIES = {
    "stamp_zero": (0.0, [8, 8, 0, 0], None),
    "stamp_minus_infinity": (float("-inf"), [8, 8, 0, 0], None),
    "nan_source": (None, [8, 8, float("nan"), 0], None),
    "infinite_pixels": (None, [8, 8, 0, 0], float("inf")),
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_direct_call_to_the_router_is_refused_by_name(triton: TritonServer, split: DigitsSplit, forgery: str):
    stamp, source, pixel = FORGERIES[forgery]
    image = split.test.images[0].copy()
    if pixel is not None:
        image[:] = pixel
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("router", _router_request(image, time.monotonic() if stamp is None else stamp, source))
    client.close()
    assert str(caught.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "router is an internal step of digits" in caught.value.message()
    assert "Traceback" not in caught.value.message()


def test_forged_router_calls_shed_nobody_and_eject_nothing(triton: TritonServer, split: DigitsSplit):
    """Stamps of 0 (a wait of days) and infinite pixels at ~50 calls/s for 3 s once shed 257 of 264 standard
    requests and opened digits_rules:1's breaker; now they are refused before they touch shared state."""
    stop = threading.Event()
    forged = 0

    def forge() -> None:
        nonlocal forged
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        infinite = np.full((8, 8), np.inf, np.float32)
        while not stop.is_set():
            for image, stamp in ((split.test.images[0], 0.0), (infinite, time.monotonic())):
                try:
                    client.infer("router", _router_request(image, stamp, [8, 8, 0, 0]))
                except InferenceServerException:
                    forged += 1
            time.sleep(0.02)
        client.close()

    forger = threading.Thread(target=forge)
    forger.start()
    with SteadyLoad(triton.grpc_url, split.test.images[:100], tiers=("standard",), pause_s=0.0) as load:
        time.sleep(3)
    stop.set()
    forger.join(10)
    assert forged > 50, "the forger was refused many times"
    assert [s.error for s in load.sent if s.error] == [] and load.sent
    assert max(metric_values(triton, "tierserve_breaker_state")) == 0.0, "no breaker was opened by a forgery"


@pytest.mark.parametrize("lane", ["digits_light_critical", "digits_heavy_critical"])
def test_a_critical_lane_refuses_direct_callers_and_serves_digits(triton: TritonServer, split: DigitsSplit, lane):
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
        (answer,) = sdk.classify(split.test.images[0], tier="critical")
    assert answer.path.startswith("digits_light_critical:1 "), "digits still routes critical rows to the lanes"
