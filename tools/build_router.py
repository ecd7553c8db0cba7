"""Build the router's artifacts: training statistics for the OOD score, and the learned router."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from tierserve.learned_router import ALTERNATES_KEY, LearnedRouter, escalation_inputs, learned_routers
from tierserve.manifest import MANIFEST_FILE, version_dir
from tierserve.policy import Policy
from tierserve.promotions import model_of
from tierserve.resize import source_stats
from tierserve.router_files import LEARNED_ROUTER_FILE, ROUTER_MODEL, STATS_FILE, router_policy
from tierserve.runners import Runner, load_runner
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.dataset import DigitsSplit, shifted_copies
from tierserve.tools.workload import noisy, shifted


@dataclass(frozen=True)
class LearnedRouterRecipe:
    """How the learned router is trained; stored with it, so that a build with another recipe trains it again."""

    seed: int = 11
    rounds: int = 12  # rounds of variations of the validation images (learned_router_images)
    hidden: int = 32  # units of the hidden layer
    alpha: float = 1e-2  # L2 penalty


RECIPE = LearnedRouterRecipe()


def router_artifacts_missing(repository: Path) -> bool:
    """Whether the router's artifacts are absent, or its learned router was trained on other inputs, by another
    recipe (an older build) or for another first model than the policy's cascade names."""
    router_version = repository / ROUTER_MODEL / "1"
    if not ((router_version / STATS_FILE).is_file() and (router_version / LEARNED_ROUTER_FILE).is_file()):
        return True
    path = router_version / LEARNED_ROUTER_FILE
    try:
        stored = json.loads(path.read_text())
        learned, alternates = learned_routers(stored, path)
    except (ValueError, KeyError):
        return True
    judged = (learned.judges, *(alternate.judges for alternate in alternates))
    return stored.get("recipe") != asdict(RECIPE) or judged != judged_models(repository, router_policy(repository))


def judged_models(repository: Path, policy: Policy) -> tuple[str, ...]:
    """The first models the build trains a learned router for: the policy's cascade.first, then the other versions of
    that model listed under experiment_models that this repository has built (an arm or a rollback may put them
    first)."""
    first = policy.cascade.first
    return first, *(
        name
        for name in policy.experiment_models
        if model_of(name) == model_of(first) and (version_dir(repository, name) / MANIFEST_FILE).is_file()
    )


def learned_router_images(
    images: np.ndarray, labels: np.ndarray, recipe: LearnedRouterRecipe = RECIPE
) -> tuple[np.ndarray, np.ndarray]:
    """What the learned router learns from: `images` as sent and in `recipe.rounds` rounds of variations (noise of 1
    to 4 levels, shifts of 1 or 2 pixels, both), each round with seeds of its own; with their labels."""
    variants = [images]
    for round_ in range(recipe.rounds):
        seed = recipe.seed + 10 * round_
        variants += [
            noisy(images, 1.0 + round_ % 4, seed),
            shifted(images, seed + 1, max_shift=1 + round_ % 2),
            noisy(shifted(images, seed + 2, max_shift=1), 2.0, seed + 3),
        ]
    return np.concatenate(variants), np.tile(labels, len(variants))


def train_learned_router(
    first: Runner, stats: TrainingStats, split: DigitsSplit, recipe: LearnedRouterRecipe = RECIPE
) -> tuple[LearnedRouter, tuple[np.ndarray, np.ndarray]]:
    """The learned router for the cascade's first model `first`, trained by `recipe` on the validation images and
    their variations; with, per training image, whether `first` was wrong and whether the router flags it (p > 0.5)."""
    images, labels = learned_router_images(split.validation.images, split.validation.labels, recipe)
    probs = first.infer(images)
    rows = signatures(images, source_stats(images), [RequestContext()] * len(images), stats)
    inputs = escalation_inputs(rows, probs, images)
    wrong = probs.argmax(axis=1) != labels
    scaler = StandardScaler().fit(inputs)
    # one small hidden layer: a logistic regression over the signature features alone let the light model's confident
    # mistakes on noisy and shifted digits through (the demo's perturbed images: 0.92 against always-heavy's 0.98)
    mlp = MLPClassifier(
        (recipe.hidden,), alpha=recipe.alpha, early_stopping=True, max_iter=3000, random_state=recipe.seed
    ).fit(scaler.transform(inputs), wrong)
    (hidden_weights, output_weights), (hidden_bias, output_bias) = mlp.coefs_, mlp.intercepts_
    learned = LearnedRouter(
        scaler.mean_.astype(np.float32),
        scaler.scale_.astype(np.float32),
        hidden_weights.astype(np.float32),
        hidden_bias.astype(np.float32),
        output_weights[:, 0].astype(np.float32),
        float(output_bias[0]),
    )
    return learned, (wrong, learned.wrong_probability(inputs) > 0.5)


def build_router_artifacts(repository: Path, split: DigitsSplit, log: Callable[[str], None] = print) -> None:
    """Fit the OOD statistics on the training images, then teach a learned router when each judged first model
    (judged_models) is wrong, on validation images it never saw in training: clean, noisy and shifted."""
    router_version = repository / ROUTER_MODEL / "1"
    router_version.mkdir(parents=True, exist_ok=True)
    # the heavy model learned one-pixel shifts as normal variation, so the OOD statistics do too
    stats = TrainingStats.fit(shifted_copies(split.train.images), split.validation.images)
    (router_version / STATS_FILE).write_text(stats.to_json() + "\n")

    trained = []
    for first_model in judged_models(repository, router_policy(repository)):
        learned, (wrong, flagged) = train_learned_router(
            load_runner(version_dir(repository, first_model)), stats, split
        )
        trained.append(replace(learned, judges=first_model))
        log(
            f"built router:1        learned router on {len(wrong)} images, {first_model} wrong on {wrong.sum()}, "
            f"flags {flagged[wrong].mean():.0%} of those at p>0.5"
        )
    learned, *alternates = trained
    stored = {**learned.to_dict(), "recipe": asdict(RECIPE), ALTERNATES_KEY: [a.to_dict() for a in alternates]}
    (router_version / LEARNED_ROUTER_FILE).write_text(json.dumps(stored) + "\n")
