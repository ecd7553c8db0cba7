"""The split is fixed, stratified and disjoint; masking and shifting are reproducible."""

from __future__ import annotations

import numpy as np

from tierserve.tools.dataset import DigitsSplit, load_split, mask_pixels, shifted_copies


def test_the_split_is_the_same_every_time(split: DigitsSplit):
    again = load_split()
    assert again.fingerprint() == split.fingerprint()
    np.testing.assert_array_equal(again.test.images, split.test.images)


def test_the_parts_are_disjoint_cover_the_dataset_and_are_stratified(split: DigitsSplit):
    parts = (split.train, split.validation, split.test)
    rows = np.concatenate([p.rows for p in parts])
    assert len(rows) == len(set(rows.tolist())) == 1797
    assert [len(p.rows) for p in parts] == [1078, 359, 360]
    for part in parts:
        shares = np.bincount(part.labels, minlength=10) / len(part.labels)
        np.testing.assert_allclose(shares, 0.1, atol=0.01)


def test_images_are_8x8_float32_in_the_dataset_range(split: DigitsSplit):
    assert split.test.images.shape == (360, 8, 8) and split.test.images.dtype == np.float32
    assert split.test.images.min() == 0.0 and split.test.images.max() == 16.0


def test_mask_pixels_removes_the_exact_fraction_reproducibly(split: DigitsSplit):
    masked = mask_pixels(split.test.images[:20], 0.25, seed=5)
    assert (np.isnan(masked).reshape(20, -1).sum(axis=1) == 16).all()
    np.testing.assert_array_equal(np.isnan(masked), np.isnan(mask_pixels(split.test.images[:20], 0.25, seed=5)))
    assert not np.isnan(split.test.images).any(), "the source images are not modified"


def test_shifted_copies_move_each_image_one_pixel_with_zero_fill():
    image = np.arange(64, dtype=np.float32).reshape(1, 8, 8) + 1
    copies = shifted_copies(image)
    assert copies.shape == (5, 8, 8)
    np.testing.assert_array_equal(copies[0], image[0])
    right, left, down, up = copies[1:]
    np.testing.assert_array_equal(right[:, 1:], image[0, :, :-1])
    assert (right[:, 0] == 0).all()
    np.testing.assert_array_equal(left[:, :-1], image[0, :, 1:])
    assert (left[:, -1] == 0).all()
    np.testing.assert_array_equal(down[1:], image[0, :-1])
    assert (down[0] == 0).all()
    np.testing.assert_array_equal(up[:-1], image[0, 1:])
    assert (up[-1] == 0).all()
