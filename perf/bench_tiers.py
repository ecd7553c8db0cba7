"""P3 service tiers: critical latency and errors while a best_effort flood overloads the server.

Usage: .venv/bin/python perf/bench_tiers.py [--runs 3] [--seconds 8]   (about 5 min)
       .venv/bin/python perf/bench_tiers.py --table   (the README table, from perf/reports/p3.json)

Load is open loop over HTTP (tools/open_loop.py), each stream in a process of its own: the flood keeps its rate
whatever the server answers, so it can offer more than the server sustains. Two servers run at once, both with the
repository's config.pbtxt (priority levels, batch bound): one with Triton's priority levels alone (the router's
lanes and shedding dropped from its policy), one as shipped. Every stream sends the first IMAGES test images in turn,
one per request. Each run:
1. Unloaded: critical requests at CRITICAL_RATE per second through `digits` (priority levels only) -> p50/p99; and
   the floor unloaded: direct calls to the idle critical lane `digits_light_critical` (shipped server).
2. Sustainable: the highest best_effort rate of the sweep answered in full (>= 99%, nothing skipped), priority
   levels only. None: the run cannot reach its operating point, and the benchmark stops (exit 1, no report, no table).
3. Overload: best_effort at OVERLOAD x sustainable plus critical at CRITICAL_RATE for --seconds, on each server, the
   first run priority-only first, the next shipped first, and so on. On the shipped server the floor is measured
   during the same flood: direct calls to the idle lane. No routing policy makes critical faster than this.
Per run: critical p99 at 2x load over the unloaded p99, and over the floor's p99 in the same flood. Goals (shipped
policy): those ratios' medians <= 2, no critical error in any run, best_effort shed in every run. Exit status 2 when a
goal is missed (report and table written).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import report_io
from harness import running_server
from report_io import cell, goal, verdicts

from tierserve.client import TierserveClient
from tierserve.server_scratch import LANE_TOKEN_PARAMETER, lane_token, server_scratch, server_secret
from tierserve.tier_keys import TIER_KEY_HEADER
from tierserve.tools.dataset import load_split
from tierserve.tools.open_loop import OpenLoopResult, kserve_request, run_open_loop
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import policy_variant, shipped_policy
from tierserve.tools.server import TritonServer

CRITICAL_RATE, OVERLOAD, DRAIN_S = 50.0, 2.0, 10.0
IMAGES = 64  # test images sent in turn: the cascade escalates some of them at each tier, as on real traffic
SWEEP = (1000, 1250, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000)
NO_SHEDDING = {"degrade_best_effort_at_ms": 1e9, "shed_best_effort_at_ms": 1e9, "shed_standard_at_ms": 1e9}
LANE = "digits_light_critical"
P99_GOAL = 2.0  # critical p99 at 2x load at most this many times the unloaded p99, and the floor's p99
POLICIES = {  # the overload conditions, as the table names them
    "priority": "Triton priority levels only (no lanes, no router shedding)",
    "shipped": "router: priority + critical lanes + shedding (shipped)",
}


class NotMeasured(RuntimeError):
    """The operating point was not reached: no report."""


class Server:
    """A running server and the prepared requests of this benchmark: best_effort flood, critical, and (shipped) the
    critical lane called directly with the router's lane token."""

    def __init__(self, server: TritonServer, images: np.ndarray, lane: bool) -> None:
        self.host, port = server.http_url.rsplit(":", 1)
        self.port = int(port)
        self.flood = self._requests(server, images, "best_effort", 3)
        self.critical = self._requests(server, images, "critical", 1)
        self.lane = None
        if lane:  # lanes refuse callers without the router's token (the operator may read it)
            token = lane_token(server_secret(server_scratch(server.pid)))
            self.lane = [
                kserve_request(server.http_url, LANE, image[None], {LANE_TOKEN_PARAMETER: token}) for image in images
            ]

    @staticmethod
    def _requests(server: TritonServer, images: np.ndarray, tier: str, priority: int) -> list[bytes]:
        """One request per image, sent in turn. The server's own tier key goes as a parameter (what the
        tierserve-tier-key header becomes)."""
        parameters = {"tier": tier, "priority": priority, TIER_KEY_HEADER: server.tier_key}
        return [kserve_request(server.http_url, "digits", image[None], parameters) for image in images]

    def streams(self, streams: list[tuple[list[bytes], float, float, float]]) -> list[OpenLoopResult]:
        """Run (request, rate, start after s, seconds) streams at once, each in a process of its own."""
        longest = max(delay + seconds for _, _, delay, seconds in streams)
        with multiprocessing.Pool(len(streams)) as pool:
            pending = []
            started = time.monotonic()
            for request, rate, delay, seconds in streams:
                time.sleep(max(0.0, started + delay - time.monotonic()))
                pending.append(pool.apply_async(run_open_loop, (self.host, self.port, request, rate, seconds)))
            return [result.get(timeout=longest + DRAIN_S + 50) for result in pending]


def _percentiles(result: OpenLoopResult) -> dict[str, float | None]:
    """p50, p99 and max of the answered requests, in ms (None when none was answered)."""
    latencies = np.array(result.latencies.get(200, [])) * 1000
    if not len(latencies):
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "max_ms": float(latencies.max()),
    }


def _probe(condition: str, result: OpenLoopResult) -> dict:
    """A stream of probes (critical requests or lane calls): how many were sent and failed, their latency."""
    return {
        "condition": condition,
        "sent": result.count() + result.skipped,
        "errors": result.count() - result.count(200) + result.skipped,
        **_percentiles(result),
    }


def _overload(condition: str, flood: OpenLoopResult, critical: OpenLoopResult, rate: float) -> dict:
    """The flood's figures (per second of the run) beside the critical probes'."""
    shed = sum(n for body, n in flood.errors.items() if "best_effort request shed" in body)
    unanswered = round(rate * flood.seconds) - flood.count() - flood.skipped
    return {
        **_probe(condition, critical),
        "best_effort_offered": rate,
        "best_effort_answered": flood.rate(200),
        "best_effort_answered_p99_ms": _percentiles(flood)["p99_ms"],
        "best_effort_unanswered": unanswered / flood.seconds,
        "best_effort_not_sent": flood.skipped / flood.seconds,
        "best_effort_shed": shed / flood.seconds,
    }


def sustainable_rate(server: Server, sweep: tuple[float, ...], seconds: float) -> float:
    """The highest rate of `sweep` answered in full: at least 99% answered, nothing skipped; 0 when none is."""
    best = 0.0
    for rate in sweep:
        (result,) = server.streams([(server.flood, rate, 0.0, seconds)])
        if result.count(200) < 0.99 * rate * seconds or result.skipped:
            break
        best = rate
    return best


def overload(server: Server, rate: float, seconds: float, *probes: list[bytes]) -> list[OpenLoopResult]:
    """The flood and the probe streams at CRITICAL_RATE; the flood starts 1 s before them and ends 1 s after."""
    return server.streams(
        [(server.flood, rate, 0.0, seconds + 2)] + [(probe, CRITICAL_RATE, 1.0, seconds) for probe in probes]
    )


def one_run(index: int, servers: dict[str, Server], sweep: tuple[float, ...], seconds: float, sweep_s: float) -> dict:
    """Unloaded figures, the sustainable rate, and both overloads in this run's order."""
    priority, shipped = servers["priority"], servers["shipped"]
    (unloaded,) = priority.streams([(priority.critical, CRITICAL_RATE, 0.0, seconds)])
    (floor_unloaded,) = shipped.streams([(shipped.lane, CRITICAL_RATE, 0.0, seconds)])
    load = report_io.load_average()[0]
    sustained = sustainable_rate(priority, sweep, sweep_s)
    if not sustained:
        raise NotMeasured(
            f"run {index + 1}: no best_effort rate of {', '.join(f'{r:g}' for r in sweep)}/s was answered in full "
            f"(>= 99%, nothing skipped) with priority levels alone; load average {load:g} before the sweep"
        )
    rate = OVERLOAD * sustained
    measurements = [_probe("unloaded critical", unloaded), _probe("floor unloaded", floor_unloaded)]
    order = list(POLICIES)[:: 1 if index % 2 == 0 else -1]
    for policy in order:
        server = servers[policy]
        flood, critical, *lane = overload(
            server, rate, seconds, server.critical, *([server.lane] if server.lane else [])
        )
        measured = _overload(policy, flood, critical, rate)
        measurements += [measured, *(_probe("floor during the flood", result) for result in lane)]
        print(f"  P3 run {index + 1} {policy}: critical p99 {measured['p99_ms'] or float('nan'):.2f} ms", flush=True)
    by = {m["condition"]: m for m in measurements}

    def ratio(a: str, b: str) -> float | None:
        top, bottom = by[a]["p99_ms"], by[b]["p99_ms"]
        return top / bottom if top is not None and bottom else None

    return {
        "run": index + 1,
        "order": order,
        "sustainable_rate": sustained,
        "load_average_1m_before_sweep": load,
        "measurements": measurements,
        "ratios": {
            "shipped_p99_over_unloaded": ratio("shipped", "unloaded critical"),
            "shipped_p99_over_floor": ratio("shipped", "floor during the flood"),
            "priority_p99_over_unloaded": ratio("priority", "unloaded critical"),
            "floor_p99_loaded_over_unloaded": ratio("floor during the flood", "floor unloaded"),
        },
    }


def _escalated_share(server: TritonServer, images: np.ndarray, tier: str) -> float:
    """The share of `images` the server's cascade escalates to a heavy model at `tier`."""
    with TierserveClient(server.grpc_url, tier_key=server.tier_key) as client:
        answers = client.classify(images, tier=tier)
    return sum(a.route.startswith("digits_heavy") for a in answers) / len(answers)


def measure(runs: int, sweep: tuple[float, ...], seconds: float, sweep_s: float, reports: Path) -> dict:
    images = load_split().test.images[:IMAGES]
    shipped = shipped_policy(DEFAULT_REPOSITORY)
    report = report_io.start(
        "p3",
        {
            "runs": runs,
            "critical_rate": CRITICAL_RATE,
            "overload": OVERLOAD,
            "seconds": seconds,
            "sweep": list(sweep),
            "sweep_seconds": sweep_s,
            "images": f"the first {IMAGES} test images in turn, one per request, KServe JSON over HTTP, open loop",
            "policies": POLICIES,
            "no_shedding": NO_SHEDDING,
            "order": "run 1 priority-only overload first, run 2 shipped first, and so on; both servers running",
        },
    )
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        priority_only = policy_variant(
            DEFAULT_REPOSITORY,
            Path(tmp),
            {**{k: v for k, v in shipped.items() if k != "lanes"}, "load_shedding": NO_SHEDDING},
        )
        running = {"priority": running_server(priority_only), "shipped": running_server()}
        servers = {name: stack.enter_context(server) for name, server in running.items()}
        report["machine"]["tritonserver"] = report_io.tritonserver_version(servers["shipped"].http_url)
        report["settings"]["critical_escalated"] = _escalated_share(servers["shipped"], images, "critical")
        prepared = {name: Server(server, images, lane=name == "shipped") for name, server in servers.items()}
        report["runs"] = [one_run(index, prepared, sweep, seconds, sweep_s) for index in range(runs)]
    found = report_io.ratios(report["runs"])
    shipped_runs = [m for run in report["runs"] for m in run["measurements"] if m["condition"] == "shipped"]
    summary = {
        "conditions": report_io.conditions(
            report["runs"],
            ("condition",),
            (
                "p50_ms",
                "p99_ms",
                "max_ms",
                "sent",
                "errors",
                "best_effort_offered",
                "best_effort_answered",
                "best_effort_answered_p99_ms",
                "best_effort_unanswered",
                "best_effort_not_sent",
                "best_effort_shed",
            ),
        ),
        "sustainable_rate": report_io.spread(run["sustainable_rate"] for run in report["runs"]),
        "ratios": found,
        "goals": [
            goal(
                "critical p99 at 2x load / unloaded p99", found.get("shipped_p99_over_unloaded"), "<=", P99_GOAL, ".1f"
            ),
            goal(
                "critical p99 at 2x load / the floor's p99 in the same flood",
                found.get("shipped_p99_over_floor"),
                "<=",
                P99_GOAL,
                ".1f",
            ),
            goal("critical errors, all runs", sum(m["errors"] for m in shipped_runs), "==", 0),
            goal(
                "best_effort shed per second, the run that shed least",
                min(m["best_effort_shed"] for m in shipped_runs),
                ">",
                0,
            ),
        ],
    }
    report_io.finish(report, summary, reports / "p3.json")
    return report


def table(report: dict) -> str:
    """The README's P3 table, from the report."""
    s, settings = report["summary"], report["settings"]
    by = {c["condition"]: c for c in s["conditions"]}
    unloaded, floor, floor_loaded = by["unloaded critical"], by["floor unloaded"], by["floor during the flood"]
    lines = [
        f"unloaded critical ({settings['critical_rate']:g}/s): p50 {cell(unloaded['p50_ms'], '.2f')} ms, p99 "
        f"{cell(unloaded['p99_ms'], '.2f')} ms; sustainable best_effort rate (answered in full): "
        f"{cell(s['sustainable_rate'], ',.0f')}/s; overload: {settings['overload']:g}x that, for "
        f"{settings['seconds']:g} s",
        "",
        "| policy | best_effort offered/s | answered/s | answered p99 ms | unanswered 10 s after the run/s "
        "| not sent, every connection waiting/s | shed by the router/s | critical sent | critical errors "
        "| critical p50 ms | critical p99 ms | critical max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in settings["policies"].items():
        c = by[key]
        cells = [
            cell(c[metric], fmt)
            for metric, fmt in (
                ("best_effort_offered", ",.0f"),
                ("best_effort_answered", ",.0f"),
                ("best_effort_answered_p99_ms", ",.0f"),
                ("best_effort_unanswered", ",.0f"),
                ("best_effort_not_sent", ",.0f"),
                ("best_effort_shed", ",.0f"),
                ("sent", ",.0f"),
                ("errors", ",.0f"),
                ("p50_ms", ".2f"),
                ("p99_ms", ".2f"),
                ("max_ms", ".1f"),
            )
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    r = s["ratios"]
    lines += [
        "",
        f"Floor, direct calls to the idle lane {LANE}: p99 {cell(floor['p99_ms'], '.2f')} ms unloaded, "
        f"{cell(floor_loaded['p99_ms'], '.2f')} ms during the shipped run's flood, "
        f"{cell(r['floor_p99_loaded_over_unloaded'], '.1f')} times as much. Critical p99 at 2x load, per run, over "
        f"the unloaded p99: priority levels only {cell(r['priority_p99_over_unloaded'], '.1f')}, shipped "
        f"{cell(r['shipped_p99_over_unloaded'], '.1f')}; shipped over the floor's p99 in the same flood "
        f"{cell(r['shipped_p99_over_floor'], '.1f')}.",
        verdicts(s["goals"]),
        f"Figures per run, medians (min to max) over the runs; {settings['order']}; {settings['images']}"
        + (
            f", of which the cascade escalates {settings['critical_escalated']:.0%} at critical. "
            if "critical_escalated" in settings
            else ". "
        )
        + report_io.provenance(report),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_io.add_arguments(parser)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the critical probes run (default 8)")
    parser.add_argument(
        "--sweep",
        type=lambda text: tuple(float(rate) for rate in text.split(",")),
        default=SWEEP,
        help=f"best_effort rates tried for the sustainable one, comma-separated (default {','.join(map(str, SWEEP))})",
    )
    parser.add_argument("--sweep-seconds", type=float, default=4.0, help="how long each rate of the sweep runs")
    args = parser.parse_args()
    path = args.reports / "p3.json"
    if args.table:
        print(table(report_io.read(path)))
        return
    try:
        report = measure(args.runs, args.sweep, args.seconds, args.sweep_seconds, args.reports)
    except NotMeasured as error:
        print(f"P3: operating point not reached, no report and no table: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path}\n\n{table(report)}")
    sys.exit(0 if all(report_io.met(g) for g in report["summary"]["goals"]) else 2)


if __name__ == "__main__":
    main()
