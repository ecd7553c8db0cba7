"""What the inference log costs the router on a real server: `digits` throughput and latency at concurrency 8 with
the log on (as shipped) and off.

Usage: .venv/bin/python perf/bench_inference_log_router.py           (~7 min)
       .venv/bin/python perf/bench_inference_log_router.py --table   (the README table, from the report)

Two repositories that differ in one file: each links every built model and the router's files, and the OFF one
writes the router's inference_log.yaml with `enabled: false` (the shipped settings otherwise). Both serve the shipped
policy with standard requests never shed (bench_policy): perf_analyzer stops at the first error. A pair: a fresh
server on each (both running, each with its log in its own directory), each warmed up, then four bursts of
perf_analyzer, ON OFF OFF ON (the next pair OFF ON ON OFF, and so on), so that a drift of the machine's speed (other
people's work on it) weighs on both conditions alike. A burst: perf_analyzer at concurrency 8 through `digits` over
gRPC, one real test image per request (the first 64 of the held-out split, every other one with Gaussian noise of
sigma 3, so the cascade escalates some), standard tier, 3 windows of WINDOW_MS. The windows need not agree
(--stability-percentage 999): on this shared machine they seldom agree within 20% for long, and a fixed
--request-count is timed to the whole second only; the alternation and the medians over bursts and pairs stand in
for that check. After the bursts: the rows each server's router answered (Triton's own statistics), the rows its log
holds (tools/log_admin.query), the dropped and lost records (tierserve_inference_log_records_total on the metrics
port); per burst, the CPU time the router's stubs and tritonserver itself used (/proc).

Reported (perf/reports/inference_log_router.json): per condition the median over bursts of throughput and p50/p99,
with min and max; per pair the ON/OFF throughput ratio (ON bursts' mean over OFF bursts' mean) and the router-stub
CPU per row ON minus OFF; the goal is judged by the median pair ratio (ON at most 5% lower: >= 0.95). Rows served,
logged, dropped; the machine, the load average before each burst, the date, the commit (and the files changed
since) and the settings.

Operating point, else exit status 1, the reason on stderr, and no table: at least 3 pairs, every burst completing
without a failed request; the ON server of every pair logged rows, and its log accounts for every row its router
answered (logged + dropped + lost = answered); no OFF server logged a row. Exit status 2 when the goal is missed (the
table is printed, with the verdict).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import perf_analyzer
import yaml
from harness import bench_policy, process_cpu_s, running_server
from report_io import git_commit, load_average, machine, spread, spread_text

from tierserve.client import TierserveClient
from tierserve.inference_log import SETTINGS_FILE, load_settings
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.tools.dataset import load_split
from tierserve.tools.log_admin import LogDirectoryError, query
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import router_variant
from tierserve.tools.server import TritonServer
from tierserve.tools.workload import noisy

REPORT = Path(__file__).parent / "reports" / "inference_log_router.json"
PAIRS, CONCURRENCY, WINDOW_MS = 6, 8, 3000  # a burst: perf_analyzer's 3 windows of WINDOW_MS
TIER = "standard"
IMAGES, SIGMA, NOISE_SEED = 64, 3.0, 1
CONDITIONS = ("on", "off")
ORDERS = (("on", "off", "off", "on"), ("off", "on", "on", "off"))  # pair 1, 2, 3, ...: ABBA, BAAB, ABBA, ...
RATIO_GOAL = 0.95  # ON throughput at most 5% lower than OFF
WARM_UP_REQUESTS = 200  # one at a time, before the bursts
QUIET_S = 1.0  # after the warm-up: the router's queue-wait gauge falls back
ACCOUNTED_WITHIN_S = 10.0  # after the load stops, the writer must have flushed every row by then (interval 1 s)
METRIC = "tierserve_inference_log_records_total"


def workload() -> np.ndarray:
    """The first IMAGES test images, every other one with Gaussian noise (sigma SIGMA)."""
    images = load_split().test.images[:IMAGES].copy()
    images[1::2] = noisy(images[1::2], SIGMA, NOISE_SEED)
    return images


def repositories(root: Path) -> dict[str, Path]:
    """The ON repository (the log as shipped) and the OFF one (the router's log settings with enabled: false)."""
    shipped = yaml.safe_load((DEFAULT_REPOSITORY / ROUTER_MODEL / SETTINGS_FILE).read_text())
    off = yaml.safe_dump({**shipped, "enabled": False}, sort_keys=False)
    policy = yaml.safe_dump(bench_policy(), sort_keys=False)
    files = {"on": {POLICY_FILE: policy}, "off": {POLICY_FILE: policy, SETTINGS_FILE: off}}
    made = {}
    for condition, replaced in files.items():
        (root / condition).mkdir()
        made[condition] = router_variant(DEFAULT_REPOSITORY, root / condition, replaced)
        settings = load_settings(made[condition] / ROUTER_MODEL, str(root / "log"))
        if settings.enabled != (condition == "on"):
            raise SystemExit(f"{made[condition] / ROUTER_MODEL / SETTINGS_FILE}: the log is not {condition} there")
    return made


def _served(server: TritonServer) -> dict[str, int]:
    """Triton's own counts for the router since the server started: rows answered and failed requests."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{ROUTER_MODEL}/stats", timeout=5) as response:
        stats = json.load(response)["model_stats"]
    return {
        "rows": sum(int(s["inference_count"]) for s in stats),
        "failed": sum(int(s["inference_stats"]["fail"]["count"]) for s in stats),
    }


def _logged(log_dir: Path) -> dict[str, int]:
    """Rows the log holds, and how many of them the cascade escalated (more than one hop)."""
    try:
        result = query(log_dir, "SELECT count(*), count(*) FILTER (WHERE len(path) > 1) FROM inferences")
    except LogDirectoryError:  # no router wrote a log: none was opened
        return {"rows": 0, "escalated": 0}
    rows, escalated = result.rows[0]
    return {"rows": int(rows), "escalated": int(escalated)}


def _log_records(server: TritonServer) -> dict[str, int]:
    """tierserve_inference_log_records_total by outcome, summed over router instances (a series appears once its
    count grows, so an absent one is 0)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    counts = {"dropped": 0, "lost": 0}
    for line in text.splitlines():
        if line.startswith(METRIC + "{"):
            labels, value = line[len(METRIC) + 1 :].rsplit("} ", 1)
            for outcome in counts:
                if f'outcome="{outcome}"' in labels:
                    counts[outcome] += int(float(value))
    return counts


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes (every thread) have used."""
    return sum(process_cpu_s(pid) for pid in pids)


def _processes(server: TritonServer) -> dict[str, list[int]]:
    assert server.pid is not None, "a running server"
    return {"router_stub": [s.pid for s in server.stubs() if s.model == ROUTER_MODEL], "tritonserver": [server.pid]}


def _warm_up(server: TritonServer, images: np.ndarray) -> None:
    """WARM_UP_REQUESTS requests one at a time: a fresh server's first executes are slow."""
    with TierserveClient(server.grpc_url) as client:
        for i in range(WARM_UP_REQUESTS):
            client.classify(images[i % len(images)], tier=TIER)
    time.sleep(QUIET_S)


def burst(condition: str, server: TritonServer, images: np.ndarray, problems: list[str]) -> dict | None:
    """perf_analyzer at CONCURRENCY through `digits` for 3 windows: throughput, latency, and CPU per row answered."""
    processes = _processes(server)
    load = os.getloadavg()[0]
    served_before = _served(server)
    cpu_before = {name: _cpu_s(pids) for name, pids in processes.items()}
    started = time.monotonic()
    try:
        (m,) = perf_analyzer.run(
            server.grpc_url,
            "digits",
            images,
            [CONCURRENCY],
            measurement_ms=WINDOW_MS,
            stability_percentage=perf_analyzer.ANY_SPREAD,
            extra_args=("--request-parameter", f"tier:{TIER}:string"),
        )
    except subprocess.CalledProcessError as error:
        problems.append(f"{condition}: perf_analyzer exited {error.returncode} (a request failed: see stderr)")
        return None
    seconds = time.monotonic() - started
    cpu = {name: _cpu_s(pids) - cpu_before[name] for name, pids in processes.items()}
    rows = _served(server)["rows"] - served_before["rows"]
    return {
        "condition": condition,
        "throughput": m.throughput,
        "p50_ms": m.p50_us / 1000,
        "p99_ms": m.p99_us / 1000,
        "seconds": round(seconds, 1),
        "rows": rows,
        "load_average_1m_before": round(load, 2),
        "cpu_us_per_row": {name: 1e6 * s / max(rows, 1) for name, s in cpu.items()},
    }


def accounting(condition: str, server: TritonServer, at_ready: dict[str, int], problems: list[str]) -> dict:
    """Rows answered since the server was ready (`at_ready`: Triton's model warm-up samples, which the router
    answers without logging, are counted before) against rows logged, dropped and lost, once the writer has flushed
    (every flush_interval_s; the metrics follow every FLUSH_S): waited for up to ACCOUNTED_WITHIN_S."""
    deadline = time.monotonic() + ACCOUNTED_WITHIN_S
    while True:
        time.sleep(1.0)
        served = {key: value - at_ready[key] for key, value in _served(server).items()}
        logged, records = _logged(server.inference_log), _log_records(server)
        accounted = logged["rows"] + records["dropped"] + records["lost"]
        if condition == "off" or accounted >= served["rows"] or time.monotonic() > deadline:
            break
    result = {
        "rows_answered": served["rows"],
        "requests_failed": served["failed"],
        "rows_logged": logged["rows"],
        "rows_logged_escalated": logged["escalated"],
        "records_dropped": records["dropped"],
        "records_lost": records["lost"],
    }
    if served["failed"]:
        problems.append(f"{condition}: {served['failed']:,} requests failed")
    if condition == "on" and not logged["rows"]:
        problems.append(f"on: the log recorded no row of the {served['rows']:,} answered")
    elif condition == "on" and accounted != served["rows"]:
        problems.append(
            f"on: the log does not account for the rows answered: {served['rows']:,} answered, "
            f"{logged['rows']:,} logged, {records['dropped']:,} dropped, {records['lost']:,} lost"
        )
    if condition == "off" and logged["rows"]:
        problems.append(f"off: the log recorded {logged['rows']:,} rows with enabled: false")
    return result


def measure_pair(index: int, made: dict[str, Path], images: np.ndarray, facts: dict, problems: list[str]) -> dict:
    """Both servers of one pair, warmed up; the bursts in this pair's order; then each log's accounting. The
    machine's facts go into `facts` (once)."""
    order = ORDERS[index % 2]
    with contextlib.ExitStack() as stack:
        servers = {c: stack.enter_context(running_server(made[c])) for c in CONDITIONS}
        facts.update(facts or machine(servers["on"].http_url))
        at_ready = {c: _served(server) for c, server in servers.items()}
        for server in servers.values():
            _warm_up(server, images)
        bursts = []
        for condition in order:
            if (result := burst(condition, servers[condition], images, problems)) is not None:
                bursts.append({"pair": index, **result})
                print(
                    f"  pair {index + 1} {condition}: {result['throughput']:,.0f}/s, p50 {result['p50_ms']:.2f} ms, "
                    f"p99 {result['p99_ms']:.2f} ms, router stubs {result['cpu_us_per_row']['router_stub']:.0f} µs "
                    f"CPU per row; load {result['load_average_1m_before']}",
                    flush=True,
                )
        logs = {c: accounting(c, server, at_ready[c], problems) for c, server in servers.items()}
    pair: dict = {"pair": index, "order": list(order), "logs": logs}
    mine = {c: [b for b in bursts if b["condition"] == c] for c in CONDITIONS}
    if all(len(mine[c]) == order.count(c) for c in CONDITIONS):
        mean = {c: statistics.mean(b["throughput"] for b in mine[c]) for c in CONDITIONS}
        cpu = {c: statistics.mean(b["cpu_us_per_row"]["router_stub"] for b in mine[c]) for c in CONDITIONS}
        pair["ratio"] = mean["on"] / mean["off"]
        pair["router_stub_cpu_us_per_row_added"] = cpu["on"] - cpu["off"]
    print(
        f"  pair {index + 1}: on/off {pair.get('ratio', float('nan')):.3f}; on log: "
        f"{logs['on']['rows_answered']:,} answered, {logs['on']['rows_logged']:,} logged, "
        f"{logs['on']['records_dropped']:,} dropped; off log: {logs['off']['rows_logged']:,} logged",
        flush=True,
    )
    return {"pair": pair, "bursts": bursts}


def measure() -> dict:
    images = workload()
    problems: list[str] = []
    facts: dict = {}
    load_start, started = load_average(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        made = repositories(Path(tmp))
        measured = [measure_pair(index, made, images, facts, problems) for index in range(PAIRS)]
    pairs = [m["pair"] for m in measured]
    bursts = [b for m in measured for b in m["bursts"]]
    complete = [p for p in pairs if "ratio" in p]
    summary = {}
    for condition in CONDITIONS:
        mine = [b for b in bursts if b["condition"] == condition]
        if not mine:
            problems.append(f"no {condition} burst completed")
            continue
        logs = [p["logs"][condition] for p in pairs]
        summary[condition] = {
            "bursts": len(mine),
            "throughput": spread([b["throughput"] for b in mine]),
            "p50_ms": spread([b["p50_ms"] for b in mine]),
            "p99_ms": spread([b["p99_ms"] for b in mine]),
            "cpu_us_per_row": {
                name: spread([b["cpu_us_per_row"][name] for b in mine]) for name in ("router_stub", "tritonserver")
            },
            **{key: sum(log[key] for log in logs) for key in logs[0]},
        }
    if len(complete) < 3:
        problems.append(f"{len(complete)} complete pairs, fewer than 3")
    ratio = spread([p["ratio"] for p in complete]) if complete else None
    shipped = yaml.safe_load((DEFAULT_REPOSITORY / ROUTER_MODEL / SETTINGS_FILE).read_text())
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **git_commit(),
        "machine": {
            **facts,
            "load_average_at_start": load_start,
            "load_average_at_end": load_average(),
            "note": "perf_analyzer and the servers share the CPUs, and so may other people's work on this machine",
        },
        "run": {
            "pairs": PAIRS,
            "order": "per pair a fresh server on each repository, both running; bursts ON OFF OFF ON, the next pair "
            "OFF ON ON OFF, and so on",
            "concurrency": CONCURRENCY,
            "window_ms": WINDOW_MS,
            "burst": f"perf_analyzer's first 3 windows of {WINDOW_MS} ms, whatever their spread",
            "tier": TIER,
            "images": f"the first {IMAGES} test images, every other one with Gaussian noise sigma {SIGMA:g} "
            f"(seed {NOISE_SEED}); one image per request, gRPC",
            "warm_up_requests": WARM_UP_REQUESTS,
            "log_settings_on": shipped,
            "log_settings_off": {**shipped, "enabled": False},
            "load_shedding": bench_policy()["load_shedding"],
            "seconds": round(time.monotonic() - started),
        },
        "bursts": bursts,
        "pairs": pairs,
        "summary": summary,
        "throughput_ratio_of_medians": (
            summary["on"]["throughput"]["median"] / summary["off"]["throughput"]["median"]
            if len(summary) == 2
            else None
        ),
        "pair_ratio": ratio,
        "pair_router_stub_cpu_us_per_row_added": (
            spread([p["router_stub_cpu_us_per_row_added"] for p in complete]) if complete else None
        ),
        "goal": f"throughput with the log on at most {1 - RATIO_GOAL:.0%} lower than off "
        f"(median per-pair ratio >= {RATIO_GOAL:.2f})",
        "problems": problems,
        "goal_met": not problems and ratio is not None and ratio["median"] >= RATIO_GOAL,
    }


def table(report: dict) -> str:
    """The README table, from the report."""
    s, run = report["summary"], report["run"]

    lines = [
        f"| inference log (concurrency {run['concurrency']}, {run['tier']} tier) | bursts "
        "| inferences/s, median (min to max) | p50 ms | p99 ms | router stubs' CPU µs per row | rows answered "
        "| rows logged | dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for condition, name in (("on", "on (as shipped)"), ("off", "off (`enabled: false`)")):
        c = s[condition]
        cells = [name, str(c["bursts"]), spread_text(c["throughput"], ",.0f"), spread_text(c["p50_ms"], ".2f")]
        cells += [spread_text(c["p99_ms"], ".2f"), spread_text(c["cpu_us_per_row"]["router_stub"], ".0f")]
        cells += [f"{c['rows_answered']:,}", f"{c['rows_logged']:,}"]
        cells.append(f"{c['records_dropped']:,}" if condition == "on" else "")
        lines.append(f"| {' | '.join(cells)} |")
    complete = [p for p in report["pairs"] if "ratio" in p]
    verdict = "**met**" if report["goal_met"] else "**not met**"
    if complete:
        ratios = ", ".join(f"{p['ratio']:.3f}" for p in complete)
        added = ", ".join(f"{p['router_stub_cpu_us_per_row_added']:+.0f}" for p in complete)
        lines.append(
            f"\nOn vs off throughput per pair: {ratios} (median {report['pair_ratio']['median']:.3f}; ratio of the "
            f"medians {report['throughput_ratio_of_medians']:.3f}). Goal ({report['goal']}): {verdict}."
        )
        lines.append(
            f"CPU the router's stubs spent per row, on minus off, per pair: {added} µs (median "
            f"{report['pair_router_stub_cpu_us_per_row_added']['median']:+.0f}); tritonserver itself "
            f"{s['on']['cpu_us_per_row']['tritonserver']['median']:.0f} / "
            f"{s['off']['cpu_us_per_row']['tritonserver']['median']:.0f} µs per row on / off."
        )
    else:
        lines.append(f"\nGoal ({report['goal']}): {verdict}.")
    if report["problems"]:
        lines.append("Not measured as asked: " + "; ".join(report["problems"]))
    m = report["machine"]
    loads = [b["load_average_1m_before"] for b in report["bursts"]]
    escalated = s["on"]["rows_logged_escalated"] / max(s["on"]["rows_logged"], 1)
    lines.append(
        f"{run['pairs']} pairs of servers, bursts of 3 perf_analyzer windows of {run['window_ms']:,} ms, ON OFF OFF ON "
        f"/ OFF ON ON OFF; {run['images']}. Rows answered and logged count from each server's start (a warm-up of "
        f"{run['warm_up_requests']} requests included); the log says {escalated:.0%} "
        f"of its rows escalated past the first model; dropped: {METRIC}. {m['cpus']} CPUs ({m['cpu_model']}), "
        f"tritonserver {m['tritonserver']}, Python {m['python']}; perf_analyzer and the servers share the CPUs with "
        f"other people's work: 1-minute load average {min(loads):.1f} to {max(loads):.1f} before the bursts. Both "
        "repositories never shed standard requests (shed_standard_at_ms "
        f"{run['load_shedding']['shed_standard_at_ms']:,}), else perf_analyzer stops at the first one shed when the "
        "machine stalls. "
        f"{report['date'][:10]}, commit {report['commit'][:7]}"
        + (" with uncommitted changes" if report["uncommitted_changes"] else "")
        + "."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the README table from the report file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(REPORT.read_text())))
        return
    print("inference log on vs off: measuring ...", flush=True)
    report = measure()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {REPORT}")
    if report["problems"]:
        print("no table: " + "; ".join(report["problems"]), file=sys.stderr)
        sys.exit(1)
    print("\n" + table(report))
    sys.exit(0 if report["goal_met"] else 2)


if __name__ == "__main__":
    main()
