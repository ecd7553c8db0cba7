"""The learned router, in-process: how the cascade answers with it, over training seeds, and what it costs per row.

Usage: .venv/bin/python perf/bench_learned_router.py   (about a minute; writes perf/reports/learned_router.json)
       .venv/bin/python perf/bench_learned_router.py --table   (the README table, from the report)

For the build's recipe (tools/build_router.py) trained with SEEDS, and for the learned router it replaced (a logistic
regression over the signature's features alone, trained on the same images), the standard tier's cascade is computed
in-process: the cascade's first model (digits_light:2) answers, and a row goes to digits_heavy:3 when its confidence
is below the standard threshold or the learned router's p(wrong) is above each of THRESHOLDS and the one policy.yaml
ships. Accuracy and the share escalated on the held-out split and on the demo's perturbed images
(bench_models.perturbed_samples), next to always-heavy's accuracy. Cost: µs for one row's inputs and p(wrong), the
best of 5 timed loops. The server's figures are P2's (perf/bench_router.py); these are the spread over seeds that P2's
one build does not show.
"""

from __future__ import annotations

import timeit
from dataclasses import asdict, replace

import numpy as np
import report_io
from bench_models import perturbed_samples
from report_io import spread, spread_text
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tierserve.learned_router import escalation_features, escalation_inputs
from tierserve.manifest import version_dir
from tierserve.policy import Policy
from tierserve.resize import resize_to_native, source_stats
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL, STATS_FILE, router_policy
from tierserve.runners import load_runner
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.build_models import build_all
from tierserve.tools.build_router import RECIPE, learned_router_images, train_learned_router
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY

REPORT = "learned_router.json"
SEEDS = (11, 12, 13, 14, 15)
THRESHOLDS = (0.3, 0.5)  # besides the one policy.yaml ships for TIER
TIER = "standard"


def _image_sets(split) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per set: the native images, the facts of the images as sent, and the labels."""
    perturbed = [s for chosen in perturbed_samples(split).values() for s in chosen]
    native = np.concatenate([resize_to_native(s.image[None]) for s in perturbed])
    sent = np.concatenate([source_stats(s.image[None]) for s in perturbed])
    test = split.test.images
    return {
        "test": (test, source_stats(test), split.test.labels),
        "perturbed": (native, sent, np.array([s.label for s in perturbed])),
    }


def measure() -> dict:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    shipped = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE).cascade
    threshold, shipped_above = shipped.thresholds[TIER], shipped.learned_escalate_above[TIER]
    thresholds = sorted({shipped_above, *THRESHOLDS})
    report = report_io.start(
        "learned_router",
        {
            "seeds": list(SEEDS),
            "thresholds": thresholds,
            "shipped_above": shipped_above,
            "confidence_below": threshold,
            "tier": TIER,
            "recipe": asdict(RECIPE),
        },
    )
    split = load_split()
    router_dir = DEFAULT_REPOSITORY / ROUTER_MODEL / "1"
    stats = TrainingStats.load(router_dir / STATS_FILE)
    light = load_runner(version_dir(DEFAULT_REPOSITORY, router_policy(DEFAULT_REPOSITORY).cascade.first))
    heavy = load_runner(version_dir(DEFAULT_REPOSITORY, "digits_heavy:3"))
    sets = {}
    for name, (images, sent, labels) in _image_sets(split).items():
        rows = signatures(images, sent, [RequestContext(TIER)] * len(images), stats)
        light_probs = light.infer(images)
        sets[name] = (images, rows, light_probs, heavy.infer(images).argmax(axis=1), labels)
    report["always_heavy"] = {name: float((s[3] == s[4]).mean()) for name, s in sets.items()}

    def cascade(wrong_probability) -> dict:
        figures = {}
        for name, (images, rows, light_probs, heavy_labels, labels) in sets.items():
            doubt = wrong_probability(images, rows, light_probs)
            for above in thresholds:
                escalated = (light_probs.max(axis=1) < threshold) | (doubt > above)
                answers = np.where(escalated, heavy_labels, light_probs.argmax(axis=1))
                figures[f"{name}_accuracy_above_{above}"] = float((answers == labels).mean())
                figures[f"{name}_escalated_above_{above}"] = float(escalated.mean())
        return figures

    for seed in SEEDS:
        learned, _ = train_learned_router(light, stats, split, replace(RECIPE, seed=seed))
        figures = cascade(
            lambda images, rows, probs, m=learned: m.wrong_probability(escalation_inputs(rows, probs, images))
        )
        images, rows, probs = sets["test"][0][:1], sets["test"][1][:1], sets["test"][2][:1]
        loop = timeit.repeat(
            lambda m=learned, i=images, r=rows, p=probs: m.wrong_probability(escalation_inputs(r, p, i)),
            number=2000,
            repeat=5,
        )
        figures["us_per_row"] = 1e6 * min(loop) / 2000
        report["runs"].append({"router": "mlp", "seed": seed, **figures})

    # the learned router before: a logistic regression over the signature's features, on the same training images
    images, labels = learned_router_images(split.validation.images, split.validation.labels)
    probs = light.infer(images)
    features = escalation_features(
        signatures(images, source_stats(images), [RequestContext()] * len(images), stats), probs
    )
    scaler = StandardScaler().fit(features)
    logistic = LogisticRegression(max_iter=1000).fit(scaler.transform(features), probs.argmax(axis=1) != labels)

    def logistic_doubt(images, rows, probs):
        return logistic.predict_proba(scaler.transform(escalation_features(rows, probs)))[:, 1]

    report["runs"].append({"router": "logistic (features only)", "seed": None, **cascade(logistic_doubt)})
    mlp = [run for run in report["runs"] if run["router"] == "mlp"]
    report["summary"] = {key: spread(run[key] for run in mlp) for key in mlp[0] if key not in ("router", "seed")}
    return report


def table(report: dict) -> str:
    """The README's table, from the report."""
    s, heavy = report["summary"], report["always_heavy"]
    logistic = next(run for run in report["runs"] if run["router"] != "mlp")
    lines = [
        f"| learned router ({report['settings']['tier']} tier) | escalates above p(wrong) | test accuracy (escalated) "
        "| perturbed accuracy (escalated) |",
        "|---|---:|---:|---:|",
    ]
    settings = report["settings"]

    def shown(above: float) -> str:
        return f"{above} (shipped)" if above == settings.get("shipped_above") else f"{above}"

    for above in settings["thresholds"]:
        cells = [
            f"{spread_text(s[f'{name}_accuracy_above_{above}'], '.4f')} "
            f"({s[f'{name}_escalated_above_{above}']['median']:.1%})"
            for name in ("test", "perturbed")
        ]
        lines.append(f"| MLP, {len(settings['seeds'])} seeds | {shown(above)} | {cells[0]} | {cells[1]} |")
    for above in settings["thresholds"]:
        cells = [
            f"{logistic[f'{name}_accuracy_above_{above}']:.4f} ({logistic[f'{name}_escalated_above_{above}']:.1%})"
            for name in ("test", "perturbed")
        ]
        lines.append(f"| logistic regression over the features (before) | {shown(above)} | {cells[0]} | {cells[1]} |")
    lines.append(f"| always heavy | | {heavy['test']:.4f} (100%) | {heavy['perturbed']:.4f} (100%) |")
    confidence = settings.get("confidence_below")
    lines += [
        "",
        (f"A row also escalates below confidence {confidence:g} (the tier's threshold). " if confidence else "")
        + "In-process, `digits_heavy:3` answering escalated rows; the build trains seed "
        f"{settings['recipe']['seed']}. MLP inputs and p(wrong) for one row: "
        f"{spread_text(s['us_per_row'], '.1f')} µs. A run per seed and one for the logistic regression: "
        f"{report_io.provenance(report)}",
    ]
    return "\n".join(lines)


def main() -> None:
    report_io.measure_or_table(__doc__, REPORT, measure, table)


if __name__ == "__main__":
    main()
