"""The torch-trained heavy model: reproducible training, augmentation like the serving path, a faithful export."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tierserve.manifest import Manifest, version_dir
from tierserve.resize import resize_to_native
from tierserve.runners import OnnxRunner, load_runner
from tierserve.tools.build_models import MODEL_SPECS, VERIFY_TOLERANCE
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.onnx_export import torch_to_onnx
from tierserve.tools.torch_trainer import (
    Augmenter,
    CnnRecipe,
    DigitsCnn,
    predict_proba,
    train_cnn,
    train_distilled_mlp,
)
from tierserve.tools.workload import noisy, shifted

CNN_SPEC = next(spec for spec in MODEL_SPECS if spec.recipe["trainer"] == "cnn")
RECIPE = CnnRecipe.from_recipe(CNN_SPEC.recipe)
TINY = dataclasses.replace(RECIPE, channels=(4, 8), hidden=16, epochs=2)  # seconds to train, same code path


@pytest.fixture(scope="module")
def tiny(split: DigitsSplit) -> DigitsCnn:
    return train_cnn(split, seed=5, recipe=TINY)


def test_the_same_seed_trains_the_same_network(split: DigitsSplit, tiny: DigitsCnn):
    again = train_cnn(split, seed=5, recipe=TINY)
    other = train_cnn(split, seed=6, recipe=TINY)
    images = split.test.images[:64]
    np.testing.assert_array_equal(predict_proba(again, images), predict_proba(tiny, images))
    assert not np.allclose(predict_proba(other, images), predict_proba(tiny, images))


def test_training_leaves_torch_settings_as_it_found_them(split: DigitsSplit):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    train_cnn(split, seed=5, recipe=dataclasses.replace(TINY, epochs=1))
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)


def test_the_recipe_round_trips_through_a_manifest_recipe():
    assert RECIPE.channels == tuple(CNN_SPEC.recipe["channels"])
    assert dataclasses.asdict(RECIPE).keys() == CNN_SPEC.recipe.keys() - {"trainer"}


def test_rescale_augmentation_is_what_preprocess_makes_of_an_upscaled_image(split: DigitsSplit):
    augment = Augmenter(dataclasses.replace(RECIPE, rescale_sides=(10, 13, 16)), torch.Generator())
    images = split.test.images[:8]
    for side, matrix in zip((10, 13, 16), augment.rescales, strict=True):
        nearest = np.arange(side) * 8 // side
        upscaled = images[:, nearest][:, :, nearest]  # a client's larger copy of the same digit
        expected = resize_to_native(upscaled)
        np.testing.assert_allclose((matrix @ torch.from_numpy(images) @ matrix.T).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(augment.rescales[2], torch.eye(8), atol=1e-6)  # 2x comes back exactly


def test_augmented_images_stay_valid_and_vary(split: DigitsSplit):
    augment = Augmenter(RECIPE, torch.Generator().manual_seed(0))
    images = torch.from_numpy(split.train.images[:256])
    out = augment(images)
    assert out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 16.0
    changed = (out != images).flatten(1).any(dim=1).float().mean()
    assert 0.5 < changed < 0.95, "most images are perturbed, some are kept as they are"


def test_multiply_adds_count_every_convolution_position_and_dense_weight():
    model = DigitsCnn((32, 64), 128)
    convolutions = 64 * (1 * 32 * 9 + 32 * 32 * 9) + 16 * (32 * 64 * 9 + 64 * 64 * 9)
    assert model.multiply_adds() == convolutions + 256 * 128 + 128 * 10


def test_the_onnx_export_reproduces_the_network_at_any_batch_size(tmp_path: Path, split: DigitsSplit, tiny):
    path = tmp_path / "model.onnx"
    path.write_bytes(torch_to_onnx(tiny))
    assert b"torch_trainer.py" not in path.read_bytes(), "the artifact depends on the network, not the checkout"
    graph = onnx.load(path).graph
    assert ([i.name for i in graph.input], [o.name for o in graph.output]) == (["pixels"], ["probabilities"])
    runner = OnnxRunner(path, accepts_missing=False)
    for count in (1, 7, 64):
        images = split.test.images[:count]
        served = runner.infer(images)
        assert served.shape == (count, 10)
        assert np.abs(served - predict_proba(tiny, images)).max() <= VERIFY_TOLERANCE


def test_heavy_v3_beats_v2_held_out_and_clearly_on_perturbed_images(model_repository: Path, split: DigitsSplit):
    v2, v3 = (Manifest.read(version_dir(model_repository, f"digits_heavy:{v}")) for v in (2, 3))
    assert v3.test_accuracy > v2.test_accuracy
    perturbed = np.concatenate([noisy(split.test.images, 3.0, seed=1), shifted(split.test.images, seed=2, max_shift=1)])
    labels = np.tile(split.test.labels, 2)
    accuracy = {
        v: float(
            (
                load_runner(version_dir(model_repository, f"digits_heavy:{v}")).infer(perturbed).argmax(1) == labels
            ).mean()
        )
        for v in (2, 3)
    }
    assert accuracy[3] >= accuracy[2] + 0.05, accuracy


def test_heavy_v3_manifest_records_torch(model_repository: Path):
    manifest = Manifest.read(version_dir(model_repository, CNN_SPEC.name))
    assert {"torch", "onnxscript", "onnxruntime", "numpy"} <= manifest.libraries.keys()
    assert manifest.libraries["torch"] == torch.__version__


def test_what_serves_models_never_imports_torch():
    """Triton stubs import tierserve (python_backends); building is the only place torch is loaded."""
    backends = Path(__file__).parents[2] / "python_backends"
    modules = sorted(p.stem for p in backends.glob("*.py") if not p.stem.startswith(("triton_", "__")))
    code = "; ".join(
        [
            *(f"import tierserve.{name}" for name in modules),
            "import tierserve.tools.build_models",
            "import sys",
            "assert 'torch' not in sys.modules, 'torch was imported'",
        ]
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_distilled_mlp_follows_its_teacher_reproducibly(split: DigitsSplit):
    """With no weight on the true labels, the student learns what the teacher says, whatever the labels: a teacher
    that always answers 3 makes a student that answers 3. The same seed gives the same student."""

    def always_three(images: np.ndarray) -> np.ndarray:
        probs = np.full((len(images), 10), 0.01, np.float32)
        probs[:, 3] = 0.91
        return probs

    recipe = dataclasses.replace(TINY, epochs=4)
    student = train_distilled_mlp(split, 5, recipe, always_three, hidden=16, hard_weight=0.0)
    again = train_distilled_mlp(split, 5, recipe, always_three, hidden=16, hard_weight=0.0)
    images = split.test.images[:64]
    np.testing.assert_array_equal(predict_proba(again, images), predict_proba(student, images))
    assert (predict_proba(student, images).argmax(axis=1) == 3).all()
    assert student.multiply_adds() == 64 * 16 + 16 * 10
    labelled = train_distilled_mlp(split, 5, recipe, always_three, hidden=16, hard_weight=1.0)
    # 4 short epochs: far from trained, but well above chance (0.1), where the teacher alone would keep it (3s only)
    assert (predict_proba(labelled, images).argmax(axis=1) == split.test.labels[:64]).mean() > 0.2, "labels alone"
