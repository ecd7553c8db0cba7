"""Assignment cost: which experiment arms a row is in (tierserve.assignment), per row, in-process.

Usage: .venv/bin/python perf/bench_assignment.py            (measures; writes perf/reports/assignment.json)
       .venv/bin/python perf/bench_assignment.py --table    (the README table, from the report)

Times Assigner.assign over ROWS rows with 0, 1 (a split) and 3 experiments (a split, a shadow and a Thompson
bandit with two arms, each in a layer of its own), RUNS times each: the median µs per row, with min and max.
Every row is eligible for every experiment and its unit is in every experiment's share of the layer, so each
row pays for all of them. Also shown, not part of the goal: assign() followed by Assigner.changes() (merging
the arms' changes), as the router calls them. Goal: at most 10 µs per row at 3 experiments. Exits 1 and
prints no table when the goal is missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import report_io
from report_io import spread

from tierserve.assignment import Assigner, Unit
from tierserve.experiment_spec import parse_experiments
from tierserve.policy import Policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import shipped_policy

REPORT = Path(__file__).parent / "reports" / "assignment.json"
ROWS, RUNS, GOAL_US = 10_000, 5, 10.0
# the arms replace the model the shipped cascade escalates to with digits_heavy:1
HEAVY_V1 = {shipped_policy(DEFAULT_REPOSITORY)["cascade"]["escalate_to"]: "digits_heavy:1"}
EXPERIMENTS = [
    {
        "name": "heavy_v1_vs_v2",
        "kind": "split",
        "layer": "models",
        "eligible": {"attributes": {"region": ["eu", "us"], "account_age_days": ">= 30"}},
        "arms": [{"name": "control", "weight": 50}, {"name": "heavy_v1", "weight": 50, "models": HEAVY_V1}],
    },
    {
        "name": "shadow_heavy_v1",
        "kind": "shadow",
        "layer": "shadow",
        "shadow": {"candidate": "digits_heavy:1", "fraction": 0.25},
    },
    {
        "name": "heavy_bandit",
        "kind": "bandit",
        "layer": "bandit",
        "bandit": {"strategy": "thompson"},
        "arms": [{"name": "control"}, {"name": "heavy_v1", "models": HEAVY_V1}],
    },
]
POSTERIORS = {"heavy_bandit": {"control": (41.0, 20.0), "heavy_v1": (56.0, 5.0)}}


def rows() -> list[Unit]:
    """ROWS eligible rows of distinct users, with the router's per-row seeds."""
    rng = random.Random(0)
    return [
        Unit(
            ("standard", "best_effort")[i % 2],
            f"user-{i}",
            {"region": ("eu", "us")[i % 2], "account_age_days": 30 + i % 400},
            rng.getrandbits(64),
        )
        for i in range(ROWS)
    ]


def microseconds_per_row(work: Callable[[], None]) -> dict[str, float]:
    return spread(seconds * 1e6 / ROWS for seconds in timeit.repeat(work, number=1, repeat=RUNS))


def measure() -> dict:
    head = report_io.header()
    policy = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
    units = rows()
    results = []
    for count in (0, 1, 3):
        assigner = Assigner(parse_experiments({"experiments": EXPERIMENTS[:count]}, policy))
        in_all = sum(len(assigner.assign(unit, POSTERIORS)) for unit in units)

        def assign(assigner: Assigner = assigner) -> None:
            for unit in units:
                assigner.assign(unit, POSTERIORS)

        def assign_and_merge(assigner: Assigner = assigner) -> None:
            for unit in units:
                Assigner.changes(assigner.assign(unit, POSTERIORS))

        results.append(
            {
                "experiments": count,
                "kinds": [e["kind"] for e in EXPERIMENTS[:count]],
                "assignments_per_row": in_all / ROWS,  # below `experiments` only by the shadow's unmirrored rows
                "assign_us_per_row": microseconds_per_row(assign),
                "assign_and_changes_us_per_row": microseconds_per_row(assign_and_merge),
            }
        )
    at_three = results[-1]["assign_us_per_row"]["median"]
    return {
        **head,
        "rows": ROWS,
        "runs": RUNS,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "goal_us_per_row_at_3_experiments": GOAL_US,
        "results": results,
        "goal_met": at_three <= GOAL_US,
    }


def table(report: dict) -> str:
    """The README's assignment table, from the report."""
    lines = [
        f"| experiments | assign() µs per row, median of {report['runs']} (min to max) | with changes() | goal |",
        "|---|---:|---:|---|",
    ]
    for result in report["results"]:
        a, c = result["assign_us_per_row"], result["assign_and_changes_us_per_row"]
        kinds = ", ".join(result["kinds"]) or "none"
        goal = f"≤ {report['goal_us_per_row_at_3_experiments']:g} µs: **met**" if result["experiments"] == 3 else ""
        lines.append(
            f"| {result['experiments']} ({kinds}) | {a['median']:.2f} ({a['min']:.2f} to {a['max']:.2f}) "
            f"| {c['median']:.2f} | {goal} |"
        )
    lines.append(f"\n{report['rows']:,} rows, each in every experiment; Python {report['python']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help=f"print the README table from {REPORT}")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args()
    if args.table:
        report = json.loads(args.report.read_text())
    else:
        report = measure()
        print(f"wrote {report_io.write(report, args.report)}")
    if not report["goal_met"]:
        at_three = report["results"][-1]["assign_us_per_row"]["median"]
        print(f"goal missed: {at_three:.2f} µs per row at 3 experiments > {GOAL_US:g} µs", file=sys.stderr)
        sys.exit(1)
    print(table(report))


if __name__ == "__main__":
    main()
