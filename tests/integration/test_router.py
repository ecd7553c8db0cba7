"""The `digits` entry model: rules, the cascade, explanations, strict parameters, the policy's model list."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
from grpc import StatusCode
from tritonclient.utils import InferenceServerException

from tierserve.client import AsyncTierserveClient, Classification, TierserveClient, TierserveError
from tierserve.learned_router import LearnedRouter
from tierserve.policy import Policy
from tierserve.router_files import LEARNED_ROUTER_FILE, POLICY_FILE, ROUTER_MODEL
from tierserve.tools.cli import main
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.server import TritonServer
from tierserve.tools.workload import pure_noise, upscaled, with_missing

from .conftest import learned_router_inputs
from .prometheus import metric_values


@pytest.fixture(params=["grpc", "http"])
def client(request: pytest.FixtureRequest, triton: TritonServer):
    url = triton.grpc_url if request.param == "grpc" else triton.http_url
    with TierserveClient(url, protocol=request.param, tier_key=triton.tier_key) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def policy(model_repository: Path) -> Policy:
    return Policy.load(model_repository / ROUTER_MODEL / POLICY_FILE)


def _out_of_range(image: np.ndarray, pixels: int = 6) -> np.ndarray:
    """A clean digit with a few pixels just above the 0-16 range: odd values, not an odd image."""
    changed = image.copy()
    changed.reshape(-1)[:pixels] = 17.0
    return changed


def test_each_rule_fires_on_the_input_built_for_it(client: TierserveClient, split: DigitsSplit):
    image = split.test.images[0]
    cases = {
        "out_of_distribution": (pure_noise(1, seed=4), {}),
        "values_out_of_range": (_out_of_range(image)[None], {}),
        "missing_pixels": (with_missing(image[None], 0.3, seed=1), {}),
        "tight_deadline": (image[None], {"deadline_ms": 15}),
    }
    routes = {
        "out_of_distribution": "digits_rules:1",
        "values_out_of_range": "digits_rules:1",
        "missing_pixels": "digits_missing:1",
        "tight_deadline": "digits_light:2",
    }
    for rule, (images, parameters) in cases.items():
        (answer,) = client.classify(images, **parameters)
        assert answer.reason.startswith(f"rule {rule} ("), answer.reason
        assert answer.route == routes[rule] and answer.path == f"{routes[rule]} ok"


def test_conservative_routes_answer_with_capped_confidence(client: TierserveClient):
    (answer,) = client.classify(pure_noise(1, seed=9))
    assert answer.route == "digits_rules:1" and answer.confidence <= np.float32(0.3)
    assert "ood=" in answer.reason


def test_the_cascade_escalates_exactly_when_the_policy_says(
    grpc_sdk: TierserveClient, grpc, model_repository: Path, split: DigitsSplit, policy: Policy
):
    images = split.test.images
    for tier in ("standard", "best_effort"):
        answers = [
            a for start in range(0, len(images), 64) for a in grpc_sdk.classify(images[start : start + 64], tier=tier)
        ]
        model, version = policy.cascade.first.split(":")
        light = np.concatenate([grpc.probs(model, images[s : s + 64], version) for s in range(0, len(images), 64)])
        learned = LearnedRouter.load(model_repository / ROUTER_MODEL / "1" / LEARNED_ROUTER_FILE)
        wrong = learned.wrong_probability(learned_router_inputs(model_repository, images, light, tier))
        doubt = wrong > policy.cascade.learned_escalate_above[tier]
        low = light.max(axis=1) < policy.cascade.thresholds[tier]
        cascaded = np.array([a.reason.startswith("cascade") for a in answers])
        # the router's in-process copy of digits_light decides exactly as the Triton model's answers predict
        heavy_path = "digits_light:2 low_confidence>digits_heavy_trt:1 unavailable>digits_heavy:3 ok"
        escalated = np.array([a.path == heavy_path for a in answers])
        assert cascaded.mean() > 0.95, "clean test digits go through the cascade"
        np.testing.assert_array_equal(escalated[cascaded], (low | doubt)[cascaded])
        assert 0 < escalated.sum() < len(answers)
        for answer, was_escalated in zip(answers, escalated, strict=True):
            assert answer.route == ("digits_heavy:3" if was_escalated else "digits_light:2")


def test_the_tensorrt_variant_this_server_lacks_is_passed_over_to_the_onnx_model_and_said(
    grpc_sdk: TierserveClient, triton: TritonServer, split: DigitsSplit, doubted_image
):
    """The policy lists digits_heavy_trt:1 first for escalations; no CPU host has it, so digits_heavy:3 answers."""
    assert not any(m["name"] == "digits_heavy_trt" for m in triton.models()), "a CPU host has no TensorRT model"
    (answer,) = grpc_sdk.classify(doubted_image)
    assert answer.path == "digits_light:2 low_confidence>digits_heavy_trt:1 unavailable>digits_heavy:3 ok"
    assert answer.route == "digits_heavy:3"
    assert "digits_heavy_trt:1 is not loaded on this server; escalated to digits_heavy:3" in answer.reason
    for _ in range(3):  # a call to a model the server lacks fails; three in a row would open its breaker
        grpc_sdk.classify(np.stack([doubted_image] * 8))
    assert max(metric_values(triton, "tierserve_breaker_state", model="digits_heavy_trt:1")) == 0.0, "never called"


def test_stricter_tiers_escalate_more(grpc_sdk: TierserveClient, split: DigitsSplit):
    images = split.test.images[:64]
    escalations = {
        tier: sum("low_confidence" in a.path for a in grpc_sdk.classify(images, tier=tier))
        for tier in ("best_effort", "standard", "critical")
    }
    assert escalations["best_effort"] < escalations["standard"] < escalations["critical"]


def test_a_batch_mixing_routes_comes_back_in_order(client: TierserveClient, grpc, split: DigitsSplit):
    clean = split.test.images[:4]
    batch = np.stack(
        [
            pure_noise(1, seed=2)[0],
            clean[0],
            with_missing(clean[1:2], 0.4, seed=3)[0],
            clean[2],
            _out_of_range(clean[3]),
        ]
    )
    answers = client.classify(batch)
    assert answers[0].route == "digits_rules:1"
    assert answers[2].route == "digits_missing:1" and answers[4].route == "digits_rules:1"
    for index in (1, 3):
        assert answers[index].reason.startswith("cascade")
        model, version = answers[index].route.split(":")
        np.testing.assert_allclose(
            answers[index].probs, grpc.probs(model, batch[index : index + 1], version)[0], atol=1e-6
        )
    assert [a.label for a in answers][1::2] == [split.test.labels[0], split.test.labels[2]]


def test_concurrent_requests_batched_together_each_get_their_own_answers(
    triton: TritonServer, grpc, policy: Policy, split: DigitsSplit
):
    async def run() -> list[list[Classification]]:
        async with AsyncTierserveClient(triton.grpc_url, tier_key=triton.tier_key) as sdk:
            tiers = ["critical", "standard", "best_effort"]
            return await asyncio.gather(
                *(sdk.classify(split.test.images[i], tier=tiers[i % 3], user_id=f"u{i}") for i in range(60))
            )

    results = asyncio.run(run())
    # which model answers a row depends on the load this box is under (a loaded CI box sends some rows to
    # the safe default); whichever it was, the row's probabilities are that model's answer for its own image
    artifacts = {lane: model for by_model in policy.lanes.values() for model, lane in by_model.items()}
    for i, (answer,) in enumerate(results):
        assert f"tier={['critical', 'standard', 'best_effort'][i % 3]}" in answer.reason
        model, version = artifacts.get(answer.route, answer.route).split(":")
        expected = grpc.probs(model, split.test.images[i : i + 1], version)[0]
        np.testing.assert_allclose(answer.probs, expected, atol=1e-6, err_msg=f"row {i}: {answer.route}")


def test_any_size_from_4x4_to_64x64_is_accepted(client: TierserveClient, split: DigitsSplit):
    image = split.test.images[5:6]
    for big in (upscaled(image, 2), upscaled(image, 4), upscaled(image, 8)):
        (answer,) = client.classify(big)
        assert answer.label == split.test.labels[5]
        assert f"size={big.shape[1]}x{big.shape[2]}" in answer.reason
    (small,) = client.classify(image[:, ::2, ::2])
    assert "size=4x4" in small.reason


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"tier": "gold"}, "parameter 'tier' must be one of critical, standard, best_effort, got 'gold'"),
        ({"deadline_ms": -3}, "parameter 'deadline_ms' must be a positive integer up to 3600000, got -3"),
    ],
)
def test_a_bad_parameter_is_rejected_by_name(client: TierserveClient, split: DigitsSplit, parameters, message):
    with pytest.raises(TierserveError) as caught:
        client.classify(split.test.images[:1], **parameters)
    assert caught.value.status == (StatusCode.INVALID_ARGUMENT if client.protocol == "grpc" else HTTPStatus.BAD_REQUEST)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, 3, 3), np.float32), "PIXELS images must be 4x4 to 64x64, got 3x3"),
        (np.zeros((1, 65, 8), np.float32), "PIXELS images must be 4x4 to 64x64, got 65x8"),
        (np.full((1, 8, 8), np.inf, np.float32), "PIXELS has 64 infinite value(s)"),
    ],
)
def test_unusable_images_are_rejected_by_name(client: TierserveClient, images: np.ndarray, message: str):
    with pytest.raises(TierserveError) as caught:
        client.classify(images)
    assert caught.value.status == (StatusCode.INVALID_ARGUMENT if client.protocol == "grpc" else HTTPStatus.BAD_REQUEST)
    assert message in caught.value.message


def test_requests_never_reach_a_model_outside_the_policy(
    triton: TritonServer, grpc, client: TierserveClient, split: DigitsSplit, policy: Policy
):
    assert "digits_heavy:1" not in policy.models

    def inference_count() -> int:
        return grpc.client.get_inference_statistics("digits_heavy", "1").model_stats[0].inference_count

    before = inference_count()
    workload = [
        split.test.images[:64],
        pure_noise(8, seed=1),
        with_missing(split.test.images[:8], 0.5, seed=2),
        upscaled(split.test.images[:8], 2),
    ]
    for images in workload:
        client.classify(images, tier="critical")
    tensor = grpc.module.InferInput("PIXELS", [1, 8, 8], "FP32")
    tensor.set_data_from_numpy(split.test.images[:1])
    with pytest.raises(InferenceServerException, match="unknown parameter 'model'"):
        grpc.client.infer("digits", [tensor], parameters={"model": "digits_heavy:1"})
    assert inference_count() == before


def test_the_async_client_over_http(triton: TritonServer, split: DigitsSplit):
    async def run() -> list[Classification]:
        async with AsyncTierserveClient(triton.http_url, protocol="http", tier_key=triton.tier_key) as sdk:
            return await sdk.classify(split.test.images[:3], tier="critical")

    answers = asyncio.run(run())
    assert [a.label for a in answers] == split.test.labels[:3].tolist()
    assert all(a.probs.shape == (10,) and 0 < a.confidence <= 1 for a in answers)


def test_the_demo_prints_a_row_per_route(triton: TritonServer, capsys: pytest.CaptureFixture[str], tmp_path):
    (key := tmp_path / "tier_key").write_text(triton.tier_key)  # the demo sends critical requests too
    assert main(["demo", "--url", triton.grpc_url, "--count", "120", "--seed", "1", "--tier-key-file", str(key)]) == 0
    table = capsys.readouterr().out
    for route in ("digits_light:2", "digits_heavy:3", "digits_missing:1", "digits_rules:1"):
        assert f"| {route} |" in table
    assert "rule out_of_distribution" in table and "rule missing_pixels" in table
    assert "120 requests, accuracy" in table


def test_the_routers_threads_are_named_for_the_os(triton: TritonServer, split: DigitsSplit):
    """top -H, py-spy and perf/bench_stub_cpu.py tell a router stub's threads apart by the names the OS shows."""
    with TierserveClient(triton.grpc_url) as client:
        client.classify(split.test.images[0])
    routers = [stub for stub in triton.stubs() if stub.model == ROUTER_MODEL]
    assert routers, "the router's stubs run"
    for stub in routers:
        names = {(task / "comm").read_text().strip() for task in Path(f"/proc/{stub.pid}/task").iterdir()}
        # every instance ran executes already: the warm-up's at load
        expected = {"router-execute", "router-queue", "router-states", "router-counts", "router-metrics"}
        assert expected <= names, (stub.instance, sorted(names))
