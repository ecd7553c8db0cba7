"""Every reference model served by a real tritonserver: answers, fidelity to its artifact, accuracy, versions."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tierserve.manifest import Manifest
from tierserve.runners import CentroidRunner
from tierserve.tools.build_models import MODEL_SPECS
from tierserve.tools.dataset import DigitsSplit, mask_pixels

VERSIONS = [(spec.model, str(spec.version)) for spec in MODEL_SPECS]
ids = [f"{model}:{version}" for model, version in VERSIONS]


def _direct_probs(version_dir: Path, images: np.ndarray) -> np.ndarray:
    """The same artifact run outside Triton: ONNX Runtime on the ONNX file, or the centroids in numpy."""
    manifest = Manifest.read(version_dir)
    artifact = version_dir / manifest.artifact
    if manifest.runtime == "centroids":
        return CentroidRunner.load(artifact).infer(images)
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"pixels": images.reshape(len(images), 64)})[0]


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=ids)
def test_each_model_answers_with_a_distribution(triton_client, split: DigitsSplit, model: str, version: str):
    probs = triton_client.probs(model, split.test.images[:5], version)
    assert probs.shape == (5, 10)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=ids)
def test_served_outputs_equal_the_artifact_run_directly(
    grpc, model_repository: Path, split: DigitsSplit, model: str, version: str
):
    images = split.test.images[:64]
    served = grpc.probs(model, images, version)
    np.testing.assert_allclose(served, _direct_probs(model_repository / model / version, images), atol=1e-6)


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=ids)
def test_accuracy_through_the_server_equals_the_manifest(
    grpc, model_repository: Path, split: DigitsSplit, model: str, version: str
):
    predictions = np.concatenate(
        [
            grpc.probs(model, split.test.images[start : start + 64], version).argmax(axis=1)
            for start in range(0, len(split.test.images), 64)
        ]
    )
    manifest = Manifest.read(model_repository / model / version)
    assert float((predictions == split.test.labels).mean()) == manifest.test_accuracy


@pytest.mark.parametrize("model", ["digits_missing", "digits_rules"])
def test_models_that_accept_missing_pixels_answer_them(
    triton_client, model_repository: Path, split: DigitsSplit, model: str
):
    images = mask_pixels(split.test.images[:32], 0.4, seed=3)
    served = triton_client.probs(model, images)
    np.testing.assert_allclose(served, _direct_probs(model_repository / model / "1", images), atol=1e-6)
    assert (served.argmax(axis=1) == split.test.labels[:32]).mean() > 0.7


def test_every_heavy_version_is_addressable_and_unversioned_requests_get_the_latest(triton_client, split: DigitsSplit):
    images = split.test.images[:16]
    by_version = {version: triton_client.probs("digits_heavy", images, version) for version in ("1", "2", "3")}
    assert not np.allclose(by_version["1"], by_version["2"]), "versions 1 and 2 are different networks"
    assert not np.allclose(by_version["2"], by_version["3"]), "version 3 is the torch CNN"
    latest = triton_client.infer("digits_heavy", images)
    assert triton_client.model_version(latest) == "3"
    np.testing.assert_array_equal(latest.as_numpy("PROBS"), by_version["3"])


def test_dynamic_batching_forms_batches_under_concurrent_load(grpc, split: DigitsSplit):
    def counts() -> tuple[int, int]:
        stats = grpc.client.get_inference_statistics("digits_heavy", "1").model_stats[0]
        return stats.inference_count, stats.execution_count

    inferences_before, executions_before = counts()
    results, errors = [], []
    requests = 200
    for i in range(requests):
        tensor = grpc.module.InferInput("PIXELS", [1, 8, 8], "FP32")
        tensor.set_data_from_numpy(split.test.images[i % 64][None])
        grpc.client.async_infer(
            "digits_heavy",
            [tensor],
            model_version="1",
            callback=lambda result, error: (errors if error else results).append(result),
        )
    deadline = time.monotonic() + 60
    while len(results) + len(errors) < requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not errors
    assert len(results) == requests
    inferences_after, executions_after = counts()
    assert inferences_after - inferences_before == requests
    assert executions_after - executions_before < requests, "the dynamic batcher never merged requests"
