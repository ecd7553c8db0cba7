"""`tierserve demo`: send a seeded mix of images to a running server and show how each was routed."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from tierserve.client import Classification, TierserveClient
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.progress import ProgressCallback, no_progress
from tierserve.tools.workload import noisy, pure_noise, shifted, upscaled, with_missing

# kind of image -> share of the workload
MIX = {"clean": 0.35, "noisy": 0.15, "shifted": 0.1, "missing": 0.15, "upscaled": 0.15, "noise": 0.1}
TIERS = ("critical", "standard", "best_effort")


@dataclass(frozen=True)
class Sample:
    kind: str
    image: np.ndarray
    label: int | None  # None for pure noise: there is no right answer
    tier: str


@dataclass(frozen=True)
class Outcome:
    sample: Sample
    answer: Classification
    latency_ms: float


def build_workload(split: DigitsSplit, count: int, seed: int) -> list[Sample]:
    """`count` test-split images varied per MIX, in a seeded random order, with seeded tiers."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(split.test.images), size=count)
    kinds = rng.choice(list(MIX), size=count, p=list(MIX.values()))
    tiers = rng.choice(TIERS, size=count)
    samples = []
    for i, (row, kind, tier) in enumerate(zip(picks, kinds, tiers, strict=True)):
        image, label = split.test.images[row : row + 1], int(split.test.labels[row])
        if kind == "noisy":
            image = noisy(image, 3.0, seed + i)
        elif kind == "shifted":
            image = shifted(image, seed + i, max_shift=1)
        elif kind == "missing":
            image = with_missing(image, float(rng.uniform(0.1, 0.5)), seed + i)
        elif kind == "upscaled":
            image = upscaled(image, int(rng.choice([2, 4])))
        elif kind == "noise":
            image, label = pure_noise(1, seed + i), None
        samples.append(Sample(str(kind), image[0], label, str(tier)))
    return samples


def run_workload(
    url: str,
    protocol: str,
    samples: list[Sample],
    concurrency: int = 4,
    tier_key: str | None = None,
    progress: ProgressCallback = no_progress,
) -> list[Outcome]:
    """Send every sample as its own request, `concurrency` at a time, timing each, calling `progress(done, total)`
    as answers arrive. The first failed request ends the run (the samples not sent yet are not sent) and is raised."""
    with TierserveClient(url, protocol, tier_key=tier_key) as client:

        def send(sample: Sample) -> Outcome:
            start = time.perf_counter()
            (answer,) = client.classify(sample.image, tier=sample.tier)
            return Outcome(sample, answer, (time.perf_counter() - start) * 1000)

        with ThreadPoolExecutor(concurrency) as pool:
            sent = [pool.submit(send, sample) for sample in samples]
            try:
                for done, answered in enumerate(as_completed(sent), 1):
                    answered.result()
                    progress(done, len(sent))
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return [answered.result() for answered in sent]


def reason_kind(reason: str) -> str:
    """The decision without its numbers: 'rule missing_pixels', 'cascade, escalated', ..."""
    if reason.startswith("cascade"):
        return "cascade, escalated" if "escalated to" in reason else "cascade, first answer kept"
    return reason.split(" (")[0].split(":")[0]


def summarize(outcomes: list[Outcome]) -> str:
    """A markdown table: per route, count, accuracy (where a label exists), p50/p99 latency, top reasons."""
    by_route: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_route[outcome.answer.route].append(outcome)
    lines = ["| route | requests | accuracy | p50 ms | p99 ms | top reasons |", "|---|---:|---:|---:|---:|---|"]
    for route, group in sorted(by_route.items(), key=lambda item: -len(item[1])):
        labelled = [o for o in group if o.sample.label is not None]
        accuracy = f"{np.mean([o.answer.label == o.sample.label for o in labelled]):.3f}" if labelled else "n/a"
        latency = np.array([o.latency_ms for o in group])
        reasons = Counter(reason_kind(o.answer.reason) for o in group).most_common(3)
        top = ", ".join(f"{kind} ({n})" for kind, n in reasons)
        lines.append(
            f"| {route} | {len(group)} | {accuracy} | {np.percentile(latency, 50):.2f} | "
            f"{np.percentile(latency, 99):.2f} | {top} |"
        )
    labelled = [o for o in outcomes if o.sample.label is not None]
    overall = np.mean([o.answer.label == o.sample.label for o in labelled])
    lines.append(
        f"\n{len(outcomes)} requests, accuracy {overall:.3f} on the {len(labelled)} that are digits; "
        f"kinds: {dict(Counter(o.sample.kind for o in outcomes))}"
    )
    return "\n".join(lines)
