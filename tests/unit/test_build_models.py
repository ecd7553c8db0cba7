"""The built reference models meet the accuracy, cost and provenance the project promises."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from tierserve.learned_router import load_learned_routers
from tierserve.manifest import Manifest, version_dir
from tierserve.router_files import LEARNED_ROUTER_FILE, POLICY_FILE, ROUTER_MODEL
from tierserve.tools.build_models import MODEL_SPECS, BuildError, Built, _verify, build_all
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.paths import DEFAULT_REPOSITORY

HEAVY = [spec.name for spec in MODEL_SPECS if spec.model == "digits_heavy"]
LIGHT = [spec.name for spec in MODEL_SPECS if spec.model == "digits_light"]
ESCALATES_TO = "digits_heavy:3"  # the CPU model of the cascade's escalation (policy.yaml)


def _manifest(repository: Path, name: str) -> Manifest:
    return Manifest.read(version_dir(repository, name))


def test_accuracy_ranks_heavy_over_light_over_rules(model_repository: Path):
    heavy = [_manifest(model_repository, name).test_accuracy for name in HEAVY]
    light = [_manifest(model_repository, name).test_accuracy for name in LIGHT]
    escalation_target = _manifest(model_repository, ESCALATES_TO).test_accuracy
    rules = _manifest(model_repository, "digits_rules:1").test_accuracy
    assert min(heavy) >= 0.97
    assert escalation_target > max(light) and min(light) > rules
    assert (
        _manifest(model_repository, "digits_light:2").test_accuracy
        > _manifest(model_repository, "digits_light:1").test_accuracy
    )


def test_the_model_the_cascade_escalates_to_costs_far_more_than_either_light_model(model_repository: Path):
    light = {name: _manifest(model_repository, name).ops_per_sample for name in LIGHT}
    for name in HEAVY:  # every heavy version costs at least ten times the first light model
        assert _manifest(model_repository, name).ops_per_sample >= 10 * light["digits_light:1"]
    assert _manifest(model_repository, ESCALATES_TO).ops_per_sample >= 100 * max(light.values())


def test_missing_pixel_specialist_beats_the_safe_default_on_missing_pixels(model_repository: Path):
    missing = _manifest(model_repository, "digits_missing:1").metrics
    rules = _manifest(model_repository, "digits_rules:1").metrics
    for key in ("test_accuracy_30pct_missing", "test_accuracy_60pct_missing"):
        assert missing[key] > rules[key]


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda spec: spec.name)
def test_manifest_records_provenance(model_repository: Path, split: DigitsSplit, spec):
    manifest = _manifest(model_repository, spec.name)
    artifact = model_repository / spec.model / str(spec.version) / manifest.artifact
    assert manifest.artifact_sha256 == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert manifest.split == split.fingerprint()
    assert (manifest.seed, manifest.recipe) == (spec.seed, spec.recipe)
    assert {"numpy", "scikit-learn", "onnxruntime"} <= manifest.libraries.keys()
    assert manifest.us_per_sample > 0


def test_a_current_repository_is_reused_not_rebuilt(model_repository: Path):
    rebuilt: list[str] = []
    build_all(model_repository, log=rebuilt.append)
    assert rebuilt == []


def test_a_stale_model_and_what_was_learned_from_it_are_rebuilt(tmp_path: Path):
    # nothing learns from the CNN but digits_light:2; this repository's cascade starts with digits_light:1
    specs = [spec for spec in MODEL_SPECS if "digits_heavy:3" not in (spec.name, spec.recipe.get("teacher"))]
    shipped = (DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE).read_text()
    policy = yaml.safe_load(shipped.replace("experiment_models: [digits_light:1, ", "experiment_models: ["))
    policy = yaml.safe_load(
        yaml.safe_dump(policy)
        .replace("digits_light:2", "digits_light:1")
        .replace("digits_light_critical:2", "digits_light_critical:1")
    )
    (tmp_path / ROUTER_MODEL).mkdir()
    (tmp_path / ROUTER_MODEL / POLICY_FILE).write_text(yaml.safe_dump(policy))
    build_all(tmp_path, log=lambda line: None, specs=specs)
    teacher = tmp_path / "digits_heavy" / "2" / "model.onnx"
    teacher.write_bytes(teacher.read_bytes() + b"\0")  # tampered: its hash no longer matches
    rebuilt: list[str] = []
    build_all(tmp_path, log=rebuilt.append, specs=specs)
    assert [line.split()[1] for line in rebuilt] == ["digits_heavy:2", "digits_light:1", "router:1"]
    assert "digits_light:1 wrong on" in rebuilt[-1], "the learned router judges the cascade's first model"


def test_a_learned_router_is_built_for_the_cascades_first_model_and_each_other_version_experiments_may_use(
    model_repository: Path,
):
    learned, alternates = load_learned_routers(model_repository / ROUTER_MODEL / "1" / LEARNED_ROUTER_FILE)
    assert (learned.judges, [a.judges for a in alternates]) == ("digits_light:2", ["digits_light:1"])


def test_verification_fails_when_the_served_artifact_disagrees_with_the_trainer():
    class Constant:
        accepts_missing = True

        def infer(self, pixels: np.ndarray) -> np.ndarray:
            return np.full((len(pixels), 10), 0.1, np.float32)

    built = Built("centroids", "x.npz", b"", True, 1, lambda images: np.eye(10)[np.zeros(len(images), int)])
    with pytest.raises(BuildError, match="digits_x:1: served probabilities differ"):
        _verify(built, Constant(), np.zeros((3, 8, 8), np.float32), "digits_x:1")
