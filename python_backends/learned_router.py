"""The learned router: predicts from the signature and the first model's answer whether that answer is wrong."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tierserve.signature import Signature

FEATURES = ("confidence", "margin", "entropy", "missing_fraction", "out_of_range_fraction", "sparsity",
            "ood_score", "log_area")


def escalation_features(signatures: list[Signature], probs: np.ndarray) -> np.ndarray:
    """[N, len(FEATURES)]: how sure the first model is, and how unusual the image is."""
    ordered = np.sort(probs, axis=1)
    entropy = -(probs * np.log(np.clip(probs, 1e-9, 1.0))).sum(axis=1)
    cues = np.array([[s.missing_fraction, s.out_of_range_fraction, s.sparsity, s.ood_score,
                      np.log(s.height * s.width / 64.0)] for s in signatures], np.float32).reshape(-1, 5)
    return np.column_stack([ordered[:, -1], ordered[:, -1] - ordered[:, -2], entropy, cues]).astype(np.float32)


@dataclass(frozen=True)
class LearnedRouter:
    """Standardised logistic regression over FEATURES; trained by `tierserve build`, evaluated in numpy."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float

    @classmethod
    def load(cls, path: Path) -> LearnedRouter:
        return cls(**json.loads(path.read_text()))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def wrong_probability(self, features: np.ndarray) -> np.ndarray:
        """[N] probability that the first model's answer is wrong."""
        z = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept)))
