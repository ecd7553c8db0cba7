"""P3 service tiers: critical latency and errors while a best_effort flood overloads the server.

Usage: .venv/bin/python perf/bench_tiers.py   (about 1 minute)

1. Unloaded: critical requests one at a time -> p50/p99.
2. Sustainable: the best_effort rate the server answers with no shedding (closed loop, 32 in flight).
3. Overload: a closed-loop best_effort flood with FLOOD_IN_FLIGHT requests in flight (in a process of
   its own), plus critical requests at CRITICAL_RATE per second, for RUN_S seconds; once with the shipped policy (lanes,
   shedding), once with Triton's priority levels alone (no lanes, no shedding). Both send Triton
   priority from the tier (the SDK does).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import running_server

from tierserve.client import AsyncTierserveClient, TierserveClient, TierserveError
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import policy_variant, shipped_policy

RUN_S, CRITICAL_RATE, FLOOD_IN_FLIGHT = 8.0, 50.0, 64
NO_SHEDDING = {"degrade_best_effort_at_ms": 1e9, "shed_best_effort_at_ms": 1e9, "shed_standard_at_ms": 1e9}
# thresholds for this 2-core machine, where queueing spreads over every step, not the router's queue alone
EARLY_SHEDDING = {"degrade_best_effort_at_ms": 2, "shed_best_effort_at_ms": 5, "shed_standard_at_ms": 60}


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    return (float(np.percentile(latencies, 50)) * 1000, float(np.percentile(latencies, 99)) * 1000) \
        if latencies else (float("nan"), float("nan"))


def unloaded_critical(url: str, images: np.ndarray, count: int = 300) -> tuple[float, float]:
    latencies = []
    with TierserveClient(url) as client:
        for i in range(count):
            start = time.perf_counter()
            client.classify(images[i % len(images)], tier="critical")
            latencies.append(time.perf_counter() - start)
    return _percentiles(latencies[20:])


async def _run(url: str, images: np.ndarray, seconds: float, in_flight: int,
               critical_rate: float) -> dict[str, list]:
    """Closed-loop best_effort workers plus an open-loop critical stream; outcomes per tier."""
    results: dict[str, list] = {"best_effort": [], "critical": []}
    stop = time.monotonic() + seconds
    async with AsyncTierserveClient(url) as client:
        async def send(tier: str, image: np.ndarray) -> None:
            start = time.perf_counter()
            try:
                await client.classify(image, tier=tier)
                results[tier].append(("ok", time.perf_counter() - start))
            except TierserveError as error:
                results[tier].append(("shed" if "shed" in error.message else "error", time.perf_counter() - start))

        async def flood_worker(offset: int) -> None:
            i = offset
            while time.monotonic() < stop:
                await send("best_effort", images[i % len(images)])
                i += in_flight

        async def critical_stream() -> None:
            pending, i = [], 0
            while time.monotonic() < stop:
                pending.append(asyncio.ensure_future(send("critical", images[i % len(images)])))
                i += 1
                await asyncio.sleep(1 / critical_rate)
            await asyncio.gather(*pending)

        workers = [flood_worker(k) for k in range(in_flight)]
        if critical_rate:
            workers.append(critical_stream())
        await asyncio.gather(*workers)
    return results


def _flood_process(url: str, images: np.ndarray, seconds: float, in_flight: int, out: multiprocessing.Queue) -> None:
    out.put(asyncio.run(_run(url, images, seconds, in_flight, 0))["best_effort"])


def overload(url: str, images: np.ndarray) -> dict[str, list]:
    """The best_effort flood in a process of its own (its event loop must not delay the critical client)."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    flood = multiprocessing.Process(target=_flood_process, args=(url, images, RUN_S, FLOOD_IN_FLIGHT, out))
    flood.start()
    critical = asyncio.run(_run(url, images, RUN_S, 0, CRITICAL_RATE))["critical"]
    results = {"best_effort": out.get(timeout=RUN_S + 60), "critical": critical}
    flood.join()
    return results


def _row(name: str, results: dict[str, list], seconds: float, sustained: float, unloaded_p99: float) -> str:
    flood, critical = results["best_effort"], results["critical"]
    answered = sum(1 for outcome, _ in flood if outcome == "ok")
    shed = sum(1 for outcome, _ in flood if outcome == "shed")
    p50, p99 = _percentiles([t for outcome, t in critical if outcome == "ok"])
    errors = sum(1 for outcome, _ in critical if outcome != "ok")
    return (f"| {name} | {len(flood) / seconds / sustained:.1f}x | {answered / seconds:,.0f} | {shed / seconds:,.0f} | "
            f"{len(critical)} | {errors} | {p50:.2f} | {p99:.2f} | {p99 / unloaded_p99:.1f}x |")


def main() -> None:
    images = load_split().test.images[:100]
    shipped = shipped_policy(DEFAULT_REPOSITORY)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp_early:
        priority_only = policy_variant(DEFAULT_REPOSITORY, Path(tmp), {
            **{k: v for k, v in shipped.items() if k != "lanes"}, "load_shedding": NO_SHEDDING})
        early = policy_variant(DEFAULT_REPOSITORY, Path(tmp_early), {**shipped, "load_shedding": EARLY_SHEDDING})
        with running_server(priority_only) as server:
            sustained_run = asyncio.run(_run(server.grpc_url, images, RUN_S / 2, 32, 0))
            sustained = sum(1 for outcome, _ in sustained_run["best_effort"] if outcome == "ok") / (RUN_S / 2)
            base_p50, base_p99 = unloaded_critical(server.grpc_url, images)
            priority_run = overload(server.grpc_url, images)
        with running_server() as server:
            router_run = overload(server.grpc_url, images)
        with running_server(early) as server:
            early_run = overload(server.grpc_url, images)
    print(f"unloaded critical: p50 {base_p50:.2f} ms, p99 {base_p99:.2f} ms; sustainable best_effort rate "
          f"(no shedding, 32 in flight): {sustained:,.0f}/s\n")
    print("| policy | best_effort offered / sustainable | best_effort answered/s | best_effort shed/s | "
          "critical sent | critical errors | critical p50 ms | critical p99 ms | p99 / unloaded p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(_row("Triton priority levels only (no lanes, no shedding)", priority_run, RUN_S, sustained, base_p99))
    print(_row("router: priority + critical lanes + shedding (shipped)", router_run, RUN_S, sustained, base_p99))
    print(_row("router, shedding at 2/5 ms queue wait (tuned for 2 cores)", early_run, RUN_S, sustained, base_p99))


if __name__ == "__main__":
    main()
