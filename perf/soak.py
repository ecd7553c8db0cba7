"""Soak: a steady mixed load for minutes, watching the server for leaks (memory, fds, sockets, shared memory).

Usage: .venv/bin/python perf/soak.py [--minutes 10]     (the README table: perf/soak.py --table)

One server (perf/harness.py), and 6 client threads (3 tiers x gRPC/HTTP), each at RATE_PER_WORKER requests/s:
clean, noisy, shifted, upscaled images, images with missing pixels and pure noise (every route), sometimes a
batch, a tight deadline or a user id; every MALFORMED_EVERY-th request is malformed and must be refused with a
4xx (a bad tier, a 3x3 image, an infinite pixel, deadline_ms 0, a model version that does not exist). Each
thread opens a new client every CLIENT_REQUESTS requests. Every SAMPLE_S seconds: the RSS of tritonserver and
of all its Python stubs, tritonserver's open fds, sockets in CLOSE_WAIT on the server's ports, and /dev/shm
used by the server's shm prefix. Goal: each grows less than 5% from the first sample after the WARM_UP_S
warm-up to the last. Writes perf/reports/soak.json and prints a table; exits 1 when a goal is missed, the load
did not run throughout (no load offered, a silent interval, a client thread gone), or the server died.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

import grpc
import numpy as np
import report_io
from harness import running_server

from tierserve.client import TierserveClient, TierserveError
from tierserve.tools.dataset import load_split
from tierserve.tools.load import LoadThreads
from tierserve.tools.server import SHM_DIR, TritonServer
from tierserve.tools.workload import noisy, pure_noise, shifted, upscaled, with_missing

REPORT = Path(__file__).parent / "reports" / "soak.json"
TIERS, PROTOCOLS = ("critical", "standard", "best_effort"), ("grpc", "http")
RATE_PER_WORKER, MALFORMED_EVERY, CLIENT_REQUESTS = 40.0, 25, 2000
SAMPLE_S, WARM_UP_S, GROWTH_GOAL_PCT = 10.0, 60.0, 5.0
CLOSE_WAIT = "08"  # the state column of /proc/net/tcp
# what is measured, and how it is shown: (key, label, scale)
MEASURES = (
    ("server_rss_bytes", "tritonserver RSS, MiB", 2**20),
    ("stubs_rss_bytes", "RSS of all Python stubs, MiB", 2**20),
    ("server_fds", "tritonserver open fds", 1),
    ("close_wait", "sockets in CLOSE_WAIT on the server's ports", 1),
    ("shm_bytes", "/dev/shm used by the server's prefix, MiB", 2**20),
)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _close_wait(ports: set[int]) -> int:
    """Sockets in CLOSE_WAIT whose local port is one of `ports`: the client hung up, the server never closed."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == CLOSE_WAIT and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                count += 1
    return count


def sample(server: TritonServer) -> dict[str, float]:
    """One reading of everything the soak watches."""
    stubs_rss = 0
    stubs = server.stub_pids()
    for pid in stubs:
        with contextlib.suppress(OSError):  # a stub that ended while we looked
            stubs_rss += _rss_bytes(pid)
    return {
        "server_rss_bytes": _rss_bytes(server.pid),
        "stubs_rss_bytes": stubs_rss,
        "stubs": len(stubs),
        "server_fds": len(os.listdir(f"/proc/{server.pid}/fd")),
        "close_wait": _close_wait({server.ports.http, server.ports.grpc, server.ports.metrics}),
        "shm_bytes": sum(region.stat().st_blocks * 512 for region in SHM_DIR.glob(f"{server.shm_prefix}*")),
    }


def images_by_kind() -> dict[str, np.ndarray]:
    """Inputs for every route: the cascade (clean, noisy, shifted, upscaled), missing pixels, pure noise."""
    test = load_split().test.images
    return {
        "clean": test,
        "noisy": noisy(test, 3.0, seed=1),
        "shifted": shifted(test, seed=2),
        "upscaled": upscaled(test[:100], 2),
        "missing": with_missing(test, 0.3, seed=3),
        "noise": pure_noise(100, seed=4),
    }


class MixedLoad(LoadThreads):
    """One thread per tier and protocol, each at RATE_PER_WORKER requests/s; counts what came back by kind."""

    JOIN_S = 30.0

    def __init__(self, server: TritonServer) -> None:
        super().__init__()
        self.server = server
        self.images = images_by_kind()
        self.outcomes: Counter[tuple[str, str, str]] = Counter()  # (tier/protocol, request kind, outcome) -> count
        self.routes: Counter[str] = Counter()
        self.messages: dict[tuple[str, str, str], list[str]] = {}  # the first few error messages per outcome
        self.sent = 0
        self._lock = threading.Lock()
        self.crashed: list[str] = []
        self._threads = [
            threading.Thread(target=self._run, args=(tier, protocol, seed), daemon=True)
            for seed, (tier, protocol) in enumerate((t, p) for t in TIERS for p in PROTOCOLS)
        ]

    def _run(self, tier: str, protocol: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        url = self.server.grpc_url if protocol == "grpc" else self.server.http_url
        kinds = sorted(self.images)
        try:
            client = TierserveClient(url, protocol, timeout_s=10.0, tier_key=self.server.tier_key)
            n, next_at = 0, time.monotonic()
            while not self._stop.is_set():
                n += 1
                if n % CLIENT_REQUESTS == 0:  # connections come and go, as with real clients
                    client.close()
                    client = TierserveClient(url, protocol, timeout_s=10.0, tier_key=self.server.tier_key)
                if n % MALFORMED_EVERY == 0:
                    kind, call = self._malformed(client, rng)
                else:
                    kind = kinds[n % len(kinds)]
                    pool = self.images[kind]
                    batch = pool[rng.integers(0, len(pool), size=1 if rng.random() < 0.8 else rng.integers(2, 9))]
                    options = {"user_id": f"user{rng.integers(20)}"} if rng.random() < 0.3 else {}
                    if rng.random() < 0.05:
                        options["deadline_ms"] = 10  # the tight_deadline rule
                        kind += ", deadline_ms 10"
                    call = functools.partial(client.classify, batch, tier=tier, **options)
                self._count(f"{tier}/{protocol}", kind, call)
                next_at += 1 / RATE_PER_WORKER
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic() - 1.0)  # behind by more than a second: do not burst
            client.close()
        except Exception as error:  # a thread gone is a missed soak, reported as such
            self.crashed.append(f"{tier}/{protocol}: {error!r}")

    def _malformed(self, client: TierserveClient, rng: np.random.Generator) -> tuple[str, Callable[[], object]]:
        """One malformed request of a rotating kind, as (kind, call); each must be refused with a 4xx."""
        image = self.images["clean"][rng.integers(0, 100)]
        infinite = image.copy()
        infinite[0, 0] = np.inf
        calls: dict[str, Callable[[], object]] = {
            "malformed: tier 'gold'": functools.partial(client.classify, image, tier="gold"),
            "malformed: 3x3 image": functools.partial(client.classify, np.zeros((3, 3), np.float32)),
            "malformed: infinite pixel": functools.partial(client.classify, infinite),
            "malformed: deadline_ms 0": functools.partial(client.classify, image, deadline_ms=0),
            "malformed: digits_heavy version 7 (raw HTTP)": self._unknown_version,
        }
        kind = sorted(calls)[int(rng.integers(len(calls)))]
        return kind, calls[kind]

    def _unknown_version(self) -> None:
        body = json.dumps(
            {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}]}
        ).encode()
        request = urllib.request.Request(
            f"http://{self.server.http_url}/v2/models/digits_heavy/versions/7/infer", data=body, method="POST"
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as error:
            error.close()
            raise TierserveError(HTTPStatus(error.code), str(error.reason)) from None

    def _count(self, worker: str, kind: str, call: Callable[[], object]) -> None:
        """Make one call and count its outcome: answered, refused (a 4xx), shed, or failed, with the status."""
        answers: object = []
        message = ""
        try:
            answers = call()
            outcome = "answered"
        except TierserveError as error:
            name = getattr(error.status, "name", str(error.status))
            outcome = (
                "shed" if "shed" in error.message else "refused" if _client_error(error.status) else "failed"
            ) + f" {name}"
            message = error.message
        with self._lock:
            self.sent += 1
            self.outcomes[worker, kind, outcome] += 1
            if message and len(seen := self.messages.setdefault((worker, kind, outcome), [])) < 3:
                seen.append(message[:500])
            self.routes.update(answer.route for answer in answers or [])


CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


def _client_error(status: object) -> bool:
    """A refusal that blames the request: HTTP 4xx, or its gRPC counterparts."""
    return status in CLIENT_ERRORS or (isinstance(status, int) and 400 <= status < 500)


def _expected(kind: str, outcome: str) -> bool:
    """A malformed request must be refused with a 4xx; a well-formed one answered (or shed under load)."""
    if kind.startswith("malformed"):
        return outcome.startswith("refused")
    return outcome == "answered" or outcome.startswith("shed")


def soak(minutes: float) -> dict:
    """Run the soak; the report (samples, growth per measure, requests and errors by kind, problems)."""
    problems: list[str] = []
    samples: list[dict[str, float]] = []
    with running_server() as server, MixedLoad(server) as load:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < minutes * 60 + 0.5:
            if server.returncode is not None:
                problems.append(f"tritonserver exited with {server.returncode} after {elapsed:.0f} s")
                break
            samples.append({"t_s": round(elapsed, 1), "requests": load.sent, **sample(server)})
            time.sleep(max(0.0, start + len(samples) * SAMPLE_S - time.monotonic()))
        alive = load.alive()
    problems += [f"client thread crashed: {crash}" for crash in load.crashed]
    if alive < len(TIERS) * len(PROTOCOLS):
        problems.append(f"only {alive} of {len(TIERS) * len(PROTOCOLS)} client threads ran to the end")
    measured = [s for s in samples if s["t_s"] >= WARM_UP_S]
    if len(measured) < 2:
        problems.append(f"fewer than 2 samples after the {WARM_UP_S:g} s warm-up: run longer")
    silent = [b["t_s"] for a, b in itertools.pairwise(samples) if b["requests"] == a["requests"]]
    if load.sent == 0 or silent:
        problems.append(f"no load offered ({load.sent} requests; no request in the interval ending at {silent} s)")
    if len({s["stubs"] for s in samples}) > 1:
        problems.append(f"the number of Python stubs changed: {[s['stubs'] for s in samples]}")
    growth = {}
    if len(measured) >= 2:
        first, last = measured[0], measured[-1]
        for key, _, _ in MEASURES:
            base, end = first[key], last[key]
            percent = (end - base) / base * 100 if base else (0.0 if end == 0 else float("inf"))
            growth[key] = {
                "after_warm_up": base,
                "end": end,
                "growth_pct": round(percent, 2),
                "met": percent < GROWTH_GOAL_PCT,
            }
    unexpected = {f"{p} | {k} | {o}": n for (p, k, o), n in sorted(load.outcomes.items()) if not _expected(k, o)}
    return {
        "minutes": minutes,
        "warm_up_s": WARM_UP_S,
        "sample_s": SAMPLE_S,
        "rate_per_worker": RATE_PER_WORKER,
        "workers": [f"{t}/{p}" for t in TIERS for p in PROTOCOLS],
        "requests": load.sent,
        "outcomes": {f"{p} | {k} | {o}": n for (p, k, o), n in sorted(load.outcomes.items())},
        "unexpected_outcomes": unexpected,
        "error_messages": {f"{p} | {k} | {o}": seen for (p, k, o), seen in sorted(load.messages.items())},
        "routes": dict(load.routes.most_common()),
        "growth": growth,
        "problems": problems,
        "goals_met": not problems and bool(growth) and all(g["met"] for g in growth.values()) and not unexpected,
        "samples": samples,
    }


def _summary(worker: str, kind: str, outcome: str) -> str:
    """An outcome as the table's summary counts it: answered, malformed and refused, or per tier."""
    if kind.startswith("malformed"):
        return "malformed and refused with a 4xx" if outcome.startswith("refused") else f"malformed, {outcome}"
    return outcome if outcome == "answered" else f"{worker.split('/')[0]} {outcome.split()[0]}"


def table(report: dict) -> str:
    """The README's soak table, from the report."""
    lines = [
        f"| measure | after the {report['warm_up_s']:g} s warm-up | after {report['minutes']:g} min | growth "
        f"| goal < {GROWTH_GOAL_PCT:g}% |",
        "|---|---:|---:|---:|---|",
    ]
    for key, label, scale in MEASURES:
        g = report["growth"].get(key)
        if g is None:
            continue
        base, end = (f"{v / scale:,.1f}" if scale > 1 else f"{v:,.0f}" for v in (g["after_warm_up"], g["end"]))
        lines.append(
            f"| {label} | {base} | {end} | {g['growth_pct']:+.1f}% | {'**met**' if g['met'] else '**not met**'} |"
        )
    by_outcome: Counter[str] = Counter()
    for name, count in report["outcomes"].items():
        by_outcome[_summary(*name.split(" | "))] += count
    lines += [
        "",
        f"{report['requests']:,} requests in {report['minutes']:g} min: "
        + "; ".join(f"{outcome} {count:,}" for outcome, count in by_outcome.most_common())
        + f"; unexpected outcomes {sum(report['unexpected_outcomes'].values()):,}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--table", action="store_true", help=f"print the README table from {REPORT}")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.report.read_text())))
        return
    head = report_io.header()
    report = {**head, **soak(args.minutes)}
    report_io.write(report, args.report)
    print(table(report))
    for problem in report["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    for outcome, count in report["unexpected_outcomes"].items():
        print(f"unexpected: {outcome}: {count}, e.g. {report['error_messages'].get(outcome)}", file=sys.stderr)
    sys.exit(0 if report["goals_met"] else 1)


if __name__ == "__main__":
    main()
