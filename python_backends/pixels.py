"""The image contract every downstream model shares: PIXELS float32 [N, 8, 8], values 0-16, NaN = missing."""

from __future__ import annotations

import numpy as np

IMAGE_SHAPE = (8, 8)
NUM_CLASSES = 10
PIXEL_MAX = 16.0
PIXEL_BOUND = 1e6  # models see pixels clipped to +-this: any finite image gets finite probabilities


def bounded(pixels: np.ndarray) -> np.ndarray:
    """Pixels clipped to +-PIXEL_BOUND (NaN stays NaN). Values like 1e38 overflow a model's arithmetic into NaN;
    far past 0-16 either way, the clipped image reads the same to every model."""
    return np.clip(pixels, -PIXEL_BOUND, PIXEL_BOUND)


def pixel_problem(pixels: np.ndarray, accepts_missing: bool) -> str | None:
    """Say what makes a batch unusable for a model, or None when it can be served."""
    if pixels.shape[1:] != IMAGE_SHAPE:
        return f"PIXELS must have shape [N, 8, 8], got {list(pixels.shape)}"
    if problem := infinity_problem(pixels):
        return problem
    if not accepts_missing:
        missing = int(np.isnan(pixels).sum())
        if missing:
            return (
                f"PIXELS has {missing} missing (NaN) pixel(s) and this model needs complete images; "
                "send images with missing pixels to digits_missing or digits_rules"
            )
    return None


def infinity_problem(pixels: np.ndarray) -> str | None:
    """Infinite values are never a valid pixel; NaN is (it means missing)."""
    if np.isfinite(pixels).all():  # the common case, in one pass
        return None
    infinite = int(np.isinf(pixels).sum())
    if infinite:
        return f"PIXELS has {infinite} infinite value(s); pixels must be finite (0-16) or NaN for missing"
    return None
