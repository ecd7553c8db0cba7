"""Every downstream model's config.pbtxt keeps the shared contract; parsed with Triton's own protobuf."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tierserve.tools.build_models import MODEL_SPECS
from tierserve.tools.paths import DEFAULT_REPOSITORY

MODELS = sorted({spec.model for spec in MODEL_SPECS})


def _config(model: str) -> mc.ModelConfig:
    return text_format.Parse((DEFAULT_REPOSITORY / model / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.mark.parametrize("model", MODELS)
def test_config_keeps_the_pixels_to_probs_contract(model: str):
    config = _config(model)
    assert config.name == model and config.backend == "python"
    assert config.max_batch_size >= 64
    (pixels,) = config.input
    (probs,) = config.output
    assert (pixels.name, pixels.data_type, list(pixels.dims)) == ("PIXELS", mc.TYPE_FP32, [8, 8])
    assert (probs.name, probs.data_type, list(probs.dims)) == ("PROBS", mc.TYPE_FP32, [10])
    assert config.HasField("dynamic_batching")
    assert [group.kind for group in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]


@pytest.mark.parametrize("model", MODELS)
def test_every_built_version_is_served_and_has_its_shim(model: str):
    built = sorted(spec.version for spec in MODEL_SPECS if spec.model == model)
    policy = _config(model).version_policy
    served = sorted(policy.specific.versions) if policy.HasField("specific") else built[-1:]
    assert served == built
    for version in built:
        shim = DEFAULT_REPOSITORY / model / str(version) / "model.py"
        assert "tierserve.triton_runner_model import TritonPythonModel" in shim.read_text()


def test_shims_are_thin():
    for shim in DEFAULT_REPOSITORY.glob("*/*/model.py"):
        assert len(shim.read_text().splitlines()) <= 10, f"{shim} should only import the shared model"


def test_every_model_has_a_version_folder_that_git_can_keep():
    """Ensembles have no files in their version folder; an empty folder is lost in a clone."""
    for config in DEFAULT_REPOSITORY.glob("*/config.pbtxt"):
        versions = [v for v in config.parent.iterdir() if v.is_dir() and v.name.isdigit()]
        assert versions, f"{config.parent.name} has no version folder"
        for version in versions:
            assert any(p.name != "__pycache__" for p in version.iterdir()), (
                f"{version} is empty: git will not keep it (add a .gitkeep)"
            )


def test_lanes_serve_built_models_with_the_same_contract():
    """A lane reuses another model's artifacts: it must name a built model, version and contract."""
    lanes = [c for c in DEFAULT_REPOSITORY.glob("*/config.pbtxt") if "serves" in _config(c.parent.name).parameters]
    assert lanes, "the shipped repository reserves lanes"
    for path in lanes:
        lane = _config(path.parent.name)
        served = _config(lane.parameters["serves"].string_value)
        assert served.name in MODELS
        assert [(t.name, t.data_type, list(t.dims)) for t in lane.input] == [
            (t.name, t.data_type, list(t.dims)) for t in served.input
        ]
        assert [(t.name, t.data_type, list(t.dims)) for t in lane.output] == [
            (t.name, t.data_type, list(t.dims)) for t in served.output
        ]
        versions = sorted(int(v.name) for v in path.parent.iterdir() if v.is_dir() and v.name.isdigit())
        built = sorted(spec.version for spec in MODEL_SPECS if spec.model == served.name)
        assert set(versions) <= set(built)
