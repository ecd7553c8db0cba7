"""Runners compute probabilities the same way inside and outside Triton."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tierserve.runners import CentroidRunner, OnnxRunner, runner_for


def _centroid_runner() -> CentroidRunner:
    centroids = np.zeros((10, 64), np.float32)
    for k in range(10):
        centroids[k, k * 6 : (k + 1) * 6] = 16.0  # each class lights up its own strip of pixels
    return CentroidRunner(centroids, temperature=4.0)


def test_centroid_runner_picks_the_nearest_centroid():
    runner = _centroid_runner()
    probs = runner.infer(runner.centroids.reshape(10, 8, 8))
    assert probs.shape == (10, 10)
    np.testing.assert_array_equal(probs.argmax(axis=1), np.arange(10))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_centroid_runner_ignores_missing_pixels():
    runner = _centroid_runner()
    image = runner.centroids[3].reshape(1, 8, 8).copy()
    image[0, 5:, :] = np.nan  # the lower rows are missing; class 3's strip is in the upper rows
    assert runner.infer(image).argmax() == 3


def test_centroid_runner_abstains_on_an_image_with_no_pixels():
    probs = _centroid_runner().infer(np.full((1, 8, 8), np.nan, np.float32))
    np.testing.assert_allclose(probs, 0.1, rtol=1e-6)


def test_centroid_runner_temperature_sets_confidence():
    runner = _centroid_runner()
    image = runner.centroids[0].reshape(1, 8, 8) * 0.5
    sharp = CentroidRunner(runner.centroids, temperature=1.0).infer(image).max()
    soft = CentroidRunner(runner.centroids, temperature=100.0).infer(image).max()
    assert sharp > soft


def test_centroid_runner_round_trips_through_bytes(tmp_path: Path):
    runner = _centroid_runner()
    path = tmp_path / "centroids.npz"
    path.write_bytes(runner.to_bytes())
    loaded = CentroidRunner.load(path)
    np.testing.assert_array_equal(loaded.centroids, runner.centroids)
    assert loaded.temperature == runner.temperature


def test_centroid_runner_rejects_centroids_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(10, 64\)"):
        CentroidRunner(np.zeros((10, 63), np.float32), temperature=1.0)


def _softmax_onnx(path: Path, weights: np.ndarray) -> None:
    """pixels [N, 64] @ weights [64, 10] -> Softmax, named as the runner convention wants."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixels", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "softmax_regression",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_onnx_runner_flattens_images_and_returns_probabilities(tmp_path: Path):
    weights = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32) * 0.1
    _softmax_onnx(tmp_path / "model.onnx", weights)
    images = np.random.default_rng(1).uniform(0, 16, size=(5, 8, 8)).astype(np.float32)
    runner = OnnxRunner(tmp_path / "model.onnx", accepts_missing=False)
    logits = images.reshape(5, 64) @ weights
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    probs = runner.infer(images)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert runner.accepts_missing is False


def test_runner_for_names_the_unknown_runtime(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'"):
        runner_for("tensorflow", tmp_path / "model.pb", accepts_missing=False)


@pytest.mark.parametrize("value", [1e38, np.finfo(np.float32).max, -np.finfo(np.float32).max])
def test_the_safe_default_answers_extreme_finite_images_with_finite_probabilities(value):
    runner = CentroidRunner(np.random.default_rng(0).uniform(0, 16, (10, 64)), temperature=1.0)
    images = np.zeros((3, 8, 8), np.float32)
    images[0, 3, 3] = value
    images[1] = value
    images[2, 0, 0] = np.nan
    probs = runner.infer(images)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
