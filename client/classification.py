"""What a `digits` request carries and what comes back, independent of protocol and sync/async."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

OUTPUTS = ("LABEL", "PROBS", "CONFIDENCE", "ROUTE", "REASON", "PATH")
MODEL = "digits"


@dataclass(frozen=True)
class Classification:
    """One image's answer: the label, the class probabilities, and which route answered and why."""

    label: int
    probs: np.ndarray
    confidence: float
    route: str  # model:version that produced the answer
    reason: str  # the rule or cascade decision and the cues behind it
    path: str  # every model tried, in order, with its outcome


def as_pixels(images: Any) -> np.ndarray:
    """Images as the server wants them: float32 [N, H, W]; a single [H, W] image becomes N = 1."""
    pixels = np.asarray(images, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise ValueError(f"images must be [H, W] or [N, H, W], got shape {list(pixels.shape)}")
    return pixels


def request_parameters(tier: str | None, user_id: str | None, deadline_ms: int | None) -> dict[str, Any]:
    """The KServe parameters the router reads; unset ones are left out so the policy's defaults apply."""
    parameters = {"tier": tier, "user_id": user_id, "deadline_ms": deadline_ms}
    return {name: value for name, value in parameters.items() if value is not None}


def decode(result: Any) -> list[Classification]:
    """Classifications from a tritonclient InferResult (gRPC or HTTP, sync or asyncio)."""
    out = {name: result.as_numpy(name) for name in OUTPUTS}
    return [
        Classification(
            int(out["LABEL"][i, 0]),
            out["PROBS"][i],
            float(out["CONFIDENCE"][i, 0]),
            out["ROUTE"][i, 0].decode(),
            out["REASON"][i, 0].decode(),
            out["PATH"][i, 0].decode(),
        )
        for i in range(len(out["LABEL"]))
    ]
