"""What the state store on Redis costs the router against the embedded default (SQLite): `digits` throughput and
latency at concurrency 8, with an experiment running so the state is used.

Usage: .venv/bin/python perf/bench_state.py            (~5 min)
       .venv/bin/python perf/bench_state.py --table    (the README table, from the report)

One repository (the shipped models, the policy with standard requests never shed, and an experiments.yaml with a
two-arm Thompson bandit that changes nothing in the answers), two servers on it, both running all along: EMBEDDED
(the default SQLite state file in its own directory) and REDIS (`--state redis://127.0.0.1:<port>/0`, a
redis-server of the benchmark's own on this machine, without persistence). Every request carries one user id, so the
routers also read a user record (per-user adaptation) at most once a second, as they read the bandit's posteriors;
they write per-arm counts every 0.5 s. Each server is warmed up, then each run is four bursts, EMBEDDED REDIS REDIS
EMBEDDED (the next run REDIS EMBEDDED EMBEDDED REDIS, and so on), so that a drift of the machine's speed weighs on
both alike. A burst: perf_analyzer at concurrency 8 through `digits` over gRPC, one real test image per request,
standard tier, its first 3 windows of --window-ms whatever their spread (on this shared machine they seldom agree
for long: the alternation and the medians stand in for that check).

Reported (perf/reports/state_store.json, README table from perf/report.py): per condition the median over bursts of
throughput and p50/p99 with min and max; per run the REDIS/EMBEDDED throughput ratio (the mean of each condition's two
bursts); the goal is judged by its median (Redis at most 10% lower: >= 0.90); the state store calls that failed on
the Redis server (timeouts when Redis waits for a CPU; the routers answer regardless). Afterwards each store must
hold the experiment's counts (the state was used), else exit status 1 and no report. Exit status 2 when the goal is
missed.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import perf_analyzer
import report_io
import yaml
from bench_router import IMAGES, TIER, NotMeasured, _images, _measure
from harness import bench_policy
from report_io import cell, goal, verdicts

from tierserve.client import TierserveClient
from tierserve.experiment_spec import EXPERIMENTS_FILE
from tierserve.experiment_stats import ExperimentStats
from tierserve.router_files import POLICY_FILE
from tierserve.state_store import open_store
from tierserve.tools.build_models import build_all
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.redis_server import RedisServer
from tierserve.tools.repository_variants import router_variant
from tierserve.tools.server import Ports, TritonServer

REPORT = "state_store.json"
CONDITIONS = ("embedded", "redis")
ORDERS = (("embedded", "redis", "redis", "embedded"), ("redis", "embedded", "embedded", "redis"))
CONCURRENCY, USER = 8, "bench-user"
REQUEST = ("--request-parameter", f"tier:{TIER}:string", "--request-parameter", f"user_id:{USER}:string")
RATIO_GOAL = 0.90  # Redis throughput at most 10% lower than embedded
WARM_UP_REQUESTS = 200
STORE_ERRORS = "tierserve_state_store_errors_total"
METRICS = ("throughput", "p50_ms", "p90_ms", "p99_ms")
EXPERIMENT = {
    "name": "bench_bandit",
    "kind": "bandit",
    "unit": "request",
    "bandit": {"strategy": "thompson"},
    "arms": [{"name": "a"}, {"name": "b"}],  # the same answers: the bandit only makes the router use its state
}


@contextlib.contextmanager
def _server(repository: Path, workdir: Path, state: str | None) -> Iterator[TritonServer]:
    workdir.mkdir()
    with (
        (workdir / "tritonserver.log").open("wb") as log,
        TritonServer(repository, Ports.free(), workdir, output=log, state=state) as server,
    ):
        server.wait_ready()
        yield server


def experiment_repository(folder: Path) -> Path:
    """The shipped repository with the benchmark policy (standard never shed) and EXPERIMENT running, in `folder`."""
    files = {
        POLICY_FILE: yaml.safe_dump(bench_policy()),
        EXPERIMENTS_FILE: yaml.safe_dump({"experiments": [EXPERIMENT]}),
    }
    folder.mkdir()
    return router_variant(DEFAULT_REPOSITORY, folder, files)


def _counted_rows(location: str) -> int:
    with contextlib.closing(open_store(location)) as store:
        return ExperimentStats(store).rows(EXPERIMENT["name"])


def _store_errors(server: TritonServer) -> dict[str, int]:
    """tierserve_state_store_errors_total by operation, summed over the instances (timeouts of a busy machine)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    errors: dict[str, int] = {}
    for line in lines:
        if line.startswith(STORE_ERRORS + "{"):
            operation = re.search(r'operation="([^"]*)"', line).group(1)
            errors[operation] = errors.get(operation, 0) + int(float(line.rsplit(" ", 1)[1]))
    return errors


def measure(runs: int, window_ms: int, reports: Path) -> dict:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    images = _images()
    report = report_io.start(
        "state_store",
        {
            "runs": runs,
            "concurrency": CONCURRENCY,
            "window_ms": window_ms,
            "stability_percentage": perf_analyzer.ANY_SPREAD,
            "images": f"the first {IMAGES} test images, one per request, gRPC, tier {TIER}, user_id {USER}",
            "experiment": EXPERIMENT,
            "order": "run k: " + " ".join(ORDERS[0]) + ", the next " + " ".join(ORDERS[1]) + ", and so on",
            "redis": "redis-server on 127.0.0.1 of this machine, no persistence",
            "load_shedding": bench_policy()["load_shedding"],
        },
    )
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis:
        repository = experiment_repository(Path(tmp) / "repository")
        with contextlib.ExitStack() as stack:
            servers = {
                "embedded": stack.enter_context(_server(repository, Path(tmp) / "embedded", None)),
                "redis": stack.enter_context(_server(repository, Path(tmp) / "redis_state", redis.url)),
            }
            report["machine"]["tritonserver"] = report_io.tritonserver_version(servers["redis"].http_url)
            for server in servers.values():
                with TierserveClient(server.grpc_url) as client:
                    for i in range(WARM_UP_REQUESTS):
                        (answer,) = client.classify(images[i % IMAGES], tier=TIER, user_id=USER)
                if EXPERIMENT["name"] not in answer.arms:
                    raise NotMeasured(f"the answers are in no arm of {EXPERIMENT['name']}: {answer.arms}")
            for index in range(runs):
                order = ORDERS[index % 2]
                measurements = []
                for condition in order:
                    (figures,) = _measure(servers[condition].grpc_url, "digits", [CONCURRENCY], window_ms, REQUEST)
                    burst = {"condition": condition, **figures}
                    measurements.append(burst)
                    print(f"  run {index + 1} {condition}: {burst['throughput']:,.0f}/s", flush=True)
                mean = {
                    c: statistics.mean(m["throughput"] for m in measurements if m["condition"] == c) for c in CONDITIONS
                }
                report["runs"].append(
                    {
                        "run": index + 1,
                        "order": list(order),
                        "measurements": measurements,
                        "ratios": {"redis_over_embedded_throughput": mean["redis"] / mean["embedded"]},
                    }
                )
            time.sleep(1.0)  # the routers' last counts
            counted = {c: _counted_rows(server.state) for c, server in servers.items()}
            errors = _store_errors(servers["redis"])
    if not all(counted.values()):
        raise NotMeasured(f"a store holds no experiment counts, so its state was not used: {counted}")
    found = report_io.ratios(report["runs"])
    summary = {
        "conditions": report_io.conditions(report["runs"], ("condition",), METRICS),
        "ratios": found,
        "experiment_rows_counted": counted,
        "redis_state_store_errors": errors,
        "goals": [
            goal(
                f"Redis / embedded state throughput at c{CONCURRENCY}",
                found["redis_over_embedded_throughput"],
                ">=",
                RATIO_GOAL,
                ".3f",
            )
        ],
    }
    report_io.finish(report, summary, reports / REPORT)
    return report


def table(report: dict) -> str:
    """The README table, from the report."""
    s, settings = report["summary"], report["settings"]
    names = {"embedded": "embedded (SQLite file, the default)", "redis": "Redis (`--state redis://...`)"}
    lines = [
        f"| state store (concurrency {settings['concurrency']}) | bursts | inferences/s, median (min to max) "
        "| p50 ms | p99 ms | experiment rows counted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in s["conditions"]:
        lines.append(
            f"| {names[c['condition']]} | {c['runs']} | {cell(c['throughput'], ',.0f')} | {cell(c['p50_ms'], '.2f')} "
            f"| {cell(c['p99_ms'], '.2f')} | {s['experiment_rows_counted'][c['condition']]:,} |"
        )
    per_run = ", ".join(f"{run['ratios']['redis_over_embedded_throughput']:.3f}" for run in report["runs"])
    loads = [m["load_average_1m_before"] for run in report["runs"] for m in run["measurements"]]
    errors = s["redis_state_store_errors"]
    lines += [
        "",
        f"Redis / embedded throughput per run: {per_run}. State store calls that failed on the Redis server "
        f"({STORE_ERRORS}): {', '.join(f'{op} {n:,}' for op, n in sorted(errors.items())) or 'none'}.",
        verdicts(s["goals"]),
        f"Each burst: perf_analyzer's first 3 windows of {settings['window_ms']:,} ms; {settings['images']}; both "
        f"servers running all along, {settings['order']}; an experiment running ({settings['experiment']['kind']} "
        f"`{settings['experiment']['name']}`, two arms that answer alike), so the routers read posteriors and a "
        "user record at most once a second and write per-arm counts every 0.5 s; "
        f"{settings['redis']}; 1-minute load average {min(loads):.1f} to {max(loads):.1f} before the bursts. "
        + report_io.provenance(report),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_io.add_arguments(parser, runs=4)
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's measurement window")
    args = parser.parse_args()
    if args.table:
        print(table(report_io.read(args.reports / REPORT)))
        return
    try:
        report = measure(args.runs, args.window_ms, args.reports)
    except NotMeasured as error:
        print(f"state store: operating point not reached, no report: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.reports / REPORT}\n\n{table(report)}\n", flush=True)
    sys.exit(0 if all(report_io.met(g) for g in report["summary"]["goals"]) else 2)


if __name__ == "__main__":
    main()
