"""The demo workload is seeded and mixed; reasons are summarised without their numbers."""

from __future__ import annotations

import numpy as np

from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.demo import MIX, build_workload, reason_kind


def test_the_workload_is_the_same_for_the_same_seed(split: DigitsSplit):
    first, again = build_workload(split, 50, seed=3), build_workload(split, 50, seed=3)
    assert [s.kind for s in first] == [s.kind for s in again]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    assert [s.kind for s in build_workload(split, 50, seed=4)] != [s.kind for s in first]


def test_the_workload_mixes_every_kind_with_their_shapes(split: DigitsSplit):
    samples = build_workload(split, 400, seed=0)
    kinds = {s.kind for s in samples}
    assert kinds == set(MIX)
    for sample in samples:
        if sample.kind == "upscaled":
            assert sample.image.shape in {(16, 16), (32, 32)}
        else:
            assert sample.image.shape == (8, 8)
        assert np.isnan(sample.image).any() == (sample.kind == "missing")
        assert (sample.label is None) == (sample.kind == "noise")


def test_reason_kind_drops_the_numbers():
    assert reason_kind("rule missing_pixels (missing_fraction=0.30 > 0); cues: ...") == "rule missing_pixels"
    assert (
        reason_kind("cascade; digits_light:1 confidence 0.5 < 0.9; escalated to digits_heavy:2") == "cascade, escalated"
    )
    assert reason_kind("cascade; digits_light:1 confidence 0.95 >= 0.9; cues: ...") == "cascade, first answer kept"
    assert reason_kind("fallback: no listed route takes images with missing pixels; cues") == "fallback"
