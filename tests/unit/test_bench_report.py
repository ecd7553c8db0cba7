"""perf/report.py and perf/report_io.py on synthetic reports: medians and spreads over runs, goal verdicts computed
from the figures, the README sections between their markers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

import bench_first_stage
import bench_router
import bench_stub_cpu
import report
import report_io


def _measurement(path: str, concurrency: int, throughput: float, p50_ms: float) -> dict:
    return {
        "condition": f"{path} c{concurrency}",
        "path": path,
        "concurrency": concurrency,
        "throughput": throughput,
        "p50_ms": p50_ms,
        "p90_ms": p50_ms * 1.5,
        "p99_ms": p50_ms * 2,
    }


def _p1_report() -> dict:
    """A P1 report of three runs, made as bench_router makes it, with figures chosen by hand."""
    runs = []
    for index, (static, routed, added) in enumerate(
        ((1000.0, 1100.0, 0.25), (900.0, 850.0, 0.4), (1000.0, 1050.0, 0.2))
    ):
        measurements = [
            _measurement(path, c, throughput * (3 if c == 8 else 1), p50)
            for path, throughput, p50 in (
                ("static", static, 0.5),
                ("routed", routed, 0.3 + added),
                ("direct", 2000.0, 0.3),
            )
            for c in (1, 8)
        ]
        ratios = {
            "routed_over_static_throughput_c1": routed / static,
            "routed_over_static_throughput_c8": routed / static,
            "routed_minus_direct_p50_ms_c1": added,
            "routed_minus_direct_p50_ms_c8": added,
        }
        runs.append({"run": index + 1, "measurements": measurements, "ratios": ratios})
    found = report_io.ratios(runs)
    return {
        "benchmark": "p1",
        "date": "2025-01-02T03:04:05+00:00",
        "commit": "0123456789abcdef",
        "dirty": False,
        "machine": {
            "cpus": 2,
            "cpu_model": "a CPU",
            "python": "3.11.7",
            "tritonserver": "2.51.0",
            "load_average_at_start": [1.5, 1.0, 1.0],
            "load_average_at_end": [2.5, 1.0, 1.0],
        },
        "settings": {
            "concurrencies": [1, 8],
            "window_ms": 3000,
            "order": "rotated",
            "load_shedding": {"shed_standard_at_ms": 60_000},
            "paths": {key: {"name": f"the {key} path"} for key in ("direct", "static", "routed")},
        },
        "runs": runs,
        "summary": {
            "conditions": report_io.conditions(
                runs, ("condition", "path", "concurrency"), ("throughput", "p50_ms", "p99_ms")
            ),
            "ratios": found,
            "goals": [
                report_io.goal(
                    "routed / static throughput at c1", found["routed_over_static_throughput_c1"], ">=", 1.0
                ),
                report_io.goal("added p50 at c1, ms", found["routed_minus_direct_p50_ms_c1"], "<=", 0.3, ".3f"),
            ],
        },
    }


def test_spread_is_the_median_with_min_and_max() -> None:
    assert report_io.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert report_io.spread([4.0, 1.0, 2.0, 3.0])["median"] == 2.5
    assert report_io.spread_text({"median": 1234.0, "min": 1200.0, "max": 1250.5}, ",.0f") == "1,234 (1,200 to 1,250)"
    assert report_io.cell({"median": 0.5, "min": 0.5, "max": 0.5}, ".2f") == "0.50"


def test_conditions_and_ratios_are_summarized_over_runs() -> None:
    s = _p1_report()["summary"]
    routed_c1 = next(c for c in s["conditions"] if c["condition"] == "routed c1")
    assert routed_c1["runs"] == 3
    assert routed_c1["throughput"] == {"median": 1050.0, "min": 850.0, "max": 1100.0}
    assert [c["condition"] for c in s["conditions"]][:2] == ["static c1", "static c8"]  # as first measured
    assert "p90_ms" not in routed_c1  # only the metrics asked for
    ratio = s["ratios"]["routed_over_static_throughput_c1"]
    assert ratio["median"] == pytest.approx(1.05)  # the median of the per-run ratios, not a ratio of medians
    assert ratio["min"] == pytest.approx(850 / 900)


def test_a_metric_no_run_measured_is_left_out_and_none_is_skipped() -> None:
    runs = [
        {"measurements": [{"condition": "a", "p99_ms": None}], "ratios": {"x": None}},
        {"measurements": [{"condition": "a", "p99_ms": 4.0}], "ratios": {"x": 2.0}},
    ]
    (a,) = report_io.conditions(runs, ("condition",), ("p99_ms", "throughput"))
    assert a == {"condition": "a", "runs": 2, "p99_ms": {"median": 4.0, "min": 4.0, "max": 4.0}}
    assert report_io.ratios(runs) == {"x": {"median": 2.0, "min": 2.0, "max": 2.0}}


def test_verdicts_are_computed_from_the_figures() -> None:
    goals = _p1_report()["summary"]["goals"]
    assert report_io.met(goals[0])  # median ratio 1.05 >= 1.0
    assert report_io.met(goals[1])  # median 0.25 <= 0.3
    lines = report_io.verdicts(goals).splitlines()
    assert lines[0] == "Goal routed / static throughput at c1 ≥ 1: 1.05 (0.944 to 1.1), **met**."
    assert lines[1] == "Goal added p50 at c1, ms ≤ 0.300: 0.250 (0.200 to 0.400), **met**."
    # a stored verdict is not trusted: the figures decide
    wrong = {**report_io.goal("errors", 3, "==", 0), "met": True}
    assert report_io.verdicts([wrong]) == "Goal errors = 0: 3, **not met**."
    assert not report_io.met(report_io.goal("never measured", None, "<=", 10))
    assert "not measured, **not met**" in report_io.verdicts([report_io.goal("never measured", None, "<=", 10)])
    with pytest.raises(ValueError, match="unknown operator"):
        report_io.goal("x", 1.0, "=>", 1.0)


def test_the_p1_section_from_a_report_file(tmp_path: Path) -> None:
    path = tmp_path / "p1.json"
    path.write_text(json.dumps(_p1_report()))
    section = report.SECTIONS["p1"]
    found, skipped = report._reports(section, tmp_path)
    assert skipped == []
    text = report.markdown(section, found)
    assert "| the routed path | 1 | 1,050 (850 to 1,100) | 0.550 (0.500 to 0.700) |" in text
    assert text.count("**met**") == 2 and "**not met**" not in text
    assert "3 runs, 2025-01-02, commit 0123456; 2 CPUs (a CPU), tritonserver 2.51.0" in text
    assert text.endswith("/p1.png)") and "![P1 routing overhead: p1](" in text
    assert report.plot(section, found[0][1], tmp_path / "p1.png").stat().st_size > 0


def test_the_stub_cpu_section_gives_each_process_and_the_ratios_within_a_run(tmp_path: Path) -> None:
    base = {  # path: wall µs, then CPU µs per request of tritonserver, router, preprocess, digits_light, other stubs
        "direct": (800.0, (300.0, 50.0, 0.0, 250.0, 0.0)),
        "static": (1200.0, (500.0, 50.0, 200.0, 250.0, 0.0)),
        "routed": (2000.0, (600.0, 1350.0, 0.0, 0.0, 50.0)),
    }
    runs = []
    for index, scale in enumerate((1.0, 2.0, 1.5)):  # a machine whose speed drifts between runs
        measurements = [
            {
                "condition": key,
                "wall_us_per_request": wall * scale,
                "server_cpu_us_per_request": sum(cpu) * scale,
                **{f"cpu_us_{group}": us * scale for group, us in zip(bench_stub_cpu.GROUPS, cpu, strict=True)},
            }
            for key, (wall, cpu) in base.items()
        ]
        by = {m["condition"]: m for m in measurements}
        runs.append({"run": index + 1, "measurements": measurements, "ratios": bench_stub_cpu._ratios(by)})
    settings = {
        "paths": {key: {"name": f"the {key} path"} for key in base},
        "requests": 2000,
        "warm_up": 100,
        "clock_ticks_per_s": 100,
        "order": "rotated",
    }
    summary = {
        "conditions": report_io.conditions(runs, ("condition",), bench_stub_cpu.METRICS),
        "ratios": report_io.ratios(runs),
    }
    (tmp_path / bench_stub_cpu.REPORT).write_text(
        json.dumps({**_p1_report(), "benchmark": "stub_cpu", "settings": settings, "runs": runs, "summary": summary})
    )
    found, skipped = report._reports(report.SECTIONS["stub_cpu"], tmp_path)
    text = report.markdown(report.SECTIONS["stub_cpu"], found)
    assert skipped == []
    assert (
        "| the routed path | 3,000 (2,000 to 4,000) | 3,000 (2,000 to 4,000) | 900 (600 to 1,200) | "
        "2,025 (1,350 to 2,700) | 0 | 0 | 75 (50 to 100) |" in text
    )
    assert "routed / static CPU: 2.00 for the whole server, 3.00 for the Python stubs alone." in text


def test_reports_of_the_old_format_and_missing_ones_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "p4_digits_heavy.json").write_text(json.dumps({"model": "digits_heavy:3", "goals": {}}))
    found, skipped = report._reports(report.SECTIONS["p4"], tmp_path)
    assert found == []
    assert [why.split(" ", 1)[1] for why in skipped] == ["predates the format of repeated runs: measure again"]
    found, skipped = report._reports(report.SECTIONS["p3"], tmp_path)
    assert found == [] and [why.split(" ", 1)[1] for why in skipped] == ["is missing"]


def test_replace_section_touches_only_its_markers_and_is_idempotent() -> None:
    text = (
        "# Title\n\nprose before\n<!-- bench:p1 -->\nold table\n<!-- /bench:p1 -->\nprose between\n"
        "<!-- bench:p2 -->\nother table\n<!-- /bench:p2 -->\nprose after\n"
    )
    once = report.replace_section(text, "p1", "| new | table |\n\nGoal x: **met**.\n")
    assert once == text.replace("old table", "| new | table |\n\nGoal x: **met**.")
    assert report.replace_section(once, "p1", "| new | table |\n\nGoal x: **met**.\n") == once
    with pytest.raises(ValueError, match="bench:p3"):
        report.replace_section(text, "p3", "anything")
    with pytest.raises(ValueError, match="bench:p1"):
        report.replace_section(text + "<!-- bench:p1 -->\n", "p1", "anything")


def _first_stage_report() -> dict:
    run = {"multiply_adds": 640, "us_per_row": 12.0, "test_accuracy": 0.96, "perturbed_accuracy": 0.7}
    summary = {
        key: report_io.spread([value]) if key != "multiply_adds" else value
        for key, value in {**run, "test_must_escalate": 0.04, "perturbed_must_escalate": 0.25}.items()
    }
    return {
        "benchmark": "first_stage",
        "date": "2025-01-02T00:00:00+00:00",
        "commit": "0123456789",
        "dirty": False,
        "machine": {"cpus": 2, "cpu_model": "a CPU", "tritonserver": None, "python": "3.11.7"}
        | {"load_average_at_start": [0.5], "load_average_at_end": [0.7]},
        "settings": {"seeds": [1], "shipped": "light:1", "heavy": "heavy:3", "noise_sigmas": [2.0], "copies": "c"}
        | {"cascade_tier": "standard", "cascade_goal": 0.995},
        "heavy": {"test": 0.99, "perturbed": 0.98},
        "runs": [{"candidate": "light:1", "seed": None, **run}],
        "summary": {"light:1": summary | {"runs": 1}, "an MLP": summary | {"runs": 3}},
        "cascade": {
            "light:1": {"pair": {"confidence_below": 0.7, "doubt_above": 0.15}}
            | {"test_accuracy": 0.99, "test_escalated": 0.2, "perturbed_accuracy": 0.975, "perturbed_escalated": 0.5},
            "an MLP": {"pair": None},
        },
    }


def test_the_first_stage_tables_give_the_bounds_and_say_when_no_pair_keeps_the_goal() -> None:
    text = bench_first_stage.table(_first_stage_report())
    baseline = "| `light:1` (baseline) | 640 | 12.0 (12.0 to 12.0) | 0.9600 | 0.7000 | 4.0% / 25.0% | 25.0x / 4.0x |"
    assert baseline in text
    assert "| an MLP, 3 seeds | 640 |" in text
    assert (
        "| `light:1` (baseline) | confidence < 0.7 or p(wrong) > 0.15 | 0.9900 / 0.9900 (20.0%) "
        "| 0.9750 / 0.9800 (50.0%) | 5.0x / 2.0x |" in text
    )
    assert "| an MLP | none keeps 99.5% of always-heavy's accuracy | | | |" in text


def test_perturbed_copies_keep_the_images_first_and_stay_in_range() -> None:
    images = np.tile(np.arange(64, dtype=np.float32).reshape(1, 8, 8) % 17, (5, 1, 1))
    copies = bench_first_stage.perturbed_copies(images, seed=1)
    assert copies.shape == (5 * (1 + len(bench_first_stage.NOISE_SIGMAS) + 2), 8, 8)  # and shifted, shifted noisy
    assert np.array_equal(copies[:5], images)
    assert copies.min() >= 0 and copies.max() <= 16
    assert not np.array_equal(copies[5:10], images), "the copies are perturbed"
    assert np.array_equal(bench_first_stage.perturbed_copies(images, seed=1), copies), "the same seed, the same copies"


def test_p2_counts_calls_per_router_execution_from_triton_deltas() -> None:
    before = {
        "router:1": {"requests": 100, "rows": 100, "executions": 40},
        "heavy:3": dict.fromkeys(("requests", "rows", "executions"), 10),
    }
    after = {
        "router:1": {"requests": 400, "rows": 400, "executions": 140},
        "heavy:3": {"requests": 50, "rows": 70, "executions": 45},
    }
    calls = bench_router._calls(before, after, "heavy:3")
    assert calls == {
        "router_requests_per_execution": 3.0,
        "heavy_calls_per_router_execution": 0.4,
        "heavy_rows_per_request": 0.2,
    }
