"""Bring any image from 4x4 to 64x64 to the native 8x8 by area resampling that ignores missing pixels."""

from __future__ import annotations

import functools

import numpy as np

from tierserve.pixels import IMAGE_SHAPE

MIN_SIDE, MAX_SIDE = 4, 64
MAX_IMAGES = 64  # max_batch_size of digits, the router and preprocess


def size_problem(shape: tuple[int, ...]) -> str | None:
    """Say what is wrong with a batch shape [N, H, W], or None when it can be resized."""
    if len(shape) != 3:
        return f"PIXELS must have shape [N, H, W], got {list(shape)}"
    if not 1 <= shape[0] <= MAX_IMAGES:
        return f"PIXELS must hold 1 to {MAX_IMAGES} images, got {shape[0]}"
    height, width = shape[1:]
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        return f"PIXELS images must be {MIN_SIDE}x{MIN_SIDE} to {MAX_SIDE}x{MAX_SIDE}, got {height}x{width}"
    return None


@functools.lru_cache(maxsize=(MAX_SIDE - MIN_SIDE + 1) * 2)
def area_weights(source: int, target: int) -> np.ndarray:
    """[target, source] weights: how much of each source pixel falls in each target pixel (rows sum to 1). Kept per
    size (read-only): making them was a third of the resize of one image."""
    edges = np.arange(target + 1) * source / target
    starts, ends = edges[:-1, None], edges[1:, None]
    pixel = np.arange(source)[None, :]
    overlap = np.clip(np.minimum(ends, pixel + 1) - np.maximum(starts, pixel), 0.0, None)
    weights = overlap / overlap.sum(axis=1, keepdims=True)
    weights.flags.writeable = False
    return weights


def resize_to_native(images: np.ndarray) -> np.ndarray:
    """[N, H, W] -> [N, 8, 8]. Each target pixel averages the observed source pixels under it; it is NaN
    only when every source pixel under it is missing. Native 8x8 images pass through unchanged."""
    if images.shape[1:] == IMAGE_SHAPE:
        return images.astype(np.float32, copy=False)
    rows = area_weights(images.shape[1], IMAGE_SHAPE[0])
    cols = area_weights(images.shape[2], IMAGE_SHAPE[1])
    observed = ~np.isnan(images)
    total = rows @ np.where(observed, images, 0.0) @ cols.T
    coverage = rows @ observed.astype(np.float64) @ cols.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(coverage > 0, total / coverage, np.nan).astype(np.float32)


def source_stats(images: np.ndarray) -> np.ndarray:
    """[N, 4] facts about the images as sent, before resizing: height, width, missing and out-of-range
    fractions (values outside 0-16 among the observed pixels)."""
    flat = images.reshape(len(images), -1)
    stats = np.empty((len(images), 4), np.float32)
    stats[:, 0], stats[:, 1] = images.shape[1], images.shape[2]
    if not np.isnan(flat).any():  # the common case: every pixel observed (a third of the work for one image)
        stats[:, 2] = 0.0
        stats[:, 3] = ((flat < 0) | (flat > 16)).mean(axis=1)
        return stats
    observed = ~np.isnan(flat)
    count = np.maximum(observed.sum(axis=1), 1)
    with np.errstate(invalid="ignore"):
        out_of_range = (observed & ((flat < 0) | (flat > 16))).sum(axis=1) / count
    stats[:, 2] = 1.0 - observed.mean(axis=1)
    stats[:, 3] = out_of_range
    return stats
