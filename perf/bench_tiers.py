"""P3 service tiers: critical latency and errors while a best_effort flood overloads the server.

Usage: .venv/bin/python perf/bench_tiers.py   (about 2 minutes)

Load is open loop over HTTP (tools/open_loop.py), each stream in a process of its own: the flood keeps
its rate whatever the server answers, so it can offer more than the server sustains.
1. Unloaded: critical requests at CRITICAL_RATE per second -> p50/p99.
2. Sustainable: the highest best_effort rate of SWEEP that is answered in full (>= 99%, no shedding).
3. Overload: best_effort at OVERLOAD x sustainable plus critical at CRITICAL_RATE, for RUN_S seconds:
   once with Triton's priority levels alone (no lanes, no router shedding) and once as shipped.
   Both run the repository's config.pbtxt (priority levels, batch bound).
4. The floor: direct calls to the idle critical lane `digits_light_critical` at CRITICAL_RATE, unloaded
   and during the shipped run's flood. No routing policy can make critical faster than this.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import running_server

from tierserve.server_scratch import LANE_TOKEN_PARAMETER, lane_token, server_scratch, server_secret
from tierserve.tier_keys import TIER_KEY_HEADER
from tierserve.tools.dataset import load_split
from tierserve.tools.open_loop import OpenLoopResult, kserve_request, run_open_loop
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import policy_variant, shipped_policy
from tierserve.tools.server import TritonServer

RUN_S, CRITICAL_RATE, OVERLOAD = 8.0, 50.0, 2.0
SWEEP = (1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000)
NO_SHEDDING = {"degrade_best_effort_at_ms": 1e9, "shed_best_effort_at_ms": 1e9, "shed_standard_at_ms": 1e9}


def _request(server: TritonServer, images: np.ndarray, tier: str, priority: int) -> bytes:
    # the server's own tier key, sent as a parameter (what the tierserve-tier-key header becomes)
    return kserve_request(
        server.http_url, "digits", images, {"tier": tier, "priority": priority, TIER_KEY_HEADER: server.tier_key}
    )


def _streams(server: TritonServer, streams: list[tuple[bytes, float, float, float]]) -> list[OpenLoopResult]:
    """Run (request, rate, start after s, seconds) streams at once, each in a process of its own."""
    host, port = server.http_url.rsplit(":", 1)
    with multiprocessing.Pool(len(streams)) as pool:
        pending = []
        started = time.monotonic()
        for request, rate, delay, seconds in streams:
            time.sleep(max(0.0, started + delay - time.monotonic()))
            pending.append(pool.apply_async(run_open_loop, (host, int(port), request, rate, seconds)))
        return [result.get(timeout=RUN_S + 60) for result in pending]


def _percentiles(result: OpenLoopResult) -> tuple[float, float, float]:
    """p50, p99 and max of the answered requests, in ms."""
    latencies = np.array(result.latencies.get(200, [float("nan")])) * 1000
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), float(latencies.max())


def sustainable_rate(server: TritonServer, flood: bytes) -> float:
    """The highest rate of SWEEP answered in full: at least 99% answered, nothing shed."""
    best = 0.0
    for rate in SWEEP:
        (result,) = _streams(server, [(flood, rate, 0.0, 4.0)])
        if result.count(200) < 0.99 * rate * 4.0 or result.skipped:
            break
        best = rate
    return best


def overload(server: TritonServer, flood: bytes, flood_rate: float, *probes: bytes) -> list[OpenLoopResult]:
    """The flood and then the probe streams at CRITICAL_RATE; the flood starts 1 s before them and ends 1 s after."""
    return _streams(
        server, [(flood, flood_rate, 0.0, RUN_S + 2)] + [(probe, CRITICAL_RATE, 1.0, RUN_S) for probe in probes]
    )


def _row(name: str, flood: OpenLoopResult, critical: OpenLoopResult, flood_rate: float, unloaded_p99: float) -> str:
    by_router = sum(n for body, n in flood.errors.items() if "best_effort request shed" in body)
    p50, p99, slowest = _percentiles(critical)
    errors = critical.count() - critical.count(200) + critical.skipped
    unanswered = round(flood_rate * flood.seconds) - flood.count() - flood.skipped
    return (
        f"| {name} | {flood_rate:,.0f} | {flood.rate(200):,.0f} | {_percentiles(flood)[1]:,.0f} | "
        f"{unanswered / flood.seconds:,.0f} | {flood.skipped / flood.seconds:,.0f} | "
        f"{by_router / flood.seconds:,.0f} | {critical.count()} | {errors} | {p50:.2f} | {p99:.2f} | "
        f"{slowest:.1f} | {p99 / unloaded_p99:.1f}x |"
    )


def main() -> None:
    images = load_split().test.images[:1]
    shipped = shipped_policy(DEFAULT_REPOSITORY)
    with tempfile.TemporaryDirectory() as tmp:
        priority_only = policy_variant(
            DEFAULT_REPOSITORY,
            Path(tmp),
            {**{k: v for k, v in shipped.items() if k != "lanes"}, "load_shedding": NO_SHEDDING},
        )
        with running_server(priority_only) as server:
            flood, critical = _request(server, images, "best_effort", 3), _request(server, images, "critical", 1)
            (unloaded,) = _streams(server, [(critical, CRITICAL_RATE, 0.0, RUN_S)])
            sustained = sustainable_rate(server, flood)
            priority_run = overload(server, flood, OVERLOAD * sustained, critical)
        with running_server() as server:
            flood, critical = _request(server, images, "best_effort", 3), _request(server, images, "critical", 1)
            # the floor needs the router's lane token: lanes refuse other callers (the operator may read it)
            token = lane_token(server_secret(server_scratch(server.pid)))
            lane = kserve_request(server.http_url, "digits_light_critical", images, {LANE_TOKEN_PARAMETER: token})
            (lane_unloaded,) = _streams(server, [(lane, CRITICAL_RATE, 0.0, RUN_S)])
            *router_run, lane_loaded = overload(server, flood, OVERLOAD * sustained, critical, lane)
    base_p50, base_p99, _ = _percentiles(unloaded)
    print(
        f"unloaded critical ({CRITICAL_RATE:g}/s): p50 {base_p50:.2f} ms, p99 {base_p99:.2f} ms; sustainable "
        f"best_effort rate (answered in full): {sustained:,.0f}/s; overload: {OVERLOAD:g}x that\n"
    )
    print(
        "| policy | best_effort offered/s | answered/s | answered p99 ms | unanswered 10 s after the run/s "
        "| not sent, every connection waiting/s | shed by the router/s "
        "| critical sent | critical errors | critical p50 ms | critical p99 ms | critical max ms "
        "| p99 / unloaded p99 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        _row(
            "Triton priority levels only (no lanes, no router shedding)", *priority_run, OVERLOAD * sustained, base_p99
        )
    )
    print(_row("router: priority + critical lanes + shedding (shipped)", *router_run, OVERLOAD * sustained, base_p99))
    lane_p99, lane_loaded_p99 = _percentiles(lane_unloaded)[1], _percentiles(lane_loaded)[1]
    print(
        f"\nfloor, direct calls to the idle lane digits_light_critical: p99 {lane_p99:.2f} ms unloaded, "
        f"{lane_loaded_p99:.2f} ms during the shipped run's flood ({lane_loaded_p99 / lane_p99:.1f}x)"
    )


if __name__ == "__main__":
    main()
