"""The learned router: predicts from the signature, the first model's answer and the image whether that answer is
wrong."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.pixels import IMAGE_SHAPE, NUM_CLASSES, PIXEL_MAX
from tierserve.signature import Signature

FEATURES = (
    "confidence",
    "margin",
    "entropy",
    "missing_fraction",
    "out_of_range_fraction",
    "sparsity",
    "ood_score",
    "log_area",
)
# what the learned router reads per row: the signature's features, the first model's probabilities and the native
# pixels (scaled to 0-1, missing as 0): noise and shifts the light model answers confidently wrong show in the pixels
INPUTS = (
    *FEATURES,
    *(f"prob_{k}" for k in range(NUM_CLASSES)),
    *(f"pixel_{i}" for i in range(IMAGE_SHAPE[0] * IMAGE_SHAPE[1])),
)


def escalation_features(signatures: list[Signature], probs: np.ndarray) -> np.ndarray:
    """[N, len(FEATURES)]: how sure the first model is, and how unusual the image is."""
    features = np.empty((len(signatures), len(FEATURES)), np.float32)
    top_two = np.partition(probs, -2, axis=1)[:, -2:]
    features[:, 0] = top_two[:, 1]
    features[:, 1] = top_two[:, 1] - top_two[:, 0]
    features[:, 2] = -(probs * np.log(np.clip(probs, 1e-9, 1.0))).sum(axis=1)
    features[:, 3:] = [
        [s.missing_fraction, s.out_of_range_fraction, s.sparsity, s.ood_score, math.log(s.height * s.width / 64.0)]
        for s in signatures
    ]
    return features


def escalation_inputs(signatures: list[Signature], probs: np.ndarray, images: np.ndarray) -> np.ndarray:
    """[N, len(INPUTS)]: the escalation features, the first model's probabilities and the native images' pixels."""
    inputs = np.empty((len(images), len(INPUTS)), np.float32)
    first_pixel = len(FEATURES) + NUM_CLASSES
    inputs[:, : len(FEATURES)] = escalation_features(signatures, probs)
    inputs[:, len(FEATURES) : first_pixel] = probs
    pixels = inputs[:, first_pixel:]
    np.multiply(images.reshape(len(images), -1), 1.0 / PIXEL_MAX, out=pixels)
    if np.isnan(pixels).any():  # missing pixels read as blank (the cascade's first model never gets them)
        np.nan_to_num(pixels, copy=False, nan=0.0)
    return inputs


_ARRAYS = ("mean", "scale", "hidden_weights", "hidden_bias", "output_weights")  # LearnedRouter's, as stored
# the stored file's key for the routers trained for other versions of the first model (experiments, a rollback)
ALTERNATES_KEY = "alternates"


@dataclass(frozen=True)
class LearnedRouter:
    """A small MLP (standardised INPUTS, one ReLU hidden layer, logistic output) that predicts whether the cascade's
    first model answered a row wrongly; trained by `tierserve build`, evaluated in numpy."""

    mean: np.ndarray  # [len(INPUTS)]
    scale: np.ndarray  # [len(INPUTS)]
    hidden_weights: np.ndarray  # [len(INPUTS), H]
    hidden_bias: np.ndarray  # [H]
    output_weights: np.ndarray  # [H]
    output_bias: float
    # the first model whose answers it was trained to doubt ("" when unsaid: the policy's cascade.first); its doubts
    # say nothing about another model's answers
    judges: str = ""

    @classmethod
    def load(cls, path: Path) -> LearnedRouter:
        return cls.from_dict(json.loads(path.read_text()), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path | str) -> LearnedRouter:
        """The router stored as `data` (read from `where`); ValueError when it was trained on other inputs or does not
        say which first model it judges (an older build)."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} is not a stored learned router: rebuild (tierserve build)")
        if tuple(data.get("inputs", ())) != INPUTS:
            raise ValueError(f"{where} was trained on other inputs than this router reads: rebuild (tierserve build)")
        if not isinstance(data.get("first_model"), str):
            raise ValueError(f"{where} does not say which first model it judges: rebuild (tierserve build)")
        arrays = (np.asarray(data[key], np.float32) for key in _ARRAYS)
        return cls(*arrays, float(data["output_bias"]), data["first_model"])

    def to_dict(self) -> dict[str, Any]:
        """The router as stored (JSON types), read back by from_dict."""
        return {
            "inputs": INPUTS,
            **{key: getattr(self, key).tolist() for key in _ARRAYS},
            "output_bias": self.output_bias,
            "first_model": self.judges,
        }

    @functools.cached_property
    def _folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The hidden layer with the standardisation folded in: ((x - mean) / scale) @ W + b = x @ W' + b'."""
        weights = self.hidden_weights / self.scale[:, None]
        return weights.astype(np.float32), (self.hidden_bias - (self.mean / self.scale) @ self.hidden_weights)

    def wrong_probability(self, inputs: np.ndarray) -> np.ndarray:
        """[N] probability that the first model's answer is wrong, from escalation_inputs."""
        weights, bias = self._folded
        hidden = np.maximum(inputs @ weights + bias, 0.0)
        logits = hidden @ self.output_weights + self.output_bias
        return 1.0 / (1.0 + np.exp(-logits))


def learned_routers(data: dict[str, Any], where: Path | str) -> tuple[LearnedRouter, tuple[LearnedRouter, ...]]:
    """A stored file's learned router (it judges the policy's cascade.first) and its alternates, each trained for
    another version of that model that experiments or a promotion may put first; ValueError as from_dict."""
    learned = LearnedRouter.from_dict(data, where)  # first: it refuses a file that is not a mapping
    alternates = data.get(ALTERNATES_KEY, [])
    if not isinstance(alternates, list):
        raise ValueError(f"{where}: {ALTERNATES_KEY} must be a list: rebuild (tierserve build)")
    return learned, tuple(
        LearnedRouter.from_dict(alternate, f"{where} {ALTERNATES_KEY}[{i}]") for i, alternate in enumerate(alternates)
    )


def load_learned_routers(path: Path) -> tuple[LearnedRouter, tuple[LearnedRouter, ...]]:
    return learned_routers(json.loads(path.read_text()), path)
