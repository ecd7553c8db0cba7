"""The signature reports what the policy needs, and the OOD score separates digits from noise."""

from __future__ import annotations

import numpy as np
import pytest

from tierserve.resize import source_stats
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.workload import pure_noise


def _stats(split: DigitsSplit) -> TrainingStats:
    return TrainingStats.fit(split.train.images, split.validation.images)


def test_ood_score_is_one_at_the_99th_percentile_of_clean_validation_images(split: DigitsSplit):
    scores = _stats(split).ood_scores(split.validation.images)
    assert np.percentile(scores, 99) == pytest.approx(1.0, abs=1e-5)


def test_pure_noise_scores_far_above_digits(split: DigitsSplit):
    stats = _stats(split)
    assert np.median(stats.ood_scores(pure_noise(100, seed=0))) > 2 * np.median(stats.ood_scores(split.test.images))


def test_ood_score_ignores_missing_pixels(split: DigitsSplit):
    stats = _stats(split)
    image = split.test.images[:1].copy()
    masked = image.copy()
    masked[0, :, :4] = np.nan
    assert np.isfinite(stats.ood_scores(masked)).all()
    assert np.isfinite(stats.ood_scores(np.full((1, 8, 8), np.nan, np.float32))).all()


def test_stats_round_trip_through_json(split: DigitsSplit, tmp_path):
    stats = _stats(split)
    (tmp_path / "stats.json").write_text(stats.to_json())
    assert TrainingStats.load(tmp_path / "stats.json").to_json() == stats.to_json()


def test_signatures_carry_source_facts_cues_and_context(split: DigitsSplit):
    images = np.zeros((2, 8, 8), np.float32)
    images[0, :4] = 16.0  # half the pixels ink, half blank
    source = source_stats(np.repeat(np.repeat(images, 2, axis=1), 2, axis=2))
    context = RequestContext("critical", "alice", 40)
    first, second = signatures(images, source, [context, RequestContext("best_effort")], _stats(split))
    assert (first.height, first.width, first.missing_fraction) == (16, 16, 0.0)
    assert first.sparsity == 0.5 and second.sparsity == 1.0
    assert (first.tier, first.user_id, first.deadline_ms) == ("critical", "alice", 40)
    assert (second.tier, second.user_id, second.deadline_ms) == ("best_effort", "", None), "each row its context"
    assert "size=16x16" in first.cues() and "tier=critical" in first.cues() and "deadline=40ms" in first.cues()
