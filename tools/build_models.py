"""Build the reference models into the model repository: train, export, verify, measure, write manifests.

Every artifact is checked before it is written: the served runner must reproduce the trainer's
probabilities, so a converter bug fails the build instead of reaching clients.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from tierserve.manifest import Manifest, ManifestError, version_dir
from tierserve.pixels import NUM_CLASSES
from tierserve.runners import Runner, load_runner, runner_for
from tierserve.tools import trainers
from tierserve.tools.build_router import build_router_artifacts, router_artifacts_missing
from tierserve.tools.dataset import DigitsSplit, load_split, mask_pixels
from tierserve.tools.onnx_export import to_onnx, torch_to_onnx
from tierserve.tools.perf_analyzer import write_input_data_files
from tierserve.tools.progress import ProgressCallback, no_progress

MISSING_FRACTIONS = (0.3, 0.6)
MISSING_MASK_SEED = 4242  # the held-out masks; the trainers use their own seeds
VERIFY_TOLERANCE = 1e-4
LIBRARIES = ("numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime")
TORCH_LIBRARIES = ("torch", "onnxscript")  # recorded as well for models trained with torch


@dataclass(frozen=True)
class ModelSpec:
    """One model version to build: where it goes and the recipe that makes it."""

    model: str
    version: int
    seed: int
    recipe: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.model}:{self.version}"


# digits_heavy:3's augmentation and training schedule (torch_trainer.Schedule), which its distilled student shares
CNN_SCHEDULE = {
    "epochs": 120,
    "batch": 64,
    "learning_rate": 0.003,
    "weight_decay": 0.0001,
    "max_shift": 2,
    "noise_sigma": 4.0,
    "rescale_sides": [10, 12, 14],
}

MODEL_SPECS = (
    ModelSpec("digits_heavy", 1, seed=1, recipe={"trainer": "mlp", "hidden": [256], "alpha": 0.1, "epochs": 200}),
    ModelSpec("digits_heavy", 2, seed=2, recipe={"trainer": "mlp", "hidden": [512, 256], "alpha": 0.1, "epochs": 200}),
    ModelSpec(
        "digits_heavy",
        3,
        seed=3,
        recipe={
            "trainer": "cnn",
            "channels": [32, 64],
            "hidden": 128,
            "dropout": 0.3,
            **CNN_SCHEDULE,
        },
    ),
    ModelSpec(
        "digits_light",
        1,
        seed=0,
        recipe={"trainer": "distilled_logistic", "teacher": "digits_heavy:2", "temperature": 2.0},
    ),
    ModelSpec(
        "digits_light",
        2,
        seed=0,
        recipe={
            "trainer": "distilled_mlp",
            "teacher": "digits_heavy:3",
            "hidden": 64,
            "temperature": 2.0,
            "hard_weight": 0.5,
            **CNN_SCHEDULE,  # the student learns its teacher on the images the teacher trained on
        },
    ),
    ModelSpec("digits_missing", 1, seed=7, recipe={"trainer": "gbdt_missing", "iterations": 100}),
    ModelSpec("digits_rules", 1, seed=0, recipe={"trainer": "centroids"}),
)


@dataclass(frozen=True)
class Built:
    """A trained model ready to write: its artifact and what the served runner must reproduce."""

    runtime: str
    artifact: str
    data: bytes
    accepts_missing: bool
    ops_per_sample: int
    predict_proba: Callable[[np.ndarray], np.ndarray]  # the trainer's own probabilities, for verification
    libraries: tuple[str, ...] = LIBRARIES  # whose versions the manifest records


class BuildError(RuntimeError):
    """A built artifact does not behave like the model it was exported from."""


def _onnx_built(model: BaseEstimator, accepts_missing: bool, ops_per_sample: int) -> Built:
    return Built(
        "onnxruntime",
        "model.onnx",
        to_onnx(model),
        accepts_missing,
        ops_per_sample,
        lambda images: model.predict_proba(images.reshape(len(images), -1)),
    )


def _build_mlp(spec: ModelSpec, split: DigitsSplit, repository: Path) -> Built:
    r = spec.recipe
    model = trainers.train_mlp(split, spec.seed, r["hidden"], r["alpha"], r["epochs"])
    mlp = model.steps[-1][1]
    return _onnx_built(model, False, sum(w.size for w in mlp.coefs_))


def _build_distilled_logistic(spec: ModelSpec, split: DigitsSplit, repository: Path) -> Built:
    teacher = load_runner(version_dir(repository, spec.recipe["teacher"]))
    model = trainers.distill_logistic(split, teacher.infer(split.train.images), spec.recipe["temperature"])
    return _onnx_built(model, False, 64 * NUM_CLASSES)


def _build_gbdt_missing(spec: ModelSpec, split: DigitsSplit, repository: Path) -> Built:
    model = trainers.train_missing_gbdt(split, spec.seed, spec.recipe["iterations"])
    # node visits for one image: the depth of every tree, summed (an upper bound)
    depth = sum(int(tree.nodes["depth"].max()) for trees in model._predictors for tree in trees)
    return _onnx_built(model, True, depth)


def _torch_built(model: Any) -> Built:
    """A trained torch network (DigitsCnn, DigitsMlp) as its ONNX export."""
    from tierserve.tools import torch_trainer  # deferred: only the torch-trained models pay for importing torch

    return Built(
        "onnxruntime",
        "model.onnx",
        torch_to_onnx(model),
        False,
        model.multiply_adds(),
        lambda images: torch_trainer.predict_proba(model, images),
        LIBRARIES + TORCH_LIBRARIES,
    )


def _build_cnn(spec: ModelSpec, split: DigitsSplit, repository: Path) -> Built:
    from tierserve.tools import torch_trainer  # deferred: only the torch-trained models pay for importing torch

    model = torch_trainer.train_cnn(split, spec.seed, torch_trainer.CnnRecipe.from_recipe(spec.recipe))
    return _torch_built(model)


def _build_distilled_mlp(spec: ModelSpec, split: DigitsSplit, repository: Path) -> Built:
    from tierserve.tools import torch_trainer  # deferred: only the torch-trained models pay for importing torch

    recipe = torch_trainer.DistilledMlpRecipe.from_recipe(spec.recipe)
    teacher = load_runner(version_dir(repository, recipe.teacher))
    model = torch_trainer.train_distilled_mlp(
        split, spec.seed, recipe, teacher.infer, recipe.hidden, recipe.temperature, recipe.hard_weight
    )
    return _torch_built(model)


def _build_centroids(spec: ModelSpec, split: DigitsSplit, repository: Path) -> Built:
    runner = trainers.fit_centroids(split)
    return Built("centroids", "centroids.npz", runner.to_bytes(), True, 3 * 64 * NUM_CLASSES, runner.infer)


BUILDERS: dict[str, Callable[[ModelSpec, DigitsSplit, Path], Built]] = {
    "mlp": _build_mlp,
    "distilled_logistic": _build_distilled_logistic,
    "gbdt_missing": _build_gbdt_missing,
    "cnn": _build_cnn,
    "distilled_mlp": _build_distilled_mlp,
    "centroids": _build_centroids,
}


def accuracy(runner: Runner, images: np.ndarray, labels: np.ndarray) -> float:
    return float((runner.infer(images).argmax(axis=1) == labels).mean())


def microseconds_per_sample(runner: Runner, images: np.ndarray, batch: int = 64, repeats: int = 30) -> float:
    """The runner's median time per image for calls of `batch` images, in µs, in this process."""
    sample = images[:batch]
    runner.infer(sample)  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.infer(sample)
        timings.append(time.perf_counter() - start)
    return round(float(np.median(timings)) / len(sample) * 1e6, 3)


def _verify(built: Built, runner: Runner, images: np.ndarray, name: str) -> None:
    expected = built.predict_proba(images)
    served = runner.infer(images)
    worst = float(np.abs(expected - served).max())
    if worst > VERIFY_TOLERANCE:
        raise BuildError(f"{name}: served probabilities differ from the trained model's by {worst:.2e}")


def _is_current(spec: ModelSpec, folder: Path, split: DigitsSplit) -> bool:
    try:
        manifest = Manifest.read(folder)
    except ManifestError:
        return False
    artifact = folder / manifest.artifact
    return (
        manifest.recipe == spec.recipe
        and manifest.seed == spec.seed
        and manifest.split == split.fingerprint()
        and artifact.is_file()
        and hashlib.sha256(artifact.read_bytes()).hexdigest() == manifest.artifact_sha256
    )


def build_model(spec: ModelSpec, split: DigitsSplit, repository: Path) -> Manifest:
    """Train, export, verify and measure one model version, then write its artifact and manifest."""
    folder = version_dir(repository, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    built = BUILDERS[spec.recipe["trainer"]](spec, split, repository)
    artifact = folder / built.artifact
    artifact.write_bytes(built.data)
    runner = runner_for(built.runtime, artifact, built.accepts_missing)

    test_images = [split.test.images]
    metrics: dict[str, float] = {}
    if built.accepts_missing:
        for fraction in MISSING_FRACTIONS:
            masked = mask_pixels(split.test.images, fraction, MISSING_MASK_SEED)
            test_images.append(masked)
            metrics[f"test_accuracy_{round(fraction * 100)}pct_missing"] = accuracy(runner, masked, split.test.labels)
    _verify(built, runner, np.concatenate(test_images), spec.name)

    manifest = Manifest(
        spec.model,
        spec.version,
        built.runtime,
        built.artifact,
        hashlib.sha256(built.data).hexdigest(),
        built.accepts_missing,
        spec.seed,
        spec.recipe,
        split.fingerprint(),
        test_accuracy=accuracy(runner, split.test.images, split.test.labels),
        ops_per_sample=int(built.ops_per_sample),
        us_per_sample=microseconds_per_sample(runner, split.test.images),
        libraries={name: importlib.metadata.version(name) for name in built.libraries},
        metrics=metrics,
    )
    manifest.write(folder)
    return manifest


def build_all(
    repository: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    specs: Sequence[ModelSpec] = MODEL_SPECS,
    progress: ProgressCallback = no_progress,
) -> list[Manifest]:
    """Build every reference model (of `specs`) that is missing or out of date (all of them with `force`), and
    perf_analyzer's input-data files (tools/perf_analyzer.py) where they differ."""
    split = load_split()
    rebuilt: set[str] = set()
    manifests = []
    for done, spec in enumerate(specs):
        progress(done, len(specs))
        folder = version_dir(repository, spec.name)
        stale_teacher = spec.recipe.get("teacher") in rebuilt
        if not force and not stale_teacher and _is_current(spec, folder, split):
            manifests.append(Manifest.read(folder))
            continue
        start = time.perf_counter()
        manifest = build_model(spec, split, repository)
        rebuilt.add(spec.name)
        log(
            f"built {spec.name:<18} test accuracy {manifest.test_accuracy:.4f}  "
            f"{manifest.ops_per_sample:>7} ops/sample  {time.perf_counter() - start:5.1f} s"
        )
        manifests.append(manifest)
    progress(len(specs), len(specs))
    if rebuilt or router_artifacts_missing(repository):
        build_router_artifacts(repository, split, log=log)
    for path in write_input_data_files(repository, split):
        log(f"wrote {path.name:<22} perf_analyzer input data: {len(split.test.images)} held-out test images")
    return manifests
