"""The compact feature signature of one image request: what the policy looks at to choose a route."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TIERS = ("critical", "standard", "best_effort")  # in priority order: Triton priority 1, 2, 3


def triton_priority(tier: str) -> int:
    """The Triton request priority of a tier (1 is served first); configs use priority_levels: 3."""
    return TIERS.index(tier) + 1


STD_FLOOR = 1.0  # pixels that never vary in training (the borders) still get a finite z-score


@dataclass(frozen=True)
class RequestContext:
    """What the client said about a request: its service tier, who sent it, and its deadline."""

    tier: str = "standard"
    user_id: str = ""
    deadline_ms: int | None = None
    attributes: Mapping[str, str | int] = field(default_factory=dict)  # the policy's declared attributes it sent


@dataclass(frozen=True)
class TrainingStats:
    """Per-pixel statistics of the training images, saved at build time, for the out-of-distribution score.

    The raw score is the root-mean-square z-score over a row's observed pixels; it is divided by its
    99th percentile on the validation split, so 1.0 means "as unusual as the 1% oddest clean images".
    """

    mean: np.ndarray  # [64] float32
    std: np.ndarray  # [64] float32, at least STD_FLOOR
    raw_score_p99: float

    @classmethod
    def fit(cls, train: np.ndarray, validation: np.ndarray) -> TrainingStats:
        flat = train.reshape(len(train), -1)
        unscaled = cls(
            flat.mean(axis=0).astype(np.float32), np.maximum(flat.std(axis=0), STD_FLOOR).astype(np.float32), 1.0
        )
        return cls(unscaled.mean, unscaled.std, float(np.percentile(unscaled.ood_scores(validation), 99)))

    @classmethod
    def load(cls, path: Path) -> TrainingStats:
        data = json.loads(path.read_text())
        return cls(
            np.asarray(data["mean"], np.float32), np.asarray(data["std"], np.float32), float(data["raw_score_p99"])
        )

    def to_json(self) -> str:
        return json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist(), "raw_score_p99": self.raw_score_p99})

    def ood_scores(self, images: np.ndarray) -> np.ndarray:
        """[N] out-of-distribution scores of 8x8 images (NaN pixels are left out)."""
        z = (images.reshape(len(images), -1) - self.mean) / self.std
        observed = ~np.isnan(z)
        squares = np.square(z, where=observed, out=np.zeros_like(z))
        raw = np.sqrt(squares.sum(axis=1) / np.maximum(observed.sum(axis=1), 1))
        return raw / np.float32(self.raw_score_p99)


@dataclass(frozen=True)
class Signature:
    """Cues of one image (as sent and as resized) plus its request's context."""

    height: int
    width: int
    missing_fraction: float
    out_of_range_fraction: float
    sparsity: float  # fraction of observed native pixels that are blank (< 1)
    ood_score: float
    tier: str
    user_id: str
    deadline_ms: int | None

    def cues(self) -> str:
        """The signature as an operator reads it in REASON."""
        deadline = "none" if self.deadline_ms is None else f"{self.deadline_ms}ms"
        return (
            f"size={self.height}x{self.width} missing={self.missing_fraction:.2f} "
            f"out_of_range={self.out_of_range_fraction:.2f} sparsity={self.sparsity:.2f} "
            f"ood={self.ood_score:.2f} tier={self.tier} deadline={deadline}"
        )


def signatures(
    images: np.ndarray, source: np.ndarray, contexts: Sequence[RequestContext], stats: TrainingStats
) -> list[Signature]:
    """One signature per row: `images` [N, 8, 8] resized, `source` [N, 4] from `resize.source_stats`,
    `contexts` the request context of each row. One call serves a whole batch: numpy's cost is per call."""
    flat = images.reshape(len(images), -1)
    observed = ~np.isnan(flat)
    blank = (flat < 1.0).sum(axis=1) / np.maximum(observed.sum(axis=1), 1)  # NaN < 1 is False
    ood = stats.ood_scores(images)
    return [
        Signature(
            int(height),
            int(width),
            float(missing),
            float(out_of_range),
            float(sparsity),
            float(score),
            context.tier,
            context.user_id,
            context.deadline_ms,
        )
        for (height, width, missing, out_of_range), sparsity, score, context in zip(
            source.tolist(), blank.tolist(), ood.tolist(), contexts, strict=True
        )
    ]
