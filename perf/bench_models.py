"""Baseline: each downstream model called directly over gRPC with perf_analyzer, one image per request.

Usage: .venv/bin/python perf/bench_models.py [--url HOST:PORT]
Without --url it starts its own tritonserver on free ports. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform

import perf_analyzer
from harness import server_url

from tierserve.tools.build_models import MODEL_SPECS
from tierserve.tools.dataset import load_split

CONCURRENCIES = [1, 8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC address of a running server (default: start one)")
    args = parser.parse_args()
    images = load_split().test.images[:64]
    print(f"Host: {platform.processor() or platform.machine()}, perf_analyzer over gRPC, batch 1, real test images\n")
    print("| model | concurrency | inferences/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    with server_url(args.url) as url:
        for spec in MODEL_SPECS:
            for m in perf_analyzer.run(url, spec.model, images, CONCURRENCIES, extra_args=("-x", str(spec.version))):
                print(
                    f"| {spec.name} | {m.concurrency} | {m.throughput:,.0f} | {m.p50_us / 1000:.2f} | "
                    f"{m.p99_us / 1000:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
