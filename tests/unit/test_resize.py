"""Any image from 4x4 to 64x64 becomes the native 8x8, missing pixels handled, facts kept."""

from __future__ import annotations

import numpy as np
import pytest

from tierserve.resize import area_weights, resize_to_native, size_problem, source_stats


def test_native_images_pass_through_unchanged():
    images = np.random.default_rng(0).uniform(0, 16, (3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize_to_native(images), images)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_upscaled_images_come_back_exactly(factor: int):
    images = np.random.default_rng(1).uniform(0, 16, (2, 8, 8)).astype(np.float32)
    big = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)
    np.testing.assert_allclose(resize_to_native(big), images, rtol=1e-6)


def test_small_images_are_spread_over_8x8():
    small = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(resize_to_native(small)[0, ::2, ::2], small[0])


def test_non_square_and_uneven_sizes_keep_the_mean():
    image = np.random.default_rng(2).uniform(0, 16, (1, 13, 37)).astype(np.float32)
    assert resize_to_native(image).mean() == pytest.approx(image.mean(), rel=1e-4)


def test_area_weights_rows_sum_to_one():
    for source in (4, 5, 8, 13, 64):
        np.testing.assert_allclose(area_weights(source, 8).sum(axis=1), 1.0)


def test_missing_pixels_are_left_out_and_stay_missing_only_when_all_are_missing():
    big = np.full((1, 16, 16), 8.0, np.float32)
    big[0, 0, 0] = np.nan  # one of four source pixels under target (0, 0)
    big[0, 2:4, 2:4] = np.nan  # all four source pixels under target (1, 1)
    native = resize_to_native(big)
    assert native[0, 0, 0] == 8.0
    assert np.isnan(native[0, 1, 1])
    assert np.isnan(native).sum() == 1


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        ((1, 3, 8), "PIXELS images must be 4x4 to 64x64, got 3x8"),
        ((1, 8, 65), "PIXELS images must be 4x4 to 64x64, got 8x65"),
        ((1, 64), "PIXELS must have shape [N, H, W], got [1, 64]"),
        ((0, 8, 8), "PIXELS must hold 1 to 64 images, got 0"),
        ((65, 8, 8), "PIXELS must hold 1 to 64 images, got 65"),
    ],
)
def test_unusable_sizes_are_named(shape, problem):
    assert size_problem(shape) == problem


def test_usable_sizes_have_no_problem():
    assert size_problem((2, 4, 64)) is None


def test_source_stats_describe_the_image_as_sent():
    images = np.zeros((2, 16, 32), np.float32)
    images[0, 0, : 64 // 2] = np.nan  # 32 of 512 pixels missing
    images[1, 0, :48] = 40.0  # not missing: out of range, only the first 32 fit in row 0
    stats = source_stats(images)
    np.testing.assert_allclose(stats[0], [16, 32, 32 / 512, 0.0])
    np.testing.assert_allclose(stats[1], [16, 32, 0.0, 32 / 512])
