"""Which cascade thresholds the standard tier could use, chosen on data neither the learned router nor the report uses.

Usage: .venv/bin/python perf/choose_thresholds.py   (about 2 min; writes perf/reports/thresholds.json)
       .venv/bin/python perf/choose_thresholds.py --table   (the table, from the report)

The standard tier escalates a row to digits_heavy:3 when digits_light:1's confidence is below a threshold OR the
learned router's p(wrong) is above another (policy.yaml: cascade.thresholds and learned_router.escalate_above). Which
pair escalates least at 99.5% of always-heavy's accuracy? Choosing it on the held-out split or the demo's perturbed
images would fit the report to itself. So, cross-fitted: the validation split is cut into FOLDS stratified folds;
for each, a learned router is trained by the build's recipe on the other folds, and scores the fold's images and
their variations (the recipe's noise and shifts) that it never saw. On those out-of-fold rows, every pair of the
grid is tried; the chosen pair escalates the fewest perturbed rows while both the clean and the perturbed rows keep
GOAL of always-heavy's accuracy. Then the build's own router (trained on all of the validation split), with the
chosen pair and with the shipped one, is scored on the held-out split and the demo's perturbed images. Nothing here
changes what the server does; policy.yaml does.
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
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL, STATS_FILE
from tierserve.runners import Runner, load_runner
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.build_models import build_all
from tierserve.tools.build_router import RECIPE, learned_router_images, train_learned_router
from tierserve.tools.dataset import Part, load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY

REPORT = "thresholds.json"
TIER = "standard"
FOLDS = 5
GOAL = 0.995  # of always-heavy's accuracy, on clean and on perturbed rows
CONFIDENCES = tuple(round(float(t), 2) for t in np.arange(0.0, 1.0001, 0.02))
DOUBTS = tuple(round(float(a), 2) for a in np.arange(0.05, 0.951, 0.05))


class _Rows:
    """Rows scored by a learned router: the light model's probabilities, p(wrong), the heavy model's labels, the true
    labels."""

    def __init__(self, light: Runner, heavy: Runner, router: LearnedRouter, stats, images, sent, labels) -> None:
        rows = signatures(images, sent, [RequestContext(TIER)] * len(images), stats)
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


def _concat(parts: list[_Rows]) -> _Rows:
    pooled = object.__new__(_Rows)
    for field in ("light", "doubt", "heavy", "labels"):
        setattr(pooled, field, np.concatenate([getattr(p, field) for p in parts]))
    return pooled


def _choose(clean: _Rows, perturbed: _Rows) -> dict:
    """The pair escalating the fewest perturbed rows with both sets at GOAL of always-heavy (ties: fewer clean)."""
    best = None
    for confidence in CONFIDENCES:
        for doubt in DOUBTS:
            (clean_acc, clean_esc), (pert_acc, pert_esc) = (
                clean.cascade(confidence, doubt),
                perturbed.cascade(confidence, doubt),
            )
            if clean_acc < GOAL * clean.always_heavy() or pert_acc < GOAL * perturbed.always_heavy():
                continue
            key = (pert_esc, clean_esc, -confidence)
            if best is None or key < best[0]:
                best = (key, {"confidence_below": confidence, "doubt_above": doubt})
    if best is None:
        raise SystemExit("no pair of thresholds keeps the accuracy goal out of fold: no report")
    return best[1]


def measure() -> dict:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    policy = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
    shipped = {
        "confidence_below": policy.cascade.thresholds[TIER],
        "doubt_above": policy.cascade.learned_escalate_above,
    }
    report = report_io.start(
        "thresholds",
        {
            "tier": TIER,
            "folds": FOLDS,
            "goal": GOAL,
            "recipe": asdict(RECIPE),
            "shipped": shipped,
            "confidences": list(CONFIDENCES),
            "doubts": list(DOUBTS),
        },
    )
    split = load_split()
    stats = TrainingStats.load(DEFAULT_REPOSITORY / ROUTER_MODEL / "1" / STATS_FILE)
    light = load_runner(version_dir(DEFAULT_REPOSITORY, "digits_light:1"))
    heavy = load_runner(version_dir(DEFAULT_REPOSITORY, "digits_heavy:3"))
    validation, clean, perturbed = split.validation, [], []
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=RECIPE.seed).split(validation.images, validation.labels)
    for fold, (rest, held) in enumerate(folds):
        part = Part(validation.images[rest], validation.labels[rest], validation.rows[rest])
        router, _ = train_learned_router(light, stats, replace(split, validation=part), RECIPE)
        images, labels = validation.images[held], validation.labels[held]
        clean.append(_Rows(light, heavy, router, stats, images, source_stats(images), labels))
        varied, varied_labels = learned_router_images(images, labels, replace(RECIPE, seed=RECIPE.seed + 1000 + fold))
        varied, varied_labels = varied[len(images) :], varied_labels[len(images) :]  # the variations only
        perturbed.append(_Rows(light, heavy, router, stats, varied, source_stats(varied), varied_labels))
    clean_oof, perturbed_oof = _concat(clean), _concat(perturbed)
    chosen = _choose(clean_oof, perturbed_oof)
    report["chosen"] = chosen
    built, _ = train_learned_router(light, stats, split, RECIPE)  # what the build ships
    sets = {name: _Rows(light, heavy, built, stats, *images) for name, images in _image_sets(split).items()}
    sets = {"out-of-fold validation": clean_oof, "out-of-fold variations": perturbed_oof, **sets}
    for pair_name, pair in (("shipped", shipped), ("chosen", chosen)):
        for set_name, rows in sets.items():
            accuracy, escalated = rows.cascade(pair["confidence_below"], pair["doubt_above"])
            report["runs"].append(
                {
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
        "| thresholds (standard tier) | rows | accuracy / always-heavy's | escalated |",
        "|---|---|---:|---:|",
    ]
    for run in report["runs"]:
        pair = f"confidence < {run['confidence_below']:g} or p(wrong) > {run['doubt_above']:g} ({run['thresholds']})"
        lines.append(
            f"| {pair} | {run['set']} ({run['rows']:,}) | {run['accuracy']:.4f} / {run['always_heavy']:.4f} "
            f"({run['accuracy'] / run['always_heavy']:.4f}) | {run['escalated']:.1%} |"
        )
    footer = f"Chosen out of fold ({report['settings']['folds']} folds of the validation split)."
    return "\n".join([*lines, "", f"{footer} {report_io.provenance(report)}"])


if __name__ == "__main__":
    report_io.measure_or_table(__doc__, REPORT, measure, table)
