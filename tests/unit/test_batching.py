"""A dynamic batch is run with one runner call; bad requests are rejected alone, in place."""

from __future__ import annotations

import numpy as np

from tierserve.batching import Rejected, infer_batched


class RecordingRunner:
    """Returns row sums as 'probabilities' and records every batch it is given."""

    def __init__(self, accepts_missing: bool = False) -> None:
        self.accepts_missing = accepts_missing
        self.calls: list[np.ndarray] = []

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        self.calls.append(pixels)
        return np.repeat(np.nansum(pixels, axis=(1, 2))[:, None], 10, axis=1).astype(np.float32)


def _images(*values: float) -> np.ndarray:
    return np.stack([np.full((8, 8), v, np.float32) for v in values])


def test_all_requests_run_in_one_call_and_come_back_in_order():
    runner = RecordingRunner()
    results = infer_batched(runner, [_images(1), _images(2, 3), _images(4)])
    assert len(runner.calls) == 1 and len(runner.calls[0]) == 4
    assert [r[:, 0].tolist() for r in results] == [[64.0], [128.0, 192.0], [256.0]]


def test_a_bad_request_is_rejected_and_its_neighbours_are_served():
    runner = RecordingRunner()
    bad = _images(5)
    bad[0, 0, 0] = np.nan
    results = infer_batched(runner, [_images(1), bad, _images(2)])
    assert isinstance(results[1], Rejected) and "1 missing (NaN) pixel" in results[1].message
    assert results[0][0, 0] == 64.0 and results[2][0, 0] == 128.0
    assert len(runner.calls) == 1 and len(runner.calls[0]) == 2


def test_missing_pixels_pass_for_a_runner_that_accepts_them():
    runner = RecordingRunner(accepts_missing=True)
    image = _images(1)
    image[0, :4] = np.nan
    (result,) = infer_batched(runner, [image])
    assert result[0, 0] == 32.0


def test_no_runner_call_when_every_request_is_rejected():
    runner = RecordingRunner()
    results = infer_batched(runner, [_images(np.inf), np.zeros((1, 4, 4), np.float32)])
    assert runner.calls == []
    assert "infinite" in results[0].message
    assert "shape [N, 8, 8]" in results[1].message


def test_extreme_finite_pixels_never_come_back_as_nan_and_non_finite_answers_are_refused():
    class Overflowing:
        accepts_missing = False

        def infer(self, pixels):
            probs = np.full((len(pixels), 10), 0.1, np.float32)
            probs[np.abs(pixels).max(axis=(1, 2)) > 1e30] = np.nan  # what 1e38 did to the ONNX models
            probs[pixels[:, 0, 0] == -7] = np.inf
            return probs

    extreme = np.zeros((1, 8, 8), np.float32)
    extreme[0, 3, 3] = 1e38
    broken = np.full((1, 8, 8), -7, np.float32)
    answers = infer_batched(Overflowing(), [extreme, broken, np.zeros((2, 8, 8), np.float32)])
    assert np.isfinite(answers[0]).all(), "models see pixels bounded to +-1e6"
    assert isinstance(answers[1], Rejected) and "not finite" in answers[1].message
    assert answers[2].shape == (2, 10)
