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

Per-user adaptation's thresholds are chosen on the same out-of-fold rows, with ADAPTED_TIER's p(wrong) bound:
- stricter (policy.yaml adaptation.stricter_threshold), for a user whose images the first model often gets wrong,
  that is for the variations alone: the lowest confidence threshold that keeps STRICTER_GOAL of always-heavy's
  accuracy on the out-of-fold variations;
- relaxed (adaptation.relaxed_threshold), for a user the first model gets right more often than
  adaptation.relax_above: the lowest confidence threshold (going down from the top, to the first that fails) that
  keeps ADAPTED_TIER's goal on the clean rows and on every KIND of variation (noise of one level, shifts, both) that
  the first model gets right that often, each on its own. A user whose images are mildly noisy is relaxed as well
  as one whose images are clean, and must lose nothing by it. The kinds are also scored with the relaxation shipped
  before (RELAXED_BEFORE).
Each other version of the first model the build trains a learned router for (build_router.judged_models: an
experiment arm or a rollback may put it first) is scored the same way, with the shipped pairs and pairs chosen for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

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
from tierserve.tools.build_router import RECIPE, judged_models, learned_router_images, train_learned_router
from tierserve.tools.dataset import DigitsSplit, Part, load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.workload import noisy, shifted

REPORT = "thresholds.json"
FOLDS = 5
# per tier: the share of always-heavy's accuracy its cascade keeps, on clean and on perturbed out-of-fold rows
GOALS = {"critical": 0.9995, "standard": 0.995}
ADAPTED_TIER, STRICTER_GOAL = "standard", 0.999
RELAXED_KEEPS = 0.995  # of the accuracy ADAPTED_TIER's own pair gives each kind of images a relaxed user may send
RELAXED_BEFORE = {"confidence": 0.5, "doubt": 1.0}  # adaptation's relaxation until 2026-11-24: 0.5, never on doubt
KIND_DRAWS = 8  # draws of each kind of variation per fold (a fold holds about 72 images)
STRICTER = f"{ADAPTED_TIER}, stricter per user"  # the table's names for the adapted users' pairs
RELAXED = f"{ADAPTED_TIER}, relaxed per user"


def _noise(sigma: float) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda images, seed: noisy(images, sigma, seed)


def _shift(max_shift: int) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda images, seed: shifted(images, seed, max_shift=max_shift)


KINDS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {  # one kind of variation each, for the relaxed threshold
    **{f"noise sigma {sigma}": _noise(sigma) for sigma in (1, 2, 3, 4)},
    "shifted up to 1 pixel": _shift(1),
    "shifted up to 2 pixels": _shift(2),
    "shifted up to 1 pixel, noise sigma 2": lambda images, seed: _noise(2.0)(_shift(1)(images, seed), seed + 1),
}
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

    def first_accuracy(self) -> float:
        """How often the first model alone is right."""
        return float((self.light.argmax(axis=1) == self.labels).mean())


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


def choose_relaxed(out_of_fold: OutOfFold, pair: dict, keep: float, relax_above: float) -> tuple[float, list[str]]:
    """The confidence threshold for users the first model gets right more often than `relax_above`: going down from
    the tier's (`pair`), the last one at which, with the tier's p(wrong) bound, the clean rows and every KIND of
    variation the first model gets right that often keep `keep` of the accuracy the tier's pair gives them; with
    those kinds' names."""
    kept = {"none": out_of_fold.clean} | {
        kind: rows for kind, rows in out_of_fold.kinds.items() if rows.first_accuracy() > relax_above
    }
    tier_threshold, doubt = pair["confidence_below"], pair["doubt_above"]
    floor = {kind: keep * rows.cascade(tier_threshold, doubt)[0] for kind, rows in kept.items()}
    chosen = tier_threshold
    for confidence in sorted((c for c in CONFIDENCES if c < tier_threshold), reverse=True):
        if any(rows.cascade(confidence, doubt)[0] < floor[kind] for kind, rows in kept.items()):
            break
        chosen = confidence
    return chosen, list(kept)


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


@dataclass(frozen=True)
class OutOfFold:
    """Rows scored by learned routers that never saw them: the validation split, its variations (the learned router
    recipe's), and each KIND of variation on its own."""

    clean: Rows
    perturbed: Rows
    kinds: dict[str, Rows]


def cross_fitted(light: Runner, heavy: Runner, stats: TrainingStats, split: DigitsSplit) -> OutOfFold:
    """The out-of-fold rows of the validation split and of its variations, `light` as the cascade's first stage: per
    fold, a learned router trained by the build's recipe on the other folds scores the fold and its variations."""
    validation, clean, perturbed = split.validation, [], []
    kinds: dict[str, list[Rows]] = {kind: [] for kind in KINDS}
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=RECIPE.seed).split(validation.images, validation.labels)
    for fold, (rest, held) in enumerate(folds):
        part = Part(validation.images[rest], validation.labels[rest], validation.rows[rest])
        router, _ = train_learned_router(light, stats, replace(split, validation=part), RECIPE)
        images, labels = validation.images[held], validation.labels[held]
        clean.append(Rows(light, heavy, router, stats, images, source_stats(images), labels))
        varied, varied_labels = learned_router_images(images, labels, replace(RECIPE, seed=RECIPE.seed + 1000 + fold))
        varied, varied_labels = varied[len(images) :], varied_labels[len(images) :]  # the variations only
        perturbed.append(Rows(light, heavy, router, stats, varied, source_stats(varied), varied_labels))
        for kind, vary in KINDS.items():
            for draw in range(KIND_DRAWS):
                one_kind = vary(images, RECIPE.seed + 2000 + 100 * fold + draw)
                kinds[kind].append(Rows(light, heavy, router, stats, one_kind, source_stats(one_kind), labels))
    return OutOfFold(_concat(clean), _concat(perturbed), {kind: _concat(rows) for kind, rows in kinds.items()})


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
    shipped[RELAXED] = {"confidence_below": policy.adaptation.relaxed_threshold, "doubt_above": adapted_doubt}
    report = report_io.start(
        "thresholds",
        {
            "folds": FOLDS,
            "goals": {**GOALS, STRICTER: STRICTER_GOAL},
            "relaxed_keeps": RELAXED_KEEPS,
            "kind_draws_per_fold": KIND_DRAWS,
            "relax_above": policy.adaptation.relax_above,
            "relaxed_before": RELAXED_BEFORE,
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
    out_of_fold = cross_fitted(light, heavy, stats, split)
    clean_oof, perturbed_oof = out_of_fold.clean, out_of_fold.perturbed
    chosen = {tier: choose_pair(clean_oof, perturbed_oof, goal) for tier, goal in GOALS.items()}
    if missed := [tier for tier, pair in chosen.items() if pair is None]:
        raise SystemExit(f"no pair of thresholds keeps {', '.join(missed)}'s goal out of fold: no report")
    if (stricter := choose_stricter(perturbed_oof, adapted_doubt, STRICTER_GOAL)) is None:
        raise SystemExit(f"no confidence threshold keeps {STRICTER_GOAL:.1%} on the variations out of fold: no report")
    chosen[STRICTER] = {"confidence_below": stricter, "doubt_above": adapted_doubt}
    relaxed, kept = choose_relaxed(out_of_fold, chosen[ADAPTED_TIER], RELAXED_KEEPS, policy.adaptation.relax_above)
    chosen[RELAXED] = {"confidence_below": relaxed, "doubt_above": adapted_doubt}
    report["chosen"] = chosen
    report["kinds"] = [
        {
            "kind": kind,
            "rows": len(rows.labels),
            "first_accuracy": rows.first_accuracy(),
            "always_heavy": rows.always_heavy(),
            "relaxed_users_kept": kind in kept,
            **{
                f"{name}_accuracy": rows.cascade(chosen[tier]["confidence_below"], adapted_doubt)[0]
                for name, tier in (("tier", ADAPTED_TIER), ("relaxed", RELAXED), ("stricter", STRICTER))
            },
            "relaxed_before_accuracy": rows.cascade(**RELAXED_BEFORE)[0],
        }
        for kind, rows in {"none": clean_oof, **out_of_fold.kinds}.items()
    ]
    sets = _scored_sets(out_of_fold, light, heavy, stats, split)
    for tier in [*GOALS, STRICTER, RELAXED]:
        pairs = {"shipped": shipped[tier], "chosen": chosen[tier]}
        if tier in SET_BY_HAND:
            pairs = {"set by hand before": SET_BY_HAND[tier], **pairs}
        report["runs"] += _runs(tier, pairs, sets, cascade.first)
    # a rollback or an experiment arm may put another version of the first model first: it runs with these
    # thresholds and its own learned router (the build trains one for each judged model)
    for first in judged_models(DEFAULT_REPOSITORY, policy)[1:]:
        other = load_runner(version_dir(DEFAULT_REPOSITORY, first))
        other_oof = cross_fitted(other, heavy, stats, split)
        other_sets = _scored_sets(other_oof, other, heavy, stats, split)
        for tier, goal in GOALS.items():
            pairs = {"shipped": shipped[tier]}
            if (own := choose_pair(other_oof.clean, other_oof.perturbed, goal)) is not None:
                pairs["chosen for it"] = own
            report["runs"] += _runs(tier, pairs, other_sets, first)
    return report


def _scored_sets(
    out_of_fold: OutOfFold, light: Runner, heavy: Runner, stats: TrainingStats, split: DigitsSplit
) -> dict[str, Rows]:
    """The out-of-fold rows, and the held-out split's and the perturbed images' scored by the build's router."""
    built = built_router_rows(light, heavy, stats, split)
    return {"out-of-fold validation": out_of_fold.clean, "out-of-fold variations": out_of_fold.perturbed, **built}


def _runs(tier: str, pairs: dict[str, dict], sets: dict[str, Rows], first: str) -> list[dict]:
    """Each distinct pair of `pairs` on each set, `first` answering first."""
    runs = []
    for pair_name, pair in _named_pairs(pairs):
        for set_name, rows in sets.items():
            accuracy, escalated = rows.cascade(pair["confidence_below"], pair["doubt_above"])
            runs.append(
                {
                    "tier": tier,
                    "first_model": first,
                    "thresholds": pair_name,
                    **pair,
                    "set": set_name,
                    "accuracy": accuracy,
                    "escalated": escalated,
                    "always_heavy": rows.always_heavy(),
                    "rows": len(rows.labels),
                }
            )
    return runs


def _goal(report: dict, tier: str) -> str:
    settings = report["settings"]
    if tier == RELAXED:
        return f"{settings['relaxed_keeps']:.2%} of {ADAPTED_TIER}'s, per kind"
    return f"{settings['goals'][tier]:.2%}"


def table(report: dict) -> str:
    lines = [
        "| tier (goal: of always-heavy's accuracy) | thresholds | rows | accuracy / always-heavy's | escalated |",
        "|---|---|---|---:|---:|",
    ]
    first = report["runs"][0].get("first_model")  # the policy's cascade.first; other first models are named
    for run in report["runs"]:
        pair = f"confidence < {run['confidence_below']:g} or p(wrong) > {run['doubt_above']:g} ({run['thresholds']})"
        tier = run["tier"] if run.get("first_model", first) == first else f"{run['tier']}, {run['first_model']} first"
        lines.append(
            f"| {tier} ({_goal(report, run['tier'])}) | {pair} | {run['set']} ({run['rows']:,}) "
            f"| {run['accuracy']:.4f} / {run['always_heavy']:.4f} ({run['accuracy'] / run['always_heavy']:.4f}) "
            f"| {run['escalated']:.1%} |"
        )
    footer = f"Chosen out of fold ({report['settings']['folds']} folds of the validation split)."
    if kinds := report.get("kinds"):
        chosen, before = report["chosen"], report["settings"]["relaxed_before"]
        threshold = {
            name: chosen[tier]["confidence_below"]
            for name, tier in ((ADAPTED_TIER, ADAPTED_TIER), ("relaxed", RELAXED), ("stricter", STRICTER))
        }
        lines += [
            "",
            f"| kind of images, out of fold | rows | first model alone | always-heavy | {ADAPTED_TIER} "
            f"(< {threshold[ADAPTED_TIER]:g}) | relaxed per user (< {threshold['relaxed']:g}) | stricter per user "
            f"(< {threshold['stricter']:g}) | relaxed before (< {before['confidence']:g}, not on p(wrong)) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind in kinds:
            mark = " (a relaxed user's)" if kind["relaxed_users_kept"] else ""
            lines.append(
                f"| {kind['kind']}{mark} | {kind['rows']:,} | {kind['first_accuracy']:.4f} "
                f"| {kind['always_heavy']:.4f} | {kind['tier_accuracy']:.4f} | {kind['relaxed_accuracy']:.4f} "
                f"| {kind['stricter_accuracy']:.4f} | {kind['relaxed_before_accuracy']:.4f} |"
            )
        footer += (
            f" Each threshold with {ADAPTED_TIER}'s p(wrong) bound. A relaxed user's kinds are those the first model "
            f"alone gets right more often than adaptation.relax_above ({report['settings']['relax_above']:g}); the "
            f"relaxed threshold keeps {report['settings']['relaxed_keeps']:.1%} of what {ADAPTED_TIER}'s threshold "
            f"gives each of them, every threshold above it too."
        )
    return "\n".join([*lines, "", f"{footer} {report_io.provenance(report)}"])


if __name__ == "__main__":
    report_io.measure_or_table(__doc__, REPORT, measure, table)
