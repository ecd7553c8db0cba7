"""Runners: the one interface through which every served model turns images into class probabilities.

Routing and Triton glue never know which runtime answers; a runner is picked from the version's manifest.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Protocol

import numpy as np

from tierserve.manifest import Manifest
from tierserve.pixels import NUM_CLASSES, bounded


class Runner(Protocol):
    """Computes class probabilities for a batch of 8x8 images."""

    accepts_missing: bool

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Map float32 images [N, 8, 8] to float32 probabilities [N, 10]."""
        ...


class OnnxRunner:
    """An ONNX model over flattened images [N, 64] with a `probabilities` output, run by ONNX Runtime."""

    def __init__(self, path: Path, accepts_missing: bool, threads: int = 1) -> None:
        import onnxruntime as ort  # deferred: only ONNX-served models pay for the import

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.accepts_missing = accepts_missing

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        flat = pixels.reshape(len(pixels), -1)
        (probs,) = self._session.run(["probabilities"], {self._input: flat})
        return probs.astype(np.float32, copy=False)


class CentroidRunner:
    """Nearest class centroid over the observed pixels: the rule-based safe default.

    Distances use only the pixels that are present, so it answers any image, even one with missing
    pixels; an image with none present gets the uniform distribution. A temperature fitted on the
    validation split turns distances into calibrated probabilities.
    """

    accepts_missing = True

    def __init__(self, centroids: np.ndarray, temperature: float) -> None:
        if centroids.shape != (NUM_CLASSES, 64):
            raise ValueError(f"centroids must have shape (10, 64), got {centroids.shape}")
        self.centroids = centroids.astype(np.float32)
        self.temperature = float(temperature)

    @classmethod
    def load(cls, path: Path) -> CentroidRunner:
        with np.load(path) as data:
            return cls(data["centroids"], float(data["temperature"]))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, centroids=self.centroids, temperature=np.float32(self.temperature))
        return buffer.getvalue()

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        flat = bounded(pixels.reshape(len(pixels), 1, -1))  # any finite image, even FLT_MAX, stays finite
        observed = ~np.isnan(flat)
        diff = np.where(observed, flat - self.centroids[None], 0.0)
        mean_sq = (diff**2).sum(axis=-1) / np.maximum(observed.sum(axis=-1), 1)
        logits = -mean_sq / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def runner_for(runtime: str, artifact: Path, accepts_missing: bool) -> Runner:
    """The runner that serves `artifact` with the named runtime."""
    if runtime == "onnxruntime":
        return OnnxRunner(artifact, accepts_missing)
    if runtime == "centroids":
        return CentroidRunner.load(artifact)
    raise ValueError(f"{artifact}: unknown runtime {runtime!r}; expected 'onnxruntime' or 'centroids'")


def load_runner(version_dir: Path) -> Runner:
    """The runner for a built model version, chosen by its manifest."""
    manifest = Manifest.read(version_dir)
    return runner_for(manifest.runtime, version_dir / manifest.artifact, manifest.accepts_missing)
