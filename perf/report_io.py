"""Benchmark reports: one JSON file per benchmark in perf/reports/, from which perf/report.py makes the README's
tables and plots.

A report holds what was measured and where: "benchmark", "date" (UTC), "commit" (and "dirty" with the tracked files
changed since it, which were measured too), "machine" (CPUs, platform, Python, tritonserver, the load average at the
start and at the end), "settings", "runs" (every figure of every run) and "summary" (medians with their min and max
over the runs, and the goals). A goal carries its measured value, an operator and a threshold, so a reader (and
perf/report.py) computes the verdict from the figures instead of trusting a word.
"""

from __future__ import annotations

import argparse
import datetime
import json
import operator
import os
import platform
import statistics
import subprocess
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

REPORTS = Path(__file__).parent / "reports"
ROOT = Path(__file__).resolve().parent.parent
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
SYMBOLS = {">=": "≥", "<=": "≤", ">": ">", "<": "<", "==": "="}


def spread(values: Iterable[float]) -> dict[str, float]:
    """The median of repeated measurements, with their min and max."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread_text(value: Mapping[str, float], fmt: str) -> str:
    """A spread as the README's tables show it: '1,234 (1,200 to 1,250)'."""
    return f"{value['median']:{fmt}} ({value['min']:{fmt}} to {value['max']:{fmt}})"


def cell(value: Mapping[str, float], fmt: str) -> str:
    """A table cell of a spread: the one value when every run measured the same, else the median, min and max."""
    return f"{value['median']:{fmt}}" if value["min"] == value["max"] else spread_text(value, fmt)


def conditions(runs: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Per condition of the runs' "measurements" (a distinct value of `keys`, in the order first measured): how many
    runs measured it and each of `metrics` as a spread over them (a metric no run measured is left out)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for measurement in run["measurements"]:
            groups.setdefault(tuple(measurement[key] for key in keys), []).append(measurement)
    summary = []
    for key, rows in groups.items():
        figures = {metric: [row[metric] for row in rows if row.get(metric) is not None] for metric in metrics}
        summary.append(
            {**dict(zip(keys, key, strict=True)), "runs": len(rows)}
            | {metric: spread(values) for metric, values in figures.items() if values}
        )
    return summary


def ratios(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each of the runs' "ratios" (figures computed within one run, so noise hits both sides alike) as a spread."""
    names = dict.fromkeys(name for run in runs for name in run["ratios"])
    return {
        name: spread(run["ratios"][name] for run in runs if run["ratios"].get(name) is not None)
        for name in names
        if any(run["ratios"].get(name) is not None for run in runs)
    }


def goal(
    text: str, value: float | Mapping[str, float] | None, op: str, threshold: float, fmt: str | None = None
) -> dict[str, Any]:
    """A goal as reports record it: what is asked, the measured value (a number, or a spread judged by its median),
    the comparison, the threshold, and how figures are written (a format spec; None: `number`); "met" is what `met`
    says."""
    if op not in OPERATORS:
        raise ValueError(f"goal {text!r}: unknown operator {op!r}; expected one of {', '.join(OPERATORS)}")
    entry = {"goal": text, "value": value, "op": op, "threshold": threshold, "format": fmt}
    return {**entry, "met": met(entry)}


def met(goal: Mapping[str, Any]) -> bool:
    """Whether a goal's value passes its threshold, computed from the figures (a missing value never does)."""
    value = goal["value"]
    if isinstance(value, Mapping):
        value = value["median"]
    return value is not None and OPERATORS[goal["op"]](value, goal["threshold"])


def number(value: float) -> str:
    """A figure in a sentence: whole numbers with separators, others to three significant digits."""
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def verdicts(goals: list[Mapping[str, Any]]) -> str:
    """One line per goal: what it asks, what was measured and its verdict, computed here."""
    lines = []
    for g in goals:
        fmt = g.get("format")

        def text(x: float, fmt: str | None = fmt) -> str:
            return number(x) if fmt is None else f"{x:{fmt}}"

        value = g["value"]
        if value is None:
            measured = "not measured"
        elif isinstance(value, Mapping) and value["min"] != value["max"]:
            measured = f"{text(value['median'])} ({text(value['min'])} to {text(value['max'])})"
        elif isinstance(value, Mapping):
            measured = text(value["median"])
        else:
            measured = text(value)
        verdict = "**met**" if met(g) else "**not met**"
        lines.append(f"Goal {g['goal']} {SYMBOLS[g['op']]} {text(g['threshold'])}: {measured}, {verdict}.")
    return "\n".join(lines)


def git_commit() -> dict[str, Any]:
    """The commit measured; "dirty" when tracked files differ from it (listed: they were measured too)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "uncommitted_changes": changed}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: other work on the machine makes every figure worse."""
    return [round(x, 2) for x in os.getloadavg()]


def tritonserver_version(http_url: str) -> str | None:
    """The version a running tritonserver reports (its /v2 metadata)."""
    with urllib.request.urlopen(f"http://{http_url}/v2", timeout=5) as response:
        return json.load(response).get("version")


def machine(http_url: str | None = None) -> dict[str, Any]:
    """The machine (and, given a server's HTTP address, the tritonserver version), with the load average now."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tritonserver": tritonserver_version(http_url) if http_url else None,
        "load_average_at_start": load_average(),
    }


def header() -> dict[str, Any]:
    """What every report says first, taken as the benchmark starts: the date, the commit and the machine."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **git_commit(),
        "machine": machine(),
    }


def start(benchmark: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The head of a report of repeated runs; the benchmark appends to "runs"."""
    return {"benchmark": benchmark, **header(), "settings": settings, "runs": []}


def write(report: dict[str, Any], path: Path) -> Path:
    """Record the load average at the end in a report begun with `header`, and write it to `path`."""
    report["machine"]["load_average_at_end"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def finish(report: dict[str, Any], summary: dict[str, Any], path: Path) -> Path:
    """Add the summary to a report of repeated runs and write it to `path`."""
    report["summary"] = summary
    return write(report, path)


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def repeated_runs(report: Mapping[str, Any]) -> bool:
    """Whether a report has the format of repeated runs (`start`, `finish`): runs and their summary."""
    return "benchmark" in report and "summary" in report and bool(report.get("runs"))


def provenance(report: Mapping[str, Any]) -> str:
    """How often, where and when a report of repeated runs was measured, as the line under its table says it."""
    runs = len(report["runs"])
    return f"{runs} run{'s' if runs != 1 else ''}, {measured(report)}"


def measured(report: Mapping[str, Any]) -> str:
    """Where and when a report was measured: the date, the commit, the machine and its load average."""
    m = report["machine"]
    start, end = m["load_average_at_start"][0], m.get("load_average_at_end", [float("nan")])[0]
    dirty = " with uncommitted changes" if report["dirty"] else ""
    return (
        f"{report['date'][:10]}, commit {report['commit'][:7]}{dirty}; "
        f"{m['cpus']} CPUs ({m['cpu_model']}), tritonserver {m['tritonserver'] or 'unknown'}, Python {m['python']}; "
        f"1-minute load average {start:g} at the start, {end:g} at the end."
    )


def add_arguments(parser: argparse.ArgumentParser, runs: int = 3) -> None:
    """The options every benchmark with repeated runs takes: how many runs, where its reports go, --table."""
    parser.add_argument("--runs", type=int, default=runs, help=f"runs, each of every condition (default {runs})")
    parser.add_argument("--reports", type=Path, default=REPORTS, help=f"where reports are (default {REPORTS})")
    parser.add_argument("--table", action="store_true", help="print the README table from the report, measure nothing")


def measure_or_table(
    description: str, report_name: str, measure: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str]
) -> None:
    """The command line of a benchmark measured once (no --runs): measure, write perf/reports/`report_name` (or
    --reports) and print its table; with --table, print the table from the report and measure nothing."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=Path, default=REPORTS, help="where reports are")
    parser.add_argument("--table", action="store_true", help="print the table from the report, measure nothing")
    args = parser.parse_args()
    if args.table:
        print(table(read(args.reports / report_name)))
        return
    report = measure()
    write(report, args.reports / report_name)
    print(f"wrote {args.reports / report_name}\n\n{table(report)}")
