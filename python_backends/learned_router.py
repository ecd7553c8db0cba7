"""The learned router: predicts from the signature and the first model's answer whether that answer is wrong."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


@dataclass(frozen=True)
class LearnedRouter:
    """Standardised logistic regression over FEATURES; trained by `tierserve build`, evaluated in numpy."""

    mean: np.ndarray  # [len(FEATURES)]
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def load(cls, path: Path) -> LearnedRouter:
        data = json.loads(path.read_text())
        if tuple(data["features"]) != FEATURES:
            raise ValueError(f"{path} was trained on features {data['features']}, not {list(FEATURES)}: rebuild")
        return cls(*(np.asarray(data[key], np.float32) for key in ("mean", "scale", "coef")), float(data["intercept"]))

    def to_json(self) -> str:
        return json.dumps(
            {
                "features": FEATURES,
                "mean": self.mean.tolist(),
                "scale": self.scale.tolist(),
                "coef": self.coef.tolist(),
                "intercept": self.intercept,
            }
        )

    def wrong_probability(self, features: np.ndarray) -> np.ndarray:
        """[N] probability that the first model's answer is wrong."""
        logits = ((features - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))
