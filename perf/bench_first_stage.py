"""Candidate first stages for the cascade, in-process: how often each is wrong where the heavy model is right, and
what one row costs. A measurement to choose by: the build makes `digits_light:2` by the distilled candidate's recipe.

Usage: .venv/bin/python perf/bench_first_stage.py   (about 3 minutes; writes perf/reports/first_stage.json)
       .venv/bin/python perf/bench_first_stage.py --table   (the README table, from the report)

P2's bound: with a heavy call far costlier than the router, the cascade's throughput over always-heavy tends to one
over the share of rows it escalates. To keep always-heavy's accuracy it must escalate at least the rows its first
stage gets wrong and the heavy model right: that share ("must escalate", an oracle router's) bounds what any learned
router can reach. The baseline, `digits_light:1`, is a logistic regression distilled from `digits_heavy:2` on clean
training images (the first stage until this bench's distilled MLP became `digits_light:2`). The scikit-learn
candidates are trained on the training split plus perturbed copies of it made by the demo workload's own functions
(tierserve.tools.workload: noise and shifts; its upscaling by whole factors comes back exactly when preprocess resizes
it, so it adds nothing to train on), as `digits_heavy:3` is trained on such perturbations. The last candidate is what
the mission's light model would be, a distilled fast model: an MLP distilled from `digits_heavy:3`
(tools/torch_trainer.train_distilled_mlp) with the CNN's own augmentation and schedule. Scored on the held-out split
and on the demo's perturbed images (bench_models.perturbed_samples, made from the test split, which no candidate
trains on), against `digits_heavy:3`. Each trained candidate runs once per seed of SEEDS (its perturbed copies and its
initial weights). Cost: µs for one row through ONNX Runtime, as the router runs its in-process first stage, the best
of 5 timed loops.

An oracle is not a router. So, for the baseline first stage and each candidate's first seed, the standard tier's
cascade as the build would make it: a learned router trained by the build's recipe on that first stage's answers,
and the pair of thresholds chosen out of fold at the standard tier's goal (perf/choose_thresholds.py, the same
folds and grid), then scored on the held-out split and the perturbed images.
"""

from __future__ import annotations

import tempfile
import timeit
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import report_io
from bench_learned_router import _image_sets
from choose_thresholds import GOALS, built_router_rows, choose_pair, cross_fitted
from report_io import spread, spread_text
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tierserve.manifest import version_dir
from tierserve.pixels import NUM_CLASSES
from tierserve.router_files import ROUTER_MODEL, STATS_FILE
from tierserve.runners import OnnxRunner, Runner, load_runner
from tierserve.signature import TrainingStats
from tierserve.tools import torch_trainer
from tierserve.tools.build_models import MODEL_SPECS, build_all
from tierserve.tools.dataset import DigitsSplit, load_split
from tierserve.tools.onnx_export import to_onnx, torch_to_onnx
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.workload import noisy, shifted

REPORT = "first_stage.json"
SEEDS = (1, 2, 3)
SHIPPED, HEAVY = "digits_light:1", "digits_heavy:3"
TIER = "standard"  # the cascade estimated for each first stage
NOISE_SIGMAS = (2.0, 4.0)
# the heavy model's augmentation and schedule, which the distilled candidate trains with
CNN_RECIPE = torch_trainer.CnnRecipe.from_recipe(next(spec.recipe for spec in MODEL_SPECS if spec.name == HEAVY))


@dataclass(frozen=True)
class Candidate:
    """A first stage to train: its name, how it is trained (split, seed, the heavy model as a teacher -> its ONNX
    graph, mapping pixels [N, 64] to probabilities [N, 10]), and its multiply-adds for one image."""

    name: str
    train: Callable[[DigitsSplit, int, Runner], bytes]
    multiply_adds: int


def _sklearn(classifier: Callable[[int], BaseEstimator]) -> Callable[[DigitsSplit, int, Runner], bytes]:
    """Training by scikit-learn on standardised pixels of the training split and its perturbed copies, hard labels."""

    def train(split: DigitsSplit, seed: int, teacher: Runner) -> bytes:
        images = perturbed_copies(split.train.images, seed)
        labels = np.tile(split.train.labels, len(images) // len(split.train.labels))
        model = make_pipeline(StandardScaler(), classifier(seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed epoch budget is the recipe
            return to_onnx(model.fit(images.reshape(len(images), -1), labels))

    return train


def _mlp_adds(hidden: int) -> int:
    return 64 * hidden + hidden * NUM_CLASSES


CANDIDATES = (
    Candidate(
        "logistic regression, perturbed copies", _sklearn(lambda seed: LogisticRegression(C=0.1, max_iter=2000)), 640
    ),
    Candidate(
        "MLP, 32 hidden, perturbed copies",
        _sklearn(lambda seed: MLPClassifier((32,), alpha=0.01, max_iter=300, random_state=seed)),
        _mlp_adds(32),
    ),
    Candidate(
        "MLP, 64 hidden, perturbed copies",
        _sklearn(lambda seed: MLPClassifier((64,), alpha=0.01, max_iter=300, random_state=seed)),
        _mlp_adds(64),
    ),
    Candidate(
        f"MLP, 64 hidden, distilled from {HEAVY} on its own perturbations (torch)",
        lambda split, seed, teacher: torch_to_onnx(
            torch_trainer.train_distilled_mlp(split, seed, CNN_RECIPE, teacher.infer, hidden=64)
        ),
        _mlp_adds(64),
    ),
)


def perturbed_copies(images: np.ndarray, seed: int) -> np.ndarray:
    """The images, and copies of them noisy at each of NOISE_SIGMAS, shifted, and shifted and noisy."""
    rng = np.random.default_rng(seed)
    copies = [images]
    copies += [noisy(images, sigma, int(rng.integers(1 << 31))) for sigma in NOISE_SIGMAS]
    moved = shifted(images, int(rng.integers(1 << 31)))
    copies += [moved, noisy(moved, NOISE_SIGMAS[0], int(rng.integers(1 << 31)))]
    return np.concatenate(copies).astype(np.float32)


def _us_per_row(runner: Runner, image: np.ndarray) -> float:
    return 1e6 * min(timeit.repeat(lambda: runner.infer(image), number=2000, repeat=5)) / 2000


def _scores(runner: Runner, sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Per set: accuracy, and the share of rows wrong where the heavy model is right (an oracle must escalate)."""
    figures = {}
    for name, (images, labels, heavy_right) in sets.items():
        right = runner.infer(images).argmax(axis=1) == labels
        figures[f"{name}_accuracy"] = float(right.mean())
        figures[f"{name}_must_escalate"] = float((~right & heavy_right).mean())
    return figures


def _cascade(light: Runner, heavy: Runner, stats: TrainingStats, split: DigitsSplit) -> dict:
    """The TIER cascade with `light` first, as the build would make it (see the module's docstring)."""
    out_of_fold = cross_fitted(light, heavy, stats, split)
    pair = choose_pair(out_of_fold.clean, out_of_fold.perturbed, GOALS[TIER])
    if pair is None:
        return {"pair": None}
    figures: dict = {"pair": pair}
    for name, rows in built_router_rows(light, heavy, stats, split).items():
        accuracy, escalated = rows.cascade(pair["confidence_below"], pair["doubt_above"])
        figures |= {f"{name}_accuracy": accuracy, f"{name}_escalated": escalated}
    return figures


def measure() -> dict:
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    report = report_io.start(
        "first_stage",
        {
            "seeds": list(SEEDS),
            "shipped": SHIPPED,
            "heavy": HEAVY,
            "noise_sigmas": list(NOISE_SIGMAS),
            "copies": "copies of each training image: noisy at each sigma, shifted, shifted and noisy",
            "cascade_tier": TIER,
            "cascade_goal": GOALS[TIER],
        },
    )
    split = load_split()
    heavy = load_runner(version_dir(DEFAULT_REPOSITORY, HEAVY))
    sets = {  # the same images as the cascade's rows (choose_thresholds.built_router_rows)
        name: (images, labels, heavy.infer(images).argmax(axis=1) == labels)
        for name, (images, _, labels) in _image_sets(split).items()
    }
    report["heavy"] = {name: float(s[2].mean()) for name, s in sets.items()}
    one_row = split.test.images[:1]
    shipped = load_runner(version_dir(DEFAULT_REPOSITORY, SHIPPED))
    report["runs"].append(
        {"candidate": SHIPPED, "seed": None, "multiply_adds": 640, "us_per_row": _us_per_row(shipped, one_row)}
        | _scores(shipped, sets)
    )
    stats = TrainingStats.load(DEFAULT_REPOSITORY / ROUTER_MODEL / "1" / STATS_FILE)
    report["cascade"] = {SHIPPED: _cascade(shipped, heavy, stats, split)}
    with tempfile.TemporaryDirectory() as scratch:
        for candidate in CANDIDATES:
            for seed in SEEDS:
                path = Path(scratch) / "model.onnx"
                path.write_bytes(candidate.train(split, seed, heavy))
                runner = OnnxRunner(path, accepts_missing=False)
                report["runs"].append(
                    {
                        "candidate": candidate.name,
                        "seed": seed,
                        "multiply_adds": candidate.multiply_adds,
                        "us_per_row": _us_per_row(runner, one_row),
                    }
                    | _scores(runner, sets)
                )
                if seed == SEEDS[0]:
                    report["cascade"][candidate.name] = _cascade(runner, heavy, stats, split)
    by_candidate: dict[str, list[dict]] = {}
    for run in report["runs"]:
        by_candidate.setdefault(run["candidate"], []).append(run)
    report["summary"] = {
        name: {
            key: spread(run[key] for run in runs)
            for key in runs[0]
            if key not in ("candidate", "seed", "multiply_adds")
        }
        | {"multiply_adds": runs[0]["multiply_adds"], "runs": len(runs)}
        for name, runs in by_candidate.items()
    }
    return report


def table(report: dict) -> str:
    """The README's table, from the report."""
    settings, heavy = report["settings"], report["heavy"]
    lines = [
        "| first stage | multiply-adds | µs per row | test accuracy | perturbed accuracy "
        "| must escalate: test / perturbed | P2 bound: test / perturbed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["summary"].items():
        label = f"`{name}` (baseline)" if name == settings["shipped"] else f"{name}, {s['runs']} seeds"
        must = [s[f"{set_name}_must_escalate"]["median"] for set_name in ("test", "perturbed")]
        lines.append(
            f"| {label} | {s['multiply_adds']:,} | {spread_text(s['us_per_row'], '.1f')} "
            f"| {report_io.cell(s['test_accuracy'], '.4f')} | {report_io.cell(s['perturbed_accuracy'], '.4f')} "
            f"| {must[0]:.1%} / {must[1]:.1%} | {' / '.join(f'{1 / m:.1f}x' if m else 'unbounded' for m in must)} |"
        )
    lines += [
        "",
        f"| {settings['cascade_tier']} cascade as built, with this first stage (seed {settings['seeds'][0]}) "
        "| thresholds chosen out of fold | test: accuracy / always-heavy's (escalated) "
        "| perturbed: accuracy / always-heavy's (escalated) | P2 bound: test / perturbed |",
        "|---|---|---:|---:|---:|",
    ]
    for name, c in report["cascade"].items():
        label = f"`{name}` (baseline)" if name == settings["shipped"] else name
        if c["pair"] is None:
            lines.append(f"| {label} | none keeps {settings['cascade_goal']:.1%} of always-heavy's accuracy | | | |")
            continue
        cells = [
            f"{c[f'{n}_accuracy']:.4f} / {heavy[n]:.4f} ({c[f'{n}_escalated']:.1%})" for n in ("test", "perturbed")
        ]
        bounds = " / ".join(f"{1 / c[f'{n}_escalated']:.1f}x" for n in ("test", "perturbed"))
        lines.append(
            f"| {label} | confidence < {c['pair']['confidence_below']:g} or p(wrong) > {c['pair']['doubt_above']:g} "
            f"| {cells[0]} | {cells[1]} | {bounds} |"
        )
    lines += [
        "",
        f"`{settings['heavy']}` answers {heavy['test']:.4f} of the test split and {heavy['perturbed']:.4f} of the "
        "perturbed images. Must escalate: the share of rows the first stage gets wrong and the heavy model right "
        "(medians over seeds), the fewest escalations that keep always-heavy's accuracy. P2 bound: one over that "
        "share, the most the cascade can gain over always-heavy when a heavy call costs far more than the router "
        "(in the second table, over the share the cascade as built escalates). "
        f"The scikit-learn candidates train on the training split and {settings['copies']} (noise sigmas "
        f"{', '.join(f'{s:g}' for s in settings['noise_sigmas'])}); the distilled one on the training split freshly "
        f"perturbed every epoch as `{settings['heavy']}` was, against `{settings['heavy']}`'s answers at temperature 2 "
        "and the labels, half each. A run per candidate and seed: " + report_io.provenance(report),
    ]
    return "\n".join(lines)


def main() -> None:
    report_io.measure_or_table(__doc__, REPORT, measure, table)


if __name__ == "__main__":
    main()
