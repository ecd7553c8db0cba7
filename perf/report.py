"""The README's benchmark tables and plots, generated from the reports in perf/reports/ (never typed by hand).

Usage: .venv/bin/python perf/report.py                  (print every section's Markdown)
       .venv/bin/python perf/report.py --plots          (write the plots: perf/reports/<report>.png)
       .venv/bin/python perf/report.py --write-readme   (the plots, and each section into README.md)

Each section of README.md stands between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; --write-readme replaces
what is between them and nothing else. A section whose reports are missing, or predate the format of repeated runs,
is left as it is (said on stderr). A plot shows per condition the throughput and the p50/p99 latency, each the
median of the runs with their min to max as error bars.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_assignment
import bench_capacity
import bench_chaos
import bench_decision
import bench_experiments
import bench_first_stage
import bench_inference_log
import bench_inference_log_router
import bench_learned_router
import bench_models
import bench_router
import bench_state
import bench_stub_cpu
import bench_tiers
import choose_thresholds
import report_io
import soak

README = report_io.ROOT / "README.md"


@dataclass(frozen=True)
class Section:
    """A README section: the reports it is made from, its table, and which figure its plot shows as throughput."""

    files: tuple[str, ...]
    table: Callable[[list[dict]], str]
    throughput: str | None = "throughput"  # None: no plot (a report without repeated runs)
    throughput_label: str = "inferences / s"
    title: str = ""
    timeline: Callable[[Path], Path] | None = None  # a report's plot of its own (its last run), linked too


def _one_table(report: str | Path, table: Callable[[dict], str]) -> Section:
    """A section that is one report's table (the report's file name, or its path under perf/reports), no plot."""
    return Section((Path(report).name,), lambda reports: table(reports[0]), throughput=None)


SECTIONS = {
    "models": Section(("models.json",), lambda reports: bench_models.table(reports[0]), throughput=None),
    "p1": Section(("p1.json",), lambda reports: bench_router.p1_table(reports[0]), title="P1 routing overhead"),
    "p2": Section(("p2.json",), lambda reports: bench_router.p2_table(reports[0]), title="P2 cascade efficiency"),
    "stub_cpu": _one_table(bench_stub_cpu.REPORT, bench_stub_cpu.table),
    "learned_router": _one_table(bench_learned_router.REPORT, bench_learned_router.table),
    "thresholds": _one_table(choose_thresholds.REPORT, choose_thresholds.table),
    "first_stage": _one_table(bench_first_stage.REPORT, bench_first_stage.table),
    "p6": _one_table(bench_decision.REPORT, bench_decision.table),
    "p3": Section(
        ("p3.json",),
        lambda reports: bench_tiers.table(reports[0]),
        throughput="best_effort_answered",
        throughput_label="best_effort answered / s",
        title="P3 service tiers under overload",
    ),
    "p4": Section(
        tuple(f"p4_{name}.json" for name in bench_chaos.KILLED),
        bench_chaos.table,
        throughput_label="answered / s",
        title="P4 kill -9 under load",
        timeline=lambda report: report.with_name(report.name.replace("p4_", "p4_timeline_", 1)).with_suffix(".png"),
    ),
    "state": Section(
        (bench_state.REPORT,), lambda reports: bench_state.table(reports[0]), title="State store: Redis vs embedded"
    ),
    "assignment": _one_table(bench_assignment.REPORT, bench_assignment.table),
    "shadow": _one_table(bench_experiments.SHADOW_REPORT, bench_experiments.shadow_table),
    "adaptation": _one_table(bench_experiments.ADAPTATION_REPORT, bench_experiments.adaptation_table),
    "inference_log": _one_table(bench_inference_log.REPORT, bench_inference_log.table),
    "inference_log_router": _one_table(bench_inference_log_router.REPORT, bench_inference_log_router.table),
    "soak": _one_table(soak.REPORT, soak.table),
    "capacity": _one_table(bench_capacity.REPORT, bench_capacity.table),  # one server's figures: nothing to plot
}


def _reports(section: Section, reports: Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The section's reports that can be shown, and why the others cannot."""
    found, skipped = [], []
    for name in section.files:
        path = reports / name
        if not path.is_file():
            skipped.append(f"{path} is missing")
            continue
        report = report_io.read(path)
        if section.throughput is not None and not report_io.repeated_runs(report):
            skipped.append(f"{path} predates the format of repeated runs: measure again")
            continue
        found.append((path, report))
    return found, skipped


def markdown(section: Section, found: list[tuple[Path, dict]]) -> str:
    """The section's tables, and links to its plots (paths from the repository root)."""
    text = section.table([report for _, report in found])
    if section.throughput is None:
        return text
    images = [plot_path(path) for path, _ in found]
    if section.timeline:
        images += [image for path, _ in found if (image := section.timeline(path)).is_file()]
    links = [f"![{section.title}: {image.stem}]({os.path.relpath(image, report_io.ROOT)})" for image in images]
    return text + "\n\n" + "\n".join(links)


def plot_path(report: Path) -> Path:
    """Where a report's plot goes: beside it, named after it."""
    return report.with_suffix(".png")


def plot(section: Section, report: dict, path: Path) -> Path:
    """Throughput and p50/p99 latency per condition of the report, medians with min-max error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conditions = report["summary"]["conditions"]
    names = [c["condition"] for c in conditions]
    x = np.arange(len(conditions))

    def bars(ax: Any, metric: str, offset: float, width: float, label: str) -> None:
        medians, low, high = [], [], []
        for c in conditions:
            value = c.get(metric) or {"median": np.nan, "min": np.nan, "max": np.nan}
            medians.append(value["median"])
            low.append(value["median"] - value["min"])
            high.append(value["max"] - value["median"])
        ax.bar(x + offset, medians, width, yerr=[low, high], capsize=3, label=label)

    metrics = [m for m in (section.throughput,) if any(m in c for c in conditions)]
    fig, axes = plt.subplots(len(metrics) + 1, 1, figsize=(max(8.0, 1.1 * len(names) + 2), 3.2 * (len(metrics) + 1)))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics, strict=False):
        bars(ax, metric, 0.0, 0.6, section.throughput_label)
        ax.set_ylabel(section.throughput_label)
    latency = axes[-1]
    bars(latency, "p50_ms", -0.2, 0.4, "p50")
    bars(latency, "p99_ms", 0.2, 0.4, "p99")
    latency.set_ylabel("latency, ms")
    latency.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, names if ax is latency else [""] * len(names), rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    runs = len(report["runs"])
    title = f"{section.title} ({report['benchmark']})" if len(section.files) > 1 else section.title
    fig.suptitle(
        f"{title}: median of {runs} run{'s' if runs != 1 else ''}, bars from min to max "
        f"({report['date'][:10]}, {report['commit'][:7]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with what stands between the markers of section `name` replaced by `body`; the rest unchanged."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"expected one {begin} followed by one {end}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body.strip()}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=Path, default=report_io.REPORTS, help="where the reports are")
    parser.add_argument("--plots", action="store_true", help="write the plots beside the reports")
    parser.add_argument("--write-readme", action="store_true", help="the plots, and the sections into README.md")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("sections", nargs="*", help=f"only these of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    if unknown := sorted(set(args.sections) - set(SECTIONS)):
        parser.error(f"unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    readme = args.readme.read_text() if args.write_readme else ""
    for name in args.sections or list(SECTIONS):
        section = SECTIONS[name]
        found, skipped = _reports(section, args.reports)
        for why in skipped:
            print(f"{name}: {why}", file=sys.stderr)
        if not found:
            print(f"{name}: nothing to show, left as it is", file=sys.stderr)
            continue
        text = markdown(section, found)
        print(f"<!-- bench:{name} -->\n{text}\n<!-- /bench:{name} -->\n")
        if section.throughput is not None and (args.plots or args.write_readme):
            for path, report in found:
                print(f"wrote {plot(section, report, plot_path(path))}", file=sys.stderr)
        if args.write_readme:
            readme = replace_section(readme, name, text)
    if args.write_readme:
        args.readme.write_text(readme)
        print(f"wrote {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
