"""Clients for the session's tritonserver, over both protocols, a helper to send images, and servers of a
module's own."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tierserve.client import TierserveClient
from tierserve.learned_router import escalation_inputs
from tierserve.resize import source_stats
from tierserve.router_files import ROUTER_MODEL, STATS_FILE
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.server import Ports, TritonServer
from tierserve.tools.supervisor import Supervisor


@contextlib.contextmanager
def supervised_server(
    model_repository: Path,
    workdir: Path,
    on_ready: Callable[[TritonServer], None] | None = None,
    **options: Any,
) -> Iterator[Supervisor]:
    """A supervised tritonserver of its own on free ports, logging to `workdir`/tritonserver.log: for tests that
    kill, restart or reconfigure it, away from the session's server. `on_ready` runs after every start and restart,
    as `tierserve serve` runs its own; `options` go to TritonServer (state, ...)."""
    with (workdir / "tritonserver.log").open("wb") as log:
        server = TritonServer(model_repository, Ports.free(), workdir, output=log, **options)
        with Supervisor(server, on_ready=(lambda: on_ready(server)) if on_ready else lambda: None) as supervisor:
            yield supervisor


def escalated_images(server: TritonServer, images: np.ndarray, at_most: int = 32) -> np.ndarray:
    """Of `images`, those (at most `at_most`) the cascade escalates to a heavy model at the standard tier and at the
    critical tier (each tier has its own thresholds)."""
    escalated = np.ones(len(images), bool)
    with TierserveClient(server.grpc_url, tier_key=server.tier_key) as client:
        for tier in ("standard", "critical"):
            answers = [
                a for start in range(0, len(images), 64) for a in client.classify(images[start : start + 64], tier=tier)
            ]
            escalated &= [a.route.startswith("digits_heavy") for a in answers]
    assert escalated.sum() >= 5
    return images[escalated][:at_most]


def learned_router_inputs(
    repository: Path, images: np.ndarray, probs: np.ndarray, tier: str = "standard"
) -> np.ndarray:
    """What the router's learned routers read for `images` sent as they are at `tier`, the first model having
    answered `probs`: computed here, in-process, from the repository's training statistics."""
    stats = TrainingStats.load(repository / ROUTER_MODEL / "1" / STATS_FILE)
    rows = signatures(images, source_stats(images), [RequestContext(tier=tier)] * len(images), stats)
    return escalation_inputs(rows, probs, images)


@pytest.fixture(scope="session")
def doubted_image(triton: TritonServer, split: DigitsSplit) -> np.ndarray:
    """One test image the cascade escalates at the standard and the critical tier, whatever the thresholds."""
    return escalated_images(triton, split.test.images[:64], at_most=1)[0]


@dataclass
class Triton:
    """A tritonclient of one protocol, with the module that builds its inputs."""

    protocol: str
    module: ModuleType
    client: grpcclient.InferenceServerClient | httpclient.InferenceServerClient

    def infer(self, model: str, pixels: np.ndarray, version: str = "", datatype: str = "FP32"):
        tensor = self.module.InferInput("PIXELS", list(pixels.shape), datatype)
        tensor.set_data_from_numpy(pixels)
        return self.client.infer(model, [tensor], model_version=version)

    def model_version(self, result) -> str:
        response = result.get_response()
        return response["model_version"] if self.protocol == "http" else response.model_version

    def probs(self, model: str, pixels: np.ndarray, version: str = "") -> np.ndarray:
        return self.infer(model, pixels.astype(np.float32), version).as_numpy("PROBS")


def _client(protocol: str, server: TritonServer) -> Triton:
    if protocol == "grpc":
        return Triton(protocol, grpcclient, grpcclient.InferenceServerClient(server.grpc_url))
    return Triton(protocol, httpclient, httpclient.InferenceServerClient(server.http_url, concurrency=4))


@pytest.fixture(params=["http", "grpc"])
def triton_client(request: pytest.FixtureRequest, triton: TritonServer) -> Iterator[Triton]:
    """A client of each protocol: every test using it runs once over HTTP and once over gRPC."""
    client = _client(request.param, triton)
    yield client
    client.client.close()


@pytest.fixture
def grpc(triton: TritonServer) -> Iterator[Triton]:
    client = _client("grpc", triton)
    yield client
    client.client.close()


@pytest.fixture
def grpc_sdk(triton: TritonServer) -> Iterator[TierserveClient]:
    with TierserveClient(triton.grpc_url, tier_key=triton.tier_key) as sdk:
        yield sdk
