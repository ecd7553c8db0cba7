"""Build the router's artifacts: training statistics for the OOD score, and the learned router."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tierserve.learned_router import LearnedRouter, escalation_features
from tierserve.manifest import version_dir
from tierserve.resize import source_stats
from tierserve.router_files import LEARNED_ROUTER_FILE, ROUTER_MODEL, STATS_FILE
from tierserve.runners import load_runner
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.dataset import DigitsSplit, shifted_copies
from tierserve.tools.workload import noisy, shifted

LEARNED_ROUTER_SEED = 11


def router_artifacts_missing(repository: Path) -> bool:
    router_version = repository / ROUTER_MODEL / "1"
    return not ((router_version / STATS_FILE).is_file() and (router_version / LEARNED_ROUTER_FILE).is_file())


def build_router_artifacts(
    repository: Path, split: DigitsSplit, first_model: str = "digits_light:1", log: Callable[[str], None] = print
) -> None:
    """Fit the OOD statistics on the training images, then teach the learned router when `first_model`
    is wrong, on validation images it never saw in training: clean, noisy and shifted."""
    router_version = repository / ROUTER_MODEL / "1"
    router_version.mkdir(parents=True, exist_ok=True)
    # the heavy model learned one-pixel shifts as normal variation, so the OOD statistics do too
    stats = TrainingStats.fit(shifted_copies(split.train.images), split.validation.images)
    (router_version / STATS_FILE).write_text(stats.to_json() + "\n")

    base = split.validation.images
    images = np.concatenate(
        [
            base,
            noisy(base, 2.0, LEARNED_ROUTER_SEED),
            noisy(base, 4.0, LEARNED_ROUTER_SEED + 1),
            shifted(base, LEARNED_ROUTER_SEED + 2),
        ]
    )
    labels = np.tile(split.validation.labels, 4)
    probs = load_runner(version_dir(repository, first_model)).infer(images)
    rows = signatures(images, source_stats(images), [RequestContext()] * len(images), stats)
    features = escalation_features(rows, probs)
    wrong = probs.argmax(axis=1) != labels
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(features), wrong)
    learned = LearnedRouter(
        scaler.mean_.astype(np.float32),
        scaler.scale_.astype(np.float32),
        model.coef_[0].astype(np.float32),
        float(model.intercept_[0]),
    )
    (router_version / LEARNED_ROUTER_FILE).write_text(learned.to_json() + "\n")
    caught = (learned.wrong_probability(features) > 0.5)[wrong].mean()
    log(
        f"built router:1        learned router on {len(images)} images, {first_model} wrong on {wrong.sum()}, "
        f"flags {caught:.0%} of those at p>0.5"
    )
