"""The UCI handwritten digits shipped with scikit-learn, and the one fixed train/validation/test split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 20_261_122
VALIDATION_FRACTION = 0.2
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Part:
    """Images [N, 8, 8] float32 (values 0-16), labels [N] int64, and their row numbers in the dataset."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray

    @property
    def flat(self) -> np.ndarray:
        return self.images.reshape(len(self.images), -1)


@dataclass(frozen=True)
class DigitsSplit:
    """Stratified train/validation/test parts; every model is trained and scored on the same rows."""

    train: Part
    validation: Part
    test: Part

    def fingerprint(self) -> dict[str, Any]:
        """What a manifest records so anyone can check a model was scored on this exact split."""
        digest = hashlib.sha256()
        for part in (self.train, self.validation, self.test):
            digest.update(part.rows.astype(np.int64).tobytes())
        return {
            "dataset": "sklearn.datasets.load_digits",
            "seed": SPLIT_SEED,
            "sizes": {
                "train": len(self.train.rows),
                "validation": len(self.validation.rows),
                "test": len(self.test.rows),
            },
            "rows_sha256": digest.hexdigest(),
        }


def load_split() -> DigitsSplit:
    """The digits split by SPLIT_SEED: 60% train, 20% validation, 20% test, stratified by label."""
    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    rows = np.arange(len(labels))
    train, held_out = train_test_split(
        rows, test_size=VALIDATION_FRACTION + TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    validation, test = train_test_split(
        held_out,
        test_size=TEST_FRACTION / (VALIDATION_FRACTION + TEST_FRACTION),
        stratify=labels[held_out],
        random_state=SPLIT_SEED,
    )

    def part(selected: np.ndarray) -> Part:
        selected = np.sort(selected)
        return Part(images[selected], labels[selected], selected)

    return DigitsSplit(part(train), part(validation), part(test))


def mask_pixels(images: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A copy of the images with `fraction` of each image's pixels set to NaN (missing), reproducibly."""
    rng = np.random.default_rng(seed)
    flat = images.reshape(len(images), -1).copy()
    count = round(fraction * flat.shape[1])
    for row in flat:
        row[rng.choice(flat.shape[1], size=count, replace=False)] = np.nan
    return flat.reshape(images.shape)


def shifted_copies(images: np.ndarray) -> np.ndarray:
    """The images followed by copies shifted one pixel right, left, down and up (vacated pixels are 0)."""
    copies = [images]
    for axis in (2, 1):
        for step in (1, -1):
            shifted = np.roll(images, step, axis=axis)
            edge = 0 if step == 1 else -1
            if axis == 2:
                shifted[:, :, edge] = 0
            else:
                shifted[:, edge, :] = 0
            copies.append(shifted)
    return np.concatenate(copies)
