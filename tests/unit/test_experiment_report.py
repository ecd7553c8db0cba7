"""`tierserve experiment report`: the statistics against known values, and the text and plot of hand-built counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierserve.experiment_spec import ExperimentsFile, ExperimentSpec
from tierserve.experiment_stats import (
    LATENCY_BUCKETS_MS,
    ArmReport,
    ArmRow,
    ExperimentReport,
    ExperimentStats,
    TimePoint,
)
from tierserve.experimenter import EXPERIMENTS_KEY
from tierserve.state_store import MemoryStore
from tierserve.tools.experiment_report import probability_best, render, report, two_proportion_z, wilson

T0 = 1_700_000_000.0


def _arm(name: str, correct: int, feedback: int, *, rows: int = 500, users: int = 40) -> ArmReport:
    """An arm with `rows` over three minute-long buckets, its feedback spread over them."""
    timeline = tuple(TimePoint(T0 + 60 * i, rows // 3, feedback // 3, correct // 3, 4.0 + i) for i in range(3))
    latency = (0, 0, rows // 2, rows - rows // 2, *([0] * (len(LATENCY_BUCKETS_MS) - 3)))
    return ArmReport(name, users, rows, feedback, correct, latency, 4.5, 9.9, timeline)


def _counts(*arms: ArmReport, shadow: dict[str, int] | None = None) -> ExperimentReport:
    return ExperimentReport("cascade_ab", arms, shadow or {}, 3.0 if shadow else None, 8.0 if shadow else None)


def _spec(kind: str, arms: list[dict]) -> ExperimentSpec:
    return ExperimentsFile.model_validate(
        {"experiments": [{"name": "cascade_ab", "kind": kind, "arms": arms}]}
    ).experiments[0]


TREATMENT = {"name": "alpha", "weight": 50, "models": {"digits_light": "digits_static_light:1"}}
CONTROL = {"name": "baseline", "weight": 50}


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [(80, 100, 0.7112, 0.8666), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (1, 2, 0.0945, 0.9055)],
)
def test_the_wilson_interval_matches_known_values(successes: int, trials: int, low: float, high: float):
    assert wilson(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_the_wilson_interval_of_no_trials_is_none():
    assert wilson(0, 0) is None


def test_the_two_proportion_z_test_matches_known_values():
    z, p = two_proportion_z(80, 100, 90, 100)  # pooled p = 0.85: se = 0.0505, z = 1.98
    assert (z, p) == pytest.approx((1.9803, 0.0477), abs=5e-4)
    assert two_proportion_z(90, 100, 80, 100) == pytest.approx((-z, p))
    assert two_proportion_z(50, 100, 50, 100) == pytest.approx((0.0, 1.0))
    assert two_proportion_z(30, 30, 40, 40) == (0.0, 1.0)  # both perfect: nothing to test


def test_the_probability_of_being_best_sums_to_one_and_favours_the_clearly_better_arm():
    chances = probability_best([(800, 200), (900, 100), (10, 10)])
    assert sum(chances) == pytest.approx(1.0)
    assert chances[1] > 0.99
    assert probability_best([(800, 200), (900, 100), (10, 10)]) == chances  # a fixed seed
    even = probability_best([(50, 50), (50, 50)])
    assert even == pytest.approx([0.5, 0.5], abs=0.02)


def test_the_report_compares_each_arm_with_the_control_wherever_the_control_is_declared():
    counted = _counts(_arm("alpha", 180, 200), _arm("baseline", 160, 200))
    text = render(counted, _spec("split", [TREATMENT, CONTROL]))
    lines = text.splitlines()
    assert lines[0] == "experiment cascade_ab (split; control: baseline)"
    assert lines[2].split()[:4] == ["baseline", "40", "500", "200"] and lines[3].split()[0] == "alpha"
    assert "0.800 (0.739-0.850)" in lines[2] and "0.900 (0.851-0.934)" in lines[3]
    assert "vs baseline" in text
    assert "  alpha: +10.0 points, z = 2.80, p = 0.005: significant at 0.05" in lines
    best = lines[lines.index(next(line for line in lines if line.startswith("probability"))) + 1 :]
    assert [line.split()[0] for line in best] == ["baseline", "alpha"] and float(best[1].split()[1]) > 0.99


def test_a_canarys_control_is_its_second_arm_and_an_arm_without_counts_shows_as_zeros():
    text = render(
        _counts(_arm("alpha", 95, 100)), _spec("canary", [{**TREATMENT, "weight": 5}, {**CONTROL, "weight": 95}])
    )
    assert "control: baseline" in text
    assert "  alpha: not enough feedback (100 vs 0; 30 per arm needed)" in text.splitlines()
    zeros = next(line for line in text.splitlines() if line.startswith("  baseline "))
    assert zeros.split() == ["baseline", "0", "0", "0", "-", "-", "-"]


def test_a_difference_within_noise_is_not_significant_and_little_feedback_is_not_tested():
    text = render(_counts(_arm("a", 85, 100), _arm("b", 80, 100), _arm("c", 20, 25)), None)
    assert (
        text.splitlines()[0]
        == "experiment cascade_ab (not served now, so its kind is unknown; control: the first arm by name)"
    )
    assert "  b: -5.0 points, z = -0.93, p = 0.352: not significant at 0.05" in text.splitlines()
    assert "  c: not enough feedback (25 vs 100; 30 per arm needed)" in text.splitlines()


def test_a_shadow_experiment_reports_agreement_errors_drops_and_latency():
    text = render(_counts(shadow={"agree": 90, "disagree": 10, "error": 3, "dropped": 5}), None)
    assert text.splitlines() == [
        "experiment cascade_ab (shadow)",
        "rows mirrored: 108 (sent 103)",
        "agreement: 0.900 (0.826-0.945) of 100 answered (agree 90, disagree 10)",
        "errors: 3",
        "dropped: 5",
        "shadow latency: p50 3.0 ms, p99 8.0 ms",
    ]


def test_an_experiment_without_counts_says_so():
    store = MemoryStore()
    assert report(store, "never_ran", None) == (
        "no counts for experiment 'never_ran': no row was answered in it and no feedback taken"
    )
    assert report(store, "a:b", None).startswith("no counts for experiment 'a:b': not an experiment name")


def test_the_report_reads_the_counts_and_the_served_experiment_from_the_store(tmp_path: Path):
    store = MemoryStore()
    stats = ExperimentStats(store)
    for arm, right in (("alpha", 45), ("baseline", 35)):
        stats.record_rows([ArmRow("cascade_ab", arm, f"user{i % 7}", 0.004, T0 + i) for i in range(120)])
        for i in range(50):
            stats.record_feedback("cascade_ab", arm, i < right, T0 + i)
    served = {"experiments": [{"name": "cascade_ab", "kind": "split", "arms": [TREATMENT, CONTROL]}]}
    store.set(EXPERIMENTS_KEY, json.dumps(served).encode())
    png = tmp_path / "cascade_ab.png"
    text = report(store, "cascade_ab", png)
    assert "control: baseline" in text and "  alpha: +20.0 points" in text
    assert next(line for line in text.splitlines() if line.startswith("  baseline ")).split()[:4] == [
        "baseline",
        "7",
        "120",
        "50",
    ]
    assert text.endswith(f"plot: {png}")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_plot_is_written_for_hand_built_counts(tmp_path: Path):
    from tierserve.tools.experiment_report import plot

    png = tmp_path / "plot.png"
    plot([_arm("alpha", 180, 200), _arm("baseline", 0, 0)], "experiment cascade_ab", png)
    assert png.stat().st_size > 10_000
