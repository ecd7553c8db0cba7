"""Which cascade thresholds each tier could use, chosen on data neither the learned router nor the report uses.

Usage: .venv/bin/python perf/choose_thresholds.py   (about a minute; writes perf/reports/thresholds.json)
       .venv/bin/python perf/choose_thresholds.py --table   (the table, from the report)

A tier's cascade escalates a row to digits_heavy:3 when its first model's (policy.yaml: cascade.first) confidence is
below a threshold OR the learned router's p(wrong) is above another (policy.yaml: cascade.thresholds and
learned_router.escalate_above, per tier). Which pair escalates least while keeping the tier's GOALS share of
always-heavy's accuracy? Choosing it on the held-out split or the demo's perturbed images would fit the report to
itself. So, cross-fitted: the validation split is cut into FOLDS stratified folds; for each, a learned router is
trained by the build's recipe on the other folds, and scores the fold's images and their variations (the recipe's
noise and shifts) that it never saw. On those out-of-fold rows, every pair of the grid is tried; a tier's chosen pair
escalates the fewest perturbed rows while both the clean and the perturbed rows keep the tier's goal. Then the build's
own router (trained on all of the validation split), with each tier's chosen pair, the shipped one and the one set by
hand before (SET_BY_HAND), is scored on the held-out split and the demo's perturbed images. Nothing here changes what
the server does; policy.yaml does. best_effort has no goal here: its pair is set by hand, for cost.

Per-user adaptation's stricter threshold (policy.yaml adaptation.stricter_threshold) is chosen the same way for a
user whose images the first model often gets wrong, that is for the variations alone: the lowest confidence
threshold that, with ADAPTED_TIER's p(wrong) bound, keeps STRICTER_GOAL of always-heavy's accuracy on the
out-of-fold variations.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import report_io
from bench_learned_router import _image_sets
from sklearn.model_selection import StratifiedKFold

from tierserve.learned_router import LearnedRouter, escalation_inputs
from tierserve.manifest import version_dir
from tierserve.policy import Policy
from tierserve.resize import source_stats
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL, STATS_FILE, router_policy
from tierserve.runners import Runner, load_runner
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.build_models import build_all
from tierserve.tools.build_router import RECIPE, learned_router_images, train_learned_router
from tierserve.tools.dataset import DigitsSplit, Part, load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY

REPORT = "thresholds.json"
FOLDS = 5
# per tier: the share of always-heavy's accuracy its cascade keeps, on clean and on perturbed out-of-fold rows
GOALS = {"critical": 0.9995, "standard": 0.995}
ADAPTED_TIER, STRICTER_GOAL = "standard", 0.999
STRICTER = f"{ADAPTED_TIER}, stricter per user"  # the table's name for the adapted users' pair
SET_BY_HAND = {  # what policy.yaml shipped before these choices
    "critical": {"confidence_below": 0.99, "doubt_above": 0.3},
    "standard": {"confidence_below": 0.9, "doubt_above": 0.3},
}
CONFIDENCES = tuple(round(float(t), 2) for t in np.arange(0.0, 1.0001, 0.02))
DOUBTS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, *(round(float(a), 2) for a in np.arange(0.05, 0.951, 0.05)))


class Rows:
    """Rows scored by a learned router: the light model's probabilities, p(wrong), the heavy model's labels, the true
    labels."""

    def __init__(self, light: Runner, heavy: Runner, router: LearnedRouter, stats, images, sent, labels) -> None:
        # the learned router does not read the tier, so one set of rows serves every tier
        rows = signatures(images, sent, [RequestContext()] * len(images), stats)
        self.light = light.infer(images)
        self.doubt = router.wrong_probability(escalation_inputs(rows, self.light, images))
        self.heavy = heavy.infer(images).argmax(axis=1)
        self.labels = labels

    def cascade(self, confidence: float, doubt: float) -> tuple[float, float]:
        """Accuracy and share escalated with this pair of thresholds."""
        escalated = (self.light.max(axis=1) < confidence) | (self.doubt > doubt)
        answers = np.where(escalated, self.heavy, self.light.argmax(axis=1))
        return float((answers == self.labels).mean()), float(escalated.mean())

    def always_heavy(self) -> float:
        return float((self.heavy == self.labels).mean())


def _concat(parts: list[Rows]) -> Rows:
    pooled = object.__new__(Rows)
    for field in ("light", "doubt", "heavy", "labels"):
        setattr(pooled, field, np.concatenate([getattr(p, field) for p in parts]))
    return pooled


def choose_pair(clean: Rows, perturbed: Rows, goal: float) -> dict | None:
    """The pair escalating the fewest perturbed rows with both sets at `goal` of always-heavy (ties: fewer clean);
    None when no pair of the grid does."""
    best = None
    for confidence in CONFIDENCES:
        for doubt in DOUBTS:
            (clean_acc, clean_esc), (pert_acc, pert_esc) = (
                clean.cascade(confidence, doubt),
                perturbed.cascade(confidence, doubt),
            )
            if clean_acc < goal * clean.always_heavy() or pert_acc < goal * perturbed.always_heavy():
                continue
            key = (pert_esc, clean_esc, -confidence)
            if best is None or key < best[0]:
                best = (key, {"confidence_below": confidence, "doubt_above": doubt})
    return None if best is None else best[1]


def choose_stricter(perturbed: Rows, doubt: float, goal: float) -> float | None:
    """The lowest confidence threshold at which, with `doubt` as the p(wrong) bound, the perturbed rows keep `goal`
    of always-heavy's accuracy; None when none of the grid does."""
    for confidence in CONFIDENCES:
        if perturbed.cascade(confidence, doubt)[0] >= goal * perturbed.always_heavy():
            return confidence
    return None


def _named_pairs(pairs: dict[str, dict]) -> list[tuple[str, dict]]:
    """Each distinct pair once, named by every name it has (e.g. "shipped, chosen")."""
    names: dict[tuple, list[str]] = {}
    for name, pair in pairs.items():
        names.setdefault(tuple(sorted(pair.items())), []).append(name)
    return [(", ".join(named), dict(pair)) for pair, named in names.items()]


def cross_fitted(light: Runner, heavy: Runner, stats: TrainingStats, split: DigitsSplit) -> tuple[Rows, Rows]:
    """The out-of-fold rows of the validation split and of its variations, `light` as the cascade's first stage: per
    fold, a learned router trained by the build's recipe on the other folds scores the fold and its variations."""
    validation, clean, perturbed = split.validation, [], []
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=RECIPE.seed).split(validation.images, validation.labels)
    for fold, (rest, held) in enumerate(folds):
        part = Part(validation.images[rest], validation.labels[rest], validation.rows[rest])
        router, _ = train_learned_router(light, stats, replace(split, validation=part), RECIPE)
        images, labels = validation.images[held], validation.labels[held]
        clean.append(Rows(light, heavy, router, stats, images, source_stats(images), labels))
        varied, varied_labels = learned_router_images(images, labels, replace(RECIPE, seed=RECIPE.seed + 1000 + fold))
        varied, varied_labels = varied[len(images) :], varied_labels[len(images) :]  # the variations only
        perturbed.append(Rows(light, heavy, router, stats, varied, source_stats(varied), varied_labels))
    return _concat(clean), _concat(perturbed)


def built_router_rows(light: Runner, heavy: Runner, stats: TrainingStats, split: DigitsSplit) -> dict[str, Rows]:
    """The held-out split's and the demo's perturbed images' rows, scored by a learned router trained as the build
    trains it (on all of the validation split), `light` as the first stage."""
    built, _ = train_learned_router(light, stats, split, RECIPE)
    return {name: Rows(light, heavy, built, stats, *images) for name, images in _image_sets(split).items()}


def measure() -> dict:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    policy = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
    cascade = policy.cascade
    shipped = {
        tier: {"confidence_below": cascade.thresholds[tier], "doubt_above": cascade.learned_escalate_above[tier]}
        for tier in GOALS
    }
    adapted_doubt = cascade.learned_escalate_above[ADAPTED_TIER]
    shipped[STRICTER] = {"confidence_below": policy.adaptation.stricter_threshold, "doubt_above": adapted_doubt}
    report = report_io.start(
        "thresholds",
        {
            "folds": FOLDS,
            "goals": {**GOALS, STRICTER: STRICTER_GOAL},
            "recipe": asdict(RECIPE),
            "shipped": shipped,
            "set_by_hand_before": SET_BY_HAND,
            "confidences": list(CONFIDENCES),
            "doubts": list(DOUBTS),
        },
    )
    split = load_split()
    stats = TrainingStats.load(DEFAULT_REPOSITORY / ROUTER_MODEL / "1" / STATS_FILE)
    light = load_runner(version_dir(DEFAULT_REPOSITORY, router_policy(DEFAULT_REPOSITORY).cascade.first))
    heavy = load_runner(version_dir(DEFAULT_REPOSITORY, "digits_heavy:3"))
    clean_oof, perturbed_oof = cross_fitted(light, heavy, stats, split)
    chosen = {tier: choose_pair(clean_oof, perturbed_oof, goal) for tier, goal in GOALS.items()}
    if missed := [tier for tier, pair in chosen.items() if pair is None]:
        raise SystemExit(f"no pair of thresholds keeps {', '.join(missed)}'s goal out of fold: no report")
    if (stricter := choose_stricter(perturbed_oof, adapted_doubt, STRICTER_GOAL)) is None:
        raise SystemExit(f"no confidence threshold keeps {STRICTER_GOAL:.1%} on the variations out of fold: no report")
    chosen[STRICTER] = {"confidence_below": stricter, "doubt_above": adapted_doubt}
    report["chosen"] = chosen
    sets = built_router_rows(light, heavy, stats, split)
    sets = {"out-of-fold validation": clean_oof, "out-of-fold variations": perturbed_oof, **sets}
    for tier in [*GOALS, STRICTER]:
        pairs = {"shipped": shipped[tier], "chosen": chosen[tier]}
        if tier in SET_BY_HAND:
            pairs = {"set by hand before": SET_BY_HAND[tier], **pairs}
        for pair_name, pair in _named_pairs(pairs):
            for set_name, rows in sets.items():
                accuracy, escalated = rows.cascade(pair["confidence_below"], pair["doubt_above"])
                report["runs"].append(
                    {
                        "tier": tier,
                        "thresholds": pair_name,
                        **pair,
                        "set": set_name,
                        "accuracy": accuracy,
                        "escalated": escalated,
                        "always_heavy": rows.always_heavy(),
                        "rows": len(rows.labels),
                    }
                )
    return report


def table(report: dict) -> str:
    lines = [
        "| tier (goal: of always-heavy's accuracy) | thresholds | rows | accuracy / always-heavy's | escalated |",
        "|---|---|---|---:|---:|",
    ]
    goals = report["settings"]["goals"]
    for run in report["runs"]:
        pair = f"confidence < {run['confidence_below']:g} or p(wrong) > {run['doubt_above']:g} ({run['thresholds']})"
        lines.append(
            f"| {run['tier']} ({goals[run['tier']]:.2%}) | {pair} | {run['set']} ({run['rows']:,}) "
            f"| {run['accuracy']:.4f} / {run['always_heavy']:.4f} ({run['accuracy'] / run['always_heavy']:.4f}) "
            f"| {run['escalated']:.1%} |"
        )
    footer = f"Chosen out of fold ({report['settings']['folds']} folds of the validation split)."
    return "\n".join([*lines, "", f"{footer} {report_io.provenance(report)}"])


if __name__ == "__main__":
    report_io.measure_or_table(__doc__, REPORT, measure, table)
