"""P6 decision cost: signature + policy (rules, cascade verdict with the learned router) per request, in-process.

Usage: .venv/bin/python perf/bench_decision.py [--runs 5]   (seconds; writes perf/reports/decision.json)
       .venv/bin/python perf/bench_decision.py --table      (the README table, from the report)
Times the router's pure Python work for one request of 1 image and for a dynamic batch of 64 images, with the built
policy and artifacts; model calls are excluded. Each run is the best of 5 repeats of a timed loop (the fastest is the
least disturbed by other work on the machine); the report gives the median of the runs with min and max.
Goal: at most 20 µs per request (judged per image of a 64-image batch, and for a lone image).
"""

from __future__ import annotations

import argparse
import functools
import sys
import timeit
from pathlib import Path

import numpy as np
import report_io
from report_io import spread_text

from tierserve.resize import source_stats
from tierserve.router_files import ROUTER_MODEL, load_router
from tierserve.signature import RequestContext, signatures
from tierserve.tools.build_models import build_all
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY

REPORT = "decision.json"
GOAL_US = 20.0
BATCHES = {1: 2000, 64: 200}  # images per request: timed loops per repeat


def measure(runs: int, reports: Path) -> dict:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    report = report_io.start("decision", {"images_per_request": list(BATCHES), "loops": BATCHES, "repeats": 5})
    router, stats = load_router(DEFAULT_REPOSITORY / ROUTER_MODEL, "1")
    images = load_split().test.images[:64]
    probs = np.full((64, 10), 0.1, np.float32)
    context = RequestContext("standard", "user-1", 50)

    def decide(batch: np.ndarray, source: np.ndarray, first_probs: np.ndarray) -> None:
        rows = signatures(batch, source, [context] * len(batch), stats)
        for row in rows:
            router.decide(row)
        router.escalations(rows, first_probs, batch)

    for _ in range(runs):
        measurements = []
        for count, loops in BATCHES.items():
            batch = images[:count]
            # the source facts are computed with the resize, before the decision
            work = functools.partial(decide, batch, source_stats(batch), probs[:count])
            seconds = min(timeit.repeat(work, number=loops, repeat=5)) / loops
            measurements.append(
                {"images": count, "us_per_request": seconds * 1e6, "us_per_image": seconds * 1e6 / count}
            )
        report["runs"].append({"measurements": measurements})
    summary = report_io.conditions(report["runs"], ("images",), ("us_per_request", "us_per_image"))
    by_images = {row["images"]: row for row in summary}
    goals = [
        report_io.goal("µs per image, 64-image batch", by_images[64]["us_per_image"], "<=", GOAL_US, ".1f"),
        report_io.goal("µs per request, one image", by_images[1]["us_per_request"], "<=", GOAL_US, ".1f"),
    ]
    report_io.finish(report, {"conditions": summary, "goals": goals}, reports / REPORT)
    return report


def table(report: dict) -> str:
    """The README's P6 table, from the report."""
    lines = ["| work | images | µs per request, median (min to max) | µs per image |", "|---|---:|---:|---:|"]
    for row in report["summary"]["conditions"]:
        lines.append(
            f"| signature + rules + cascade verdict | {row['images']} | {spread_text(row['us_per_request'], '.1f')} "
            f"| {row['us_per_image']['median']:.1f} |"
        )
    lines += [
        "",
        report_io.verdicts(report["summary"]["goals"]),
        f"Each run the best of 5 timed loops, in-process. {report_io.provenance(report)}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_io.add_arguments(parser, runs=5)
    args = parser.parse_args()
    report = report_io.read(args.reports / REPORT) if args.table else measure(args.runs, args.reports)
    if not args.table:
        print(f"wrote {args.reports / REPORT}", file=sys.stderr)
    print(table(report))


if __name__ == "__main__":
    main()
