"""Service tiers on a real server of their own (bounded floods, loopback only): critical work is served
first and never shed, best_effort is shed first with a clear error, and the tier metrics move."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from grpc import StatusCode

from tierserve.client import AsyncTierserveClient, TierserveClient, TierserveError
from tierserve.faults import FaultSpec
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.model_control import ModelControl
from tierserve.tools.repository_variants import policy_variant, shipped_policy
from tierserve.tools.server import Ports, TritonServer
from tierserve.tools.workload import noisy

from .prometheus import metric_values

# low thresholds so that a modest flood on 2 cores is overload for these servers
SHEDDING = {"degrade_best_effort_at_ms": 1, "shed_best_effort_at_ms": 5, "shed_standard_at_ms": 10_000}
DEGRADING = {"degrade_best_effort_at_ms": 1, "shed_best_effort_at_ms": 10_000, "shed_standard_at_ms": 10_000}


@contextlib.contextmanager
def _server(model_repository: Path, workdir: Path, shedding: dict) -> Iterator[TritonServer]:
    repository = workdir / "repository"
    repository.mkdir()
    policy_variant(model_repository, repository, {**shipped_policy(model_repository), "load_shedding": shedding})
    with (
        (workdir / "tritonserver.log").open("wb") as log,
        TritonServer(repository, Ports.free(), workdir, output=log) as server,
    ):
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def tiered(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with _server(model_repository, tmp_path_factory.mktemp("tiers"), SHEDDING) as server:
        yield server


@pytest.fixture(autouse=True)
def calm(tiered: TritonServer, split: DigitsSplit) -> None:
    """Each test starts on a calm server: the last flood's queue wait has left the moving average."""
    deadline = time.monotonic() + 15
    with TierserveClient(tiered.grpc_url, tier_key=tiered.tier_key) as client:
        while time.monotonic() < deadline:
            client.classify(split.test.images[0], tier="critical")
            if max(metric_values(tiered, "tierserve_router_queue_wait_ms"), default=0.0) < 1.0:
                return
            time.sleep(0.2)
    pytest.fail("the server did not calm down after the last flood")


async def _flood(server: TritonServer, images: np.ndarray, best_effort: int, critical: int) -> tuple[list, list]:
    """Queue `best_effort` requests at once, then `critical` ones; return (tier, seconds, outcome) of each."""
    async with AsyncTierserveClient(server.grpc_url, tier_key=server.tier_key) as client:

        async def one(tier: str, image: np.ndarray):
            sent = time.monotonic()
            try:
                result = await client.classify(image, tier=tier)
            except TierserveError as error:
                result = error
            return tier, time.monotonic() - sent, result

        flood = [asyncio.ensure_future(one("best_effort", images[i % len(images)])) for i in range(best_effort)]
        await asyncio.sleep(0.01)  # the flood is queued before the critical requests arrive
        urgent = [asyncio.ensure_future(one("critical", images[i % len(images)])) for i in range(critical)]
        return list(await asyncio.gather(*flood)), list(await asyncio.gather(*urgent))


def test_critical_requests_are_never_shed_and_best_effort_is_shed_with_a_clear_error(
    tiered: TritonServer, split: DigitsSplit
):
    flood, urgent = asyncio.run(_flood(tiered, split.test.images, best_effort=800, critical=10))
    assert all(not isinstance(result, Exception) for _, _, result in urgent), "no critical request failed"
    shed = [result for _, _, result in flood if isinstance(result, Exception)]
    assert shed, "the flood is overload for this server: some best_effort work is shed"
    for error in shed:
        assert error.status == StatusCode.UNAVAILABLE
        assert "best_effort request shed: router queue wait" in error.message and "sheds best_effort" in error.message


def _ready() -> bool:
    """Submitted first, so the flood's process has started and imported this module before the flood is timed."""
    return True


def _flood_from_elsewhere(grpc_url: str, tier_key: str, tier: str, requests: list[np.ndarray]) -> int:
    """Run in a process of its own, so that its client work leaves this process's alone: send `requests` (images
    each) at once at `tier`; return how many were answered."""

    async def flood() -> int:
        async with AsyncTierserveClient(grpc_url, tier_key=tier_key) as client:
            answers = await asyncio.gather(*(client.classify(images, tier=tier) for images in requests))
            return len(answers)

    return asyncio.run(flood())


def _router_queue(server: TritonServer) -> tuple[float, float]:
    """(requests that have reached the router so far, requests queued for it now), from Triton's own counts."""

    def total(name: str) -> float:
        return sum(metric_values(server, name, settle_s=0, model="router"))

    queued = total("nv_inference_pending_request_count")
    return total("nv_inference_request_success") + total("nv_inference_request_failure") + queued, queued


async def _classify_each(server: TritonServer, images: np.ndarray, tier: str) -> list:
    """One request per image, all at once; the answers of each."""
    async with AsyncTierserveClient(server.grpc_url, tier_key=server.tier_key) as client:
        return list(await asyncio.gather(*(client.classify(image, tier=tier) for image in images)))


FLOOD_REQUESTS, FLOOD_ROWS = 600, 8  # noisy images, so that many rows escalate: the flood's backlog drains slowly


def test_critical_requests_overtake_queued_work_of_lower_tiers(tiered: TritonServer, split: DigitsSplit):
    """Judged by Triton's own queue, not by latency: when the critical answers are back, standard requests queued
    before them still wait. Latency would not show it: a client sending hundreds of requests at once delays its
    own sends and reads by more than the server does, and Triton 2.51's batcher can stall a model's whole queue
    for 0.5 s (README: Errors), which delays the queued flood as much as the critical requests, so leaves this
    order alone. A standard flood, because this server sheds best_effort at once, and shed requests leave the
    queue too fast for a backlog to form."""
    images = noisy(split.test.images, sigma=4.0, seed=3)
    starts = np.arange(FLOOD_REQUESTS) * FLOOD_ROWS % (len(images) - FLOOD_ROWS)
    requests = [images[start : start + FLOOD_ROWS] for start in starts]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_ready).result()
        arrived_before, _ = _router_queue(tiered)
        flood = pool.submit(_flood_from_elsewhere, tiered.grpc_url, tiered.tier_key, "standard", requests)
        deadline = time.monotonic() + 60
        while (queue := _router_queue(tiered))[0] < arrived_before + FLOOD_REQUESTS:
            assert time.monotonic() < deadline, "the whole flood reached the router within 60 s"
        queued_before = queue[1]
        urgent = asyncio.run(_classify_each(tiered, split.test.images[:10], "critical"))
        _, queued_after = _router_queue(tiered)
        assert flood.result() == FLOOD_REQUESTS, "every standard request was answered"
    assert queued_before >= 100, "the flood was a backlog: most of it still queued when the critical requests came"
    assert [len(answers) for answers in urgent] == [1] * 10
    assert queued_after > 0, (
        f"the critical requests were answered while standard requests queued before them still waited "
        f"({queued_before:.0f} queued when they came, {queued_after:.0f} when they were answered)"
    )


def test_degraded_best_effort_answers_say_so(model_repository: Path, tmp_path: Path, split: DigitsSplit):
    # noisy images, so that most rows want the escalation that degradation skips; a flood long enough for the
    # load gauge to stay past the threshold for sustain_s on a warm server
    images = noisy(split.test.images, sigma=4.0, seed=5)
    with _server(model_repository, tmp_path, DEGRADING) as server:
        flood, _ = asyncio.run(_flood(server, images, best_effort=600, critical=1))
    answers = [answer for _, _, result in flood if not isinstance(result, Exception) for answer in result]
    degraded = [a for a in answers if "escalation skipped, degraded: router queue wait" in a.reason]
    assert degraded and all(a.path == "digits_light:2 ok" for a in degraded)


def test_tier_metrics_move(tiered: TritonServer, split: DigitsSplit):
    def total(name: str, **labels: str) -> float:
        return sum(metric_values(tiered, name, **labels))

    before = {tier: total("tierserve_rows_total", tier=tier, outcome="direct") for tier in ("critical", "standard")}
    shed_before = total("tierserve_rows_total", tier="best_effort", outcome="shed")
    with TierserveClient(tiered.grpc_url, tier_key=tiered.tier_key) as client:
        for tier in ("critical", "standard"):
            client.classify(split.test.images[:3], tier=tier)
    asyncio.run(_flood(tiered, split.test.images, best_effort=800, critical=1))
    for tier in ("critical", "standard"):
        assert total("tierserve_rows_total", tier=tier, outcome="direct") >= before[tier] + 3
    assert total("tierserve_rows_total", tier="best_effort", outcome="shed") > shed_before
    assert total("tierserve_request_latency_seconds_count", tier="critical") >= 2
    assert metric_values(tiered, "tierserve_error_budget_burn", tier="critical")
    assert metric_values(tiered, "tierserve_router_queue_wait_ms")


def test_a_deadline_too_short_for_the_heavy_model_gets_the_light_answer_with_the_reason(
    tiered: TritonServer, split: DigitsSplit
):
    control = ModelControl(tiered.http_url, tiered.admin_key)
    control.set_fault("digits_heavy", FaultSpec(latency_ms=60))
    try:
        with TierserveClient(tiered.grpc_url, tier_key=tiered.tier_key) as client:
            # with a roomy deadline escalations reach the slow heavy model, which teaches each router
            # instance's moving average how long it now takes
            for _ in range(16):
                warm = client.classify(split.test.images[:32], tier="standard", deadline_ms=500)
                assert any(a.path.endswith("digits_heavy:3 ok") for a in warm)
            answers = client.classify(split.test.images[:32], tier="standard", deadline_ms=40)
    finally:
        control.set_fault("digits_heavy", FaultSpec())
        control.close()
    skipped = [a for a in answers if "escalation skipped:" in a.reason]
    assert skipped, "some images wanted the heavy model"
    for answer in skipped:
        assert answer.route == "digits_light:2" and answer.path == "digits_light:2 ok"
        assert "ms left of the standard budget, digits_heavy:3 takes ~" in answer.reason
