"""The shadow queue: bounded, dropped first under load, taken a call's worth at a time; outcomes per row."""

from __future__ import annotations

import numpy as np

from tierserve.experiment_stats import ShadowOutcome
from tierserve.shadow import BATCH_ROWS, Mirror, ShadowQueue, outcomes


def _mirrors(count: int, candidate: str = "digits_heavy:1", label: int = 3) -> list[Mirror]:
    return [Mirror("shadow_v1", candidate, np.zeros((8, 8), np.float32), label) for _ in range(count)]


def test_under_load_every_row_is_dropped_and_nothing_queued():
    queue = ShadowQueue()
    assert len(queue.offer(_mirrors(5), under_load=True)) == 5 and len(queue) == 0


def test_a_full_queue_drops_the_excess():
    queue = ShadowQueue(capacity=10)
    assert queue.offer(_mirrors(8), under_load=False) == []
    assert len(queue.offer(_mirrors(5), under_load=False)) == 3 and len(queue) == 10


def test_take_hands_over_at_most_a_batch_grouped_by_candidate_oldest_first():
    queue = ShadowQueue()
    queue.offer(_mirrors(BATCH_ROWS, "a:1") + _mirrors(10, "b:1"), under_load=False)
    first = queue.take()
    assert list(first) == ["a:1"] and len(first["a:1"]) == BATCH_ROWS
    assert {k: len(v) for k, v in queue.take().items()} == {"b:1": 10} and len(queue) == 0


def test_outcomes_compare_the_candidates_label_with_the_answer_sent():
    mirrors = _mirrors(3, label=3)
    probs = np.zeros((3, 10), np.float32)
    probs[0, 3] = probs[1, 5] = 1.0
    probs[2, 0] = np.nan
    assert outcomes(mirrors, probs) == [ShadowOutcome.AGREE, ShadowOutcome.DISAGREE, ShadowOutcome.ERROR]
    assert outcomes(mirrors, None) == [ShadowOutcome.ERROR] * 3
