"""Variations of the digits that exercise every route: noise, shifts, upscaling, missing pixels, pure noise."""

from __future__ import annotations

import numpy as np

from tierserve.pixels import PIXEL_MAX
from tierserve.tools.dataset import mask_pixels


def noisy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Gaussian noise of `sigma` pixel levels, clipped to the valid 0-16 range."""
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, PIXEL_MAX).astype(np.float32)


def shifted(images: np.ndarray, seed: int, max_shift: int = 2) -> np.ndarray:
    """Each image moved by up to `max_shift` pixels in each direction (vacated pixels are 0)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(images)
    for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, size=(len(images), 2))):
        rolled = np.roll(images[i], (dy, dx), axis=(0, 1))
        if dy > 0:
            rolled[:dy] = 0
        elif dy < 0:
            rolled[dy:] = 0
        if dx > 0:
            rolled[:, :dx] = 0
        elif dx < 0:
            rolled[:, dx:] = 0
        out[i] = rolled
    return out


def upscaled(images: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel repeated factor x factor times: 8x8 -> 16x16 or 32x32, the same digit at a larger size."""
    return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def pure_noise(count: int, seed: int, size: int = 8) -> np.ndarray:
    """Uniform noise over the pixel range: images that are no digit at all."""
    return np.random.default_rng(seed).uniform(0, PIXEL_MAX, (count, size, size)).astype(np.float32)


def with_missing(images: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    return mask_pixels(images, fraction, seed)
