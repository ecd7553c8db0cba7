"""What grows with users and traffic in the shared state on Redis: Redis commands per request and per feedback, and
state bytes per user, for the README's capacity section (issue 15).

Usage: .venv/bin/python perf/bench_capacity.py            (~1 min)
       .venv/bin/python perf/bench_capacity.py --table    (the README table, from the report)

One server on a redis-server of the benchmark's own (no persistence), the shipped models, the policy with standard
requests never shed and per-user adaptation on, and a two-arm Thompson bandit (bench_state's). Each run:
1. traffic: REQUESTS requests from 8 client threads over gRPC, standard tier, each request one test image and one of
   USERS user ids; Redis's command counts (INFO commandstats, reset before) give commands per request and per
   second at that rate;
2. feedback: one feedback per user (its first answer's REQUEST_ID and the true label), commands counted the same way;
3. memory: every key by kind (the key with its user hash or request id replaced by `*`), its count and bytes
   (MEMORY USAGE), once the routers' counts are written.
A run starts from an empty Redis (FLUSHALL, the server's secret and experiments written back by its routers).
Exit status 1 and no report when the state was not used (no user records or no experiment counts).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import report_io
from bench_router import NotMeasured
from bench_state import EXPERIMENT, _server, experiment_repository
from harness import bench_policy
from report_io import spread, spread_text

from tierserve.client import TierserveClient
from tierserve.tools.build_models import build_all
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.redis_server import RedisServer

REPORT = "capacity.json"
REQUESTS, USERS, THREADS, TIER = 3000, 1000, 8, "standard"
FLUSH_WAIT_S = 1.5  # the routers write counts every 0.5 s and re-read state at most once a second
# a user hash or a request id in a key: base64url or hex runs of 16+ characters
_ID = re.compile(r"[A-Za-z0-9_\-]{16,}")


def _commands(client: redis.Redis) -> dict[str, int]:
    """Commands Redis ran since the last CONFIG RESETSTAT, by name; INFO and CONFIG themselves left out."""
    stats = client.info("commandstats")
    names = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
    return {k: calls for k, calls in names.items() if k != "info" and not k.startswith("config")}


def _keys_by_kind(client: redis.Redis) -> dict[str, dict[str, float]]:
    kinds: dict[str, list[int]] = defaultdict(list)
    for key in client.scan_iter(count=1000):
        kinds[_ID.sub("*", key.decode())].append(client.memory_usage(key) or 0)
    return {kind: {"keys": len(sizes), "bytes": sum(sizes)} for kind, sizes in sorted(kinds.items())}


def _one_run(grpc_url: str, redis_client: redis.Redis, images, labels) -> dict:
    redis_client.flushall()
    time.sleep(FLUSH_WAIT_S)  # the routers write back the secret and the experiments they serve
    users = [f"capacity-user-{i}" for i in range(USERS)]
    first: dict[str, tuple[str, int]] = {}
    redis_client.config_resetstat()
    started = time.monotonic()
    with TierserveClient(grpc_url) as client, ThreadPoolExecutor(THREADS) as pool:

        def send(i: int) -> tuple[str, str, int]:
            (answer,) = client.classify(images[i % len(images)], tier=TIER, user_id=users[i % USERS])
            return users[i % USERS], answer.request_id, int(labels[i % len(images)])

        for user, request_id, label in pool.map(send, range(REQUESTS)):
            first.setdefault(user, (request_id, label))
        elapsed = time.monotonic() - started
        time.sleep(FLUSH_WAIT_S)
        traffic_commands = _commands(redis_client)
        traffic_s = time.monotonic() - started
        redis_client.config_resetstat()
        ids, truths = zip(*first.values(), strict=True)
        for start in range(0, len(ids), 50):
            client.feedback(list(ids[start : start + 50]), list(truths[start : start + 50]))
        time.sleep(FLUSH_WAIT_S)
        feedback_commands = _commands(redis_client)
    kinds = _keys_by_kind(redis_client)
    return {
        "requests": REQUESTS,
        "requests_per_s": REQUESTS / elapsed,
        "commands_per_request": sum(traffic_commands.values()) / REQUESTS,
        "commands_per_s_during_traffic": sum(traffic_commands.values()) / traffic_s,
        "traffic_commands": traffic_commands,
        "feedback": len(ids),
        "commands_per_feedback": sum(feedback_commands.values()) / len(ids),
        "feedback_commands": feedback_commands,
        "users": USERS,
        "keys": kinds,
        "used_memory_bytes": redis_client.info("memory")["used_memory"],
    }


def _per_user_bytes(kinds: dict[str, dict[str, float]]) -> float:
    """Bytes of the keys that grow with users: a hash per user, the sorted set of users seen (per-user adaptation)
    and the experiment's sets of users per arm."""
    return sum(v["bytes"] for k, v in kinds.items() if ":user:" in k or ":users" in k) / USERS


def _claim_bytes(kinds: dict[str, dict[str, float]]) -> float:
    claims = [v for k, v in kinds.items() if "feedback" in k and "*" in k]
    return sum(v["bytes"] for v in claims) / max(1, sum(v["keys"] for v in claims))


def measure(runs: int, reports: Path) -> dict:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    split = load_split()
    images, labels = split.test.images[:256], split.test.labels[:256]
    report = report_io.start(
        "capacity",
        {
            "runs": runs,
            "requests": REQUESTS,
            "users": USERS,
            "client_threads": THREADS,
            "tier": TIER,
            "experiment": EXPERIMENT,
            "adaptation": bench_policy()["adaptation"],
            "redis": "redis-server on 127.0.0.1 of this machine, no persistence",
        },
    )
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server_redis:
        repository = experiment_repository(Path(tmp) / "repository")
        client = redis.Redis.from_url(server_redis.url)
        with _server(repository, Path(tmp) / "server", server_redis.url) as server:
            report["machine"]["tritonserver"] = report_io.tritonserver_version(server.http_url)
            for index in range(runs):
                figures = _one_run(server.grpc_url, client, images, labels)
                report["runs"].append({"run": index + 1, **figures})
                print(
                    f"  run {index + 1}: {figures['requests_per_s']:,.0f} requests/s, "
                    f"{figures['commands_per_request']:.3f} commands/request, "
                    f"{figures['commands_per_feedback']:.2f} commands/feedback",
                    flush=True,
                )
        client.close()
    last = report["runs"][-1]["keys"]
    if not any(":user:" in k for k in last) or not any("experiment" in k or "arm" in k for k in last):
        raise NotMeasured(f"the state was not used: keys {sorted(last)}")
    summary = {
        name: spread(run[name] for run in report["runs"])
        for name in ("requests_per_s", "commands_per_request", "commands_per_s_during_traffic", "commands_per_feedback")
    }
    summary["bytes_per_user"] = spread(_per_user_bytes(run["keys"]) for run in report["runs"])
    summary["bytes_per_feedback_claim"] = spread(_claim_bytes(run["keys"]) for run in report["runs"])
    summary["key_kinds"] = dict(Counter({k: v["keys"] for k, v in last.items()}))
    report_io.finish(report, summary, reports / REPORT)
    return report


def table(report: dict) -> str:
    s, settings = report["summary"], report["settings"]
    rows = [
        ("requests/s (one server, 8 client threads, gRPC)", s["requests_per_s"], ",.0f"),
        ("Redis commands per request", s["commands_per_request"], ".3f"),
        (
            "Redis commands/s, from the first request to 1.5 s after the last",
            s["commands_per_s_during_traffic"],
            ",.0f",
        ),
        ("Redis commands per feedback", s["commands_per_feedback"], ".2f"),
        (
            "bytes per user (its record, its place in `users:seen` and in the experiment's users of its arm)",
            s["bytes_per_user"],
            ",.0f",
        ),
        (
            "bytes per feedback claim (kept as long as a REQUEST_ID may get feedback)",
            s["bytes_per_feedback_claim"],
            ",.0f",
        ),
    ]
    lines = ["| measured | median (min to max) |", "|---|---:|"]
    lines += [f"| {name} | {spread_text(value, fmt)} |" for name, value, fmt in rows]
    lines += [
        "",
        f"{len(report['runs'])} runs, each from an empty Redis: {settings['requests']:,} standard requests over "
        f"{settings['users']:,} user ids from {settings['client_threads']} threads, then one feedback per user; a "
        f"{settings['experiment']['kind']} experiment running and per-user adaptation on; {settings['redis']}; "
        f"Redis's own command counts (INFO commandstats). Median of the per-run figures: "
        f"{statistics.median(run['used_memory_bytes'] for run in report['runs']) / 2**20:.1f} MiB used by Redis "
        f"after a run. " + report_io.provenance(report),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_io.add_arguments(parser, runs=3)
    args = parser.parse_args()
    if args.table:
        print(table(report_io.read(args.reports / REPORT)))
        return
    try:
        report = measure(args.runs, args.reports)
    except NotMeasured as error:
        print(f"capacity: state not used, no report: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.reports / REPORT}\n\n{table(report)}\n", flush=True)


if __name__ == "__main__":
    main()
