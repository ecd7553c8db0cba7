"""P6 decision cost: signature + policy (rules, cascade verdict with the learned router) per request, in-process.

Usage: .venv/bin/python perf/bench_decision.py
Times the router's pure Python work for one request of 1 image and for a dynamic batch of 64 images,
with the built policy and artifacts; model calls are excluded.
"""

from __future__ import annotations

import functools
import timeit

import numpy as np

from tierserve.resize import source_stats
from tierserve.router_files import ROUTER_MODEL, load_router
from tierserve.signature import RequestContext, signatures
from tierserve.tools.build_models import build_all
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY


def main() -> None:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    router, stats = load_router(DEFAULT_REPOSITORY / ROUTER_MODEL, "1")
    images = load_split().test.images[:64]
    probs = np.full((64, 10), 0.1, np.float32)
    context = RequestContext("standard", "user-1", 50)
    print("| work | images | µs per request | µs per image |\n|---|---:|---:|---:|")

    def decide(batch: np.ndarray, source: np.ndarray, first_probs: np.ndarray) -> None:
        rows = signatures(batch, source, [context] * len(batch), stats)
        for row in rows:
            router.decide(row)
        router.escalations(rows, first_probs)

    for count in (1, 64):
        batch = images[:count]
        # the source facts are computed with the resize, before the decision
        work = functools.partial(decide, batch, source_stats(batch), probs[:count])
        runs = 2000 if count == 1 else 200
        seconds = min(timeit.repeat(work, number=runs, repeat=5)) / runs
        print(f"| signature + rules + cascade verdict | {count} | {seconds * 1e6:.1f} | {seconds * 1e6 / count:.1f} |")


if __name__ == "__main__":
    main()
