"""Experiment counts: a batch of rows is aggregated into one store write, and reports, posteriors and latency
quantiles are read back from the counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierserve.experiment_stats import (
    LATENCY_BUCKETS_MS,
    ArmRow,
    ExperimentStats,
    ShadowOutcome,
    latency_bucket,
    quantile_ms,
)
from tierserve.state_store import MemoryStore, SqliteStore

T0 = 1_800_000_000.0  # a multiple of 60


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.adds = 0
        self.marks = 0

    def add(self, counts) -> None:
        self.adds += 1
        super().add(counts)

    def mark(self, key, members) -> None:
        self.marks += 1
        super().mark(key, members)


def test_a_batch_is_one_add_and_one_mark_per_arm_with_users():
    store = CountingStore()
    rows = [ArmRow("exp", "a", f"user{i % 3}", 0.004, T0 + i) for i in range(10)]
    rows += [ArmRow("exp", "b", "", 0.030, T0), ArmRow("other", "a", "user0", 0.001, T0)]
    ExperimentStats(store).record_rows(rows)
    assert store.adds == 1
    assert store.marks == 2  # exp/a and other/a saw users; exp/b saw none
    assert ExperimentStats(store).record_rows([]) is None and store.adds == 1


def test_report_counts_rows_users_feedback_and_latency(tmp_path: Path):
    store = SqliteStore(tmp_path / "state.db")
    stats = ExperimentStats(store)
    stats.record_rows(ArmRow("exp", "a", f"user{i % 4}", 0.003, T0 + i) for i in range(100))  # 2-5 ms bucket
    stats.record_rows([ArmRow("exp", "a", "user9", 0.150, T0 + 70), ArmRow("exp", "b", "", 3.0, T0 + 5)])
    for correct in (True, True, False):
        stats.record_feedback("exp", "a", correct, T0 + 65)
    report = stats.report("exp")
    assert [arm.arm for arm in report.arms] == ["a", "b"]
    a, b = report.arms
    assert (a.users, a.rows, a.feedback, a.correct) == (5, 101, 3, 2)
    assert (b.users, b.rows, b.feedback, b.correct) == (0, 1, 0, 0)
    assert stats.rows("exp") == 102 and stats.rows("never_run") == 0
    assert len(a.latency_counts) == len(LATENCY_BUCKETS_MS) + 1
    assert a.latency_counts[2] == 100 and a.latency_counts[7] == 1
    assert 2 < a.p50_ms < 5 and a.p99_ms < 5
    assert b.latency_counts[-1] == 1 and b.p50_ms == b.p99_ms == 2000.0  # overflow: its lower bound
    assert [(p.start, p.rows, p.feedback, p.correct) for p in a.timeline] == [(T0, 60, 0, 0), (T0 + 60, 41, 3, 2)]
    assert a.timeline[0].p50_ms is not None
    assert report.shadow == {} and report.shadow_p50_ms is None
    store.close()


def test_posteriors_are_beta_counts_per_arm_with_feedback():
    stats = ExperimentStats(MemoryStore())
    for correct in (True, True, True, False):
        stats.record_feedback("bandit", "light", correct, T0)
    stats.record_feedback("bandit", "heavy", False, T0)
    stats.record_rows([ArmRow("bandit", "rules", "", 0.001, T0)])  # rows without feedback: no posterior
    assert stats.posteriors(["bandit", "none"]) == {
        "bandit": {"heavy": (1.0, 2.0), "light": (4.0, 2.0)},
        "none": {},
    }


def test_shadow_outcomes_and_latency():
    stats = ExperimentStats(MemoryStore())
    for outcome, latency in [("agree", 0.002), ("agree", 0.004), (ShadowOutcome.DISAGREE, 0.008), ("dropped", None)]:
        stats.record_shadow("shadow", outcome, latency, T0)
    report = stats.report("shadow")
    assert report.shadow == {"agree": 2, "disagree": 1, "dropped": 1}
    assert report.shadow_p50_ms is not None and 2 <= report.shadow_p50_ms <= 5
    with pytest.raises(ValueError):
        stats.record_shadow("shadow", "maybe", None, T0)


def test_forget_deletes_every_key_of_the_experiment():
    store = MemoryStore()
    stats = ExperimentStats(store)
    stats.record_rows([ArmRow("exp", "a", "u", 0.001, T0), ArmRow("keep", "a", "u", 0.001, T0)])
    stats.record_feedback("exp", "a", True, T0)
    stats.record_shadow("exp", "agree", 0.001, T0)
    stats.forget("exp")
    report = stats.report("exp")
    assert report.arms == () and report.shadow == {}
    assert stats.posteriors(["exp"]) == {"exp": {}}
    assert store.size("exp:exp:users:a") == 0
    assert stats.report("keep").arms[0].users == 1


def test_names_that_would_break_the_key_layout_are_refused():
    stats = ExperimentStats(MemoryStore())
    for experiment, arm in [("a|b", "x"), ("a:b", "x"), ("", "x"), ("a", "x|y")]:
        with pytest.raises(ValueError, match="name"):
            stats.record_feedback(experiment, arm, True, T0)


def test_latency_buckets_are_upper_bounds_inclusive():
    assert latency_bucket(0.0) == 0
    assert latency_bucket(0.001) == 0
    assert latency_bucket(0.0011) == 1
    assert latency_bucket(2.0) == len(LATENCY_BUCKETS_MS) - 1
    assert latency_bucket(2.1) == len(LATENCY_BUCKETS_MS)


def test_quantiles_interpolate_within_a_bucket():
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    assert quantile_ms(counts, 0.5) is None
    counts[3] = 100  # 100 rows in (5, 10] ms
    assert quantile_ms(counts, 0.5) == pytest.approx(7.5)
    assert quantile_ms(counts, 0.99) == pytest.approx(9.95)
    counts[0] = 100  # and 100 in [0, 1] ms
    assert quantile_ms(counts, 0.5) == pytest.approx(1.0)
    assert quantile_ms(counts, 0.25) == pytest.approx(0.5)
    assert quantile_ms(counts, 0.99) == pytest.approx(5 + 5 * 0.98)
