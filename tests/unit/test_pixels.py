"""The shared image contract names what is wrong with a batch."""

from __future__ import annotations

import numpy as np
import pytest

from tierserve.pixels import pixel_problem


def test_a_clean_batch_has_no_problem():
    assert pixel_problem(np.zeros((3, 8, 8), np.float32), accepts_missing=False) is None


@pytest.mark.parametrize("shape", [(2, 8, 7), (2, 64), (2, 8, 8, 1)])
def test_wrong_shape_is_named(shape):
    assert (
        pixel_problem(np.zeros(shape, np.float32), accepts_missing=True)
        == f"PIXELS must have shape [N, 8, 8], got {list(shape)}"
    )


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_values_are_counted(value):
    pixels = np.zeros((2, 8, 8), np.float32)
    pixels[1, 2, :3] = value
    problem = pixel_problem(pixels, accepts_missing=True)
    assert problem is not None and problem.startswith("PIXELS has 3 infinite value(s)")


def test_missing_pixels_depend_on_the_model():
    pixels = np.zeros((1, 8, 8), np.float32)
    pixels[0, 0, :2] = np.nan
    assert pixel_problem(pixels, accepts_missing=True) is None
    problem = pixel_problem(pixels, accepts_missing=False)
    assert problem is not None and "2 missing (NaN) pixel(s)" in problem and "digits_missing" in problem
