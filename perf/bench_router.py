"""P1 routing overhead and P2 cascade efficiency of the `digits` router, measured with perf_analyzer.

Usage: .venv/bin/python perf/bench_router.py   (starts its own servers; about 3 minutes)

P1: `digits` routed to the light model (the tight_deadline rule, deadline_ms=15) vs the static ensemble
    preprocess -> digits_light vs digits_light called directly; concurrency 1 and 8.
P2: the shipped cascade vs an always-heavy policy, both through `digits`: accuracy on the held-out test
    split (through the server) and throughput at concurrency 8, standard tier.
"""

from __future__ import annotations

import numpy as np
import perf_analyzer
from harness import cascade_variant, running_server

from tierserve.client import TierserveClient
from tierserve.manifest import Manifest
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY

ALWAYS_HEAVY = {
    "first": "digits_heavy:2",
    "escalate_to": "digits_heavy:2",
    "escalate_when": "threshold",
    "thresholds": {"critical": 0.0, "standard": 0.0, "best_effort": 0.0},
}


def _row(name: str, m: perf_analyzer.Measurement) -> str:
    return f"| {name} | {m.concurrency} | {m.throughput:,.0f} | {m.p50_us / 1000:.3f} | {m.p99_us / 1000:.3f} |"


def routing_overhead(images: np.ndarray) -> None:
    print("### P1 routing overhead (gRPC, batch 1)\n")
    print("| path | concurrency | inferences/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    paths = {
        "digits_light direct": ("digits_light", ()),
        "static ensemble preprocess -> digits_light": ("digits_static_light", ()),
        "digits router -> digits_light (rule tight_deadline)": (
            "digits",
            ("--request-parameter", "deadline_ms:15:int"),
        ),
    }
    results = {}
    with running_server() as server:
        for name, (model, extra) in paths.items():
            results[name] = perf_analyzer.run(server.grpc_url, model, images, [1, 8], extra_args=extra)
            for m in results[name]:
                print(_row(name, m), flush=True)
    direct, static, routed = results.values()
    print(
        f"\nrouter vs static ensemble throughput: c1 {routed[0].throughput / static[0].throughput:.2f}x, "
        f"c8 {routed[1].throughput / static[1].throughput:.2f}x; router p50 added over the direct call: "
        f"c1 {(routed[0].p50_us - direct[0].p50_us) / 1000:+.3f} ms, "
        f"c8 {(routed[1].p50_us - direct[1].p50_us) / 1000:+.3f} ms\n"
    )


def _accuracy_and_escalations(url: str, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    with TierserveClient(url) as client:
        answers = [a for s in range(0, len(images), 64) for a in client.classify(images[s : s + 64], tier="standard")]
    accuracy = float(np.mean([a.label == y for a, y in zip(answers, labels, strict=True)]))
    return accuracy, float(np.mean(["low_confidence" in a.path for a in answers]))


def cascade_efficiency(images: np.ndarray, labels: np.ndarray) -> None:
    print("### P2 cascade efficiency (gRPC, batch 1, concurrency 8, standard tier)\n")
    print("| policy | test accuracy | escalated | inferences/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|")
    measured = {}
    with cascade_variant(ALWAYS_HEAVY) as heavy_repository:
        for name, repository in (("cascade (shipped policy)", DEFAULT_REPOSITORY), ("always heavy", heavy_repository)):
            with running_server(repository) as server:
                accuracy, escalated = _accuracy_and_escalations(server.grpc_url, images, labels)
                (m,) = perf_analyzer.run(
                    server.grpc_url,
                    "digits",
                    images[:64],
                    [8],
                    extra_args=("--request-parameter", "tier:standard:string"),
                )
            measured[name] = (accuracy, escalated, m)
            print(
                f"| {name} | {accuracy:.4f} | {escalated:.1%} | {m.throughput:,.0f} | {m.p50_us / 1000:.3f} | "
                f"{m.p99_us / 1000:.3f} |",
                flush=True,
            )
    (cascade_acc, escalated, cascade), (heavy_acc, _, heavy) = measured.values()
    light_ops = Manifest.read(DEFAULT_REPOSITORY / "digits_light" / "1").ops_per_sample
    heavy_ops = Manifest.read(DEFAULT_REPOSITORY / "digits_heavy" / "2").ops_per_sample
    print(
        f"\ncascade: {cascade.throughput / heavy.throughput:.2f}x the always-heavy throughput at "
        f"{cascade_acc / heavy_acc:.2%} of its accuracy; model compute per image "
        f"{heavy_ops / (light_ops + escalated * heavy_ops):.2f}x less ({light_ops} + {escalated:.1%} x {heavy_ops} "
        f"vs {heavy_ops} multiply-adds)\n"
    )


def main() -> None:
    split = load_split()
    routing_overhead(split.test.images[:64])
    cascade_efficiency(split.test.images, split.test.labels)


if __name__ == "__main__":
    main()
