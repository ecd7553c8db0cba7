"""P6 decision cost: signature + policy (rules, cascade verdict with the learned router) per request, in-process.

Usage: .venv/bin/python perf/bench_decision.py
Times the router's pure Python work for one request of 1 image and for a dynamic batch of 64 images,
with the built policy and artifacts; model calls are excluded.
"""

from __future__ import annotations

import functools
import timeit

import numpy as np

from tierserve.learned_router import LearnedRouter
from tierserve.manifest import Manifest
from tierserve.policy import Policy
from tierserve.resize import source_stats
from tierserve.routing import Router
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.build_models import build_all
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY


def load_router() -> tuple[Router, TrainingStats]:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    router_dir = DEFAULT_REPOSITORY / "router"
    policy = Policy.load(router_dir / "policy.yaml")
    accepts = {m: Manifest.read(DEFAULT_REPOSITORY / m.split(":")[0] / m.split(":")[1]).accepts_missing
               for m in policy.models}
    return (Router(policy, accepts, LearnedRouter.load(router_dir / "1" / "learned_router.json")),
            TrainingStats.load(router_dir / "1" / "stats.json"))


def main() -> None:
    router, stats = load_router()
    images = load_split().test.images[:64]
    probs = np.full((64, 10), 0.1, np.float32)
    context = RequestContext("standard", "user-1", 50)
    print("| work | images | µs per request | µs per image |\n|---|---:|---:|---:|")
    def decide(batch: np.ndarray, source: np.ndarray, first_probs: np.ndarray) -> None:
        rows = signatures(batch, source, context, stats)
        for row in rows:
            router.decide(row)
        router.escalations(rows, first_probs)

    for count in (1, 64):
        batch = images[:count]
        # the source facts are computed by the preprocess model, not the router
        work = functools.partial(decide, batch, source_stats(batch), probs[:count])
        runs = 2000 if count == 1 else 200
        seconds = min(timeit.repeat(work, number=runs, repeat=5)) / runs
        print(f"| signature + rules + cascade verdict | {count} | {seconds * 1e6:.1f} | {seconds * 1e6 / count:.1f} |")


if __name__ == "__main__":
    main()
