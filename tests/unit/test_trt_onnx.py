"""The TensorRT variant of the heavy model, checked where TensorRT is not: its ONNX against the source with ONNX
Runtime, its config.pbtxt with Triton's protobuf, and docker/build_trt_plan.sh with stand-ins for nvidia-smi and
trtexec. Whether a real engine builds and serves is checked nowhere here (docker/README.md says so)."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tierserve.manifest import Manifest, version_dir
from tierserve.tools import trt_onnx
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.paths import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
BUILD_SCRIPT = DOCKER / "build_trt_plan.sh"
ENTRYPOINT = DOCKER / "entrypoint.sh"
GPU = "NVIDIA H100 80GB HBM3"
FAKE_NVIDIA_SMI = f"#!/bin/sh\necho '{GPU}'\n"
NO_GPU_NVIDIA_SMI = "#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n"
# records its arguments, writes an engine, prints the banner and timing summary lines the real one prints
FAKE_TRTEXEC = """#!/bin/sh
echo "$@" >> "$TRTEXEC_CALLS"
echo '&&&& RUNNING TensorRT.trtexec [TensorRT v101400] # trtexec'
[ -n "$TRTEXEC_FAIL" ] && { echo 'Error: parsing failed'; exit 1; }
for arg; do case "$arg" in --saveEngine=*) echo 'an engine' > "${arg#--saveEngine=}";; esac; done
echo '[I] GPU Compute Time: min = 0.01 ms, max = 0.05 ms, mean = 0.032 ms, median = 0.03 ms'
"""


@pytest.fixture(scope="module")
def config() -> mc.ModelConfig:
    return trt_onnx.read_config()


@pytest.fixture(scope="module")
def source_dir(model_repository: Path) -> Path:
    return version_dir(model_repository, trt_onnx.SOURCE)


@pytest.fixture(scope="module")
def trt_model(source_dir: Path, config: mc.ModelConfig) -> onnx.ModelProto:
    return trt_onnx.tensorrt_onnx(onnx.load(source_dir / "model.onnx"), config)


def test_tensorrt_onnx_gives_the_source_probabilities_at_any_batch(
    trt_model: onnx.ModelProto, source_dir: Path, split: DigitsSplit
):
    images, labels = split.test.images, split.test.labels
    source = ort.InferenceSession(str(source_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    trt = ort.InferenceSession(trt_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images[:64], images):
        (expected,) = source.run(["probabilities"], {"pixels": batch.reshape(len(batch), 64)})
        (got,) = trt.run(["PROBS"], {"PIXELS": batch})
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # the manifest takes the source's accuracy as the engine's: the graph must keep it exactly
    assert np.mean(got.argmax(axis=1) == labels) == Manifest.read(source_dir).test_accuracy


def test_tensorrt_onnx_keeps_the_source_opsets(trt_model: onnx.ModelProto, source_dir: Path):
    source = onnx.load(source_dir / "model.onnx")
    assert list(trt_model.opset_import) == list(source.opset_import)
    assert trt_model.ir_version == source.ir_version


def _io(value: onnx.ValueInfoProto) -> tuple[str, int, list[int], bool]:
    """(name, element type, dims after the batch, whether the batch dimension is dynamic)."""
    batch, *dims = value.type.tensor_type.shape.dim
    return value.name, value.type.tensor_type.elem_type, [d.dim_value for d in dims], bool(batch.dim_param)


def test_config_and_onnx_agree(config: mc.ModelConfig, trt_model: onnx.ModelProto):
    assert (config.name, config.platform, config.backend) == (trt_onnx.MODEL, "tensorrt_plan", "tensorrt")
    assert list(config.version_policy.specific.versions) == [trt_onnx.VERSION]
    (pixels,), (probs,) = config.input, config.output
    (onnx_in,), (onnx_out,) = trt_model.graph.input, trt_model.graph.output
    assert pixels.data_type == probs.data_type == mc.TYPE_FP32
    assert _io(onnx_in) == (pixels.name, onnx.TensorProto.FLOAT, list(pixels.dims), True)
    assert _io(onnx_out) == (probs.name, onnx.TensorProto.FLOAT, list(probs.dims), True)
    assert [group.kind for group in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert config.HasField("dynamic_batching")
    (warmup,) = config.model_warmup
    assert {name: list(data.dims) for name, data in warmup.inputs.items()} == {pixels.name: list(pixels.dims)}
    assert trt_onnx.shape_flags(config) == [
        "--minShapes=PIXELS:1x8x8",
        "--optShapes=PIXELS:16x8x8",
        "--maxShapes=PIXELS:64x8x8",
        "--shapes=PIXELS:64x8x8",
    ]


def test_config_keeps_the_contract_of_its_cpu_fallback(config: mc.ModelConfig, model_repository: Path):
    """The router calls digits_heavy_trt and digits_heavy alike; only a CPU host lacks the first."""
    heavy = model_repository / trt_onnx.SOURCE.split(":")[0] / "config.pbtxt"
    fallback = text_format.Parse(heavy.read_text(), mc.ModelConfig())
    assert (list(config.input), list(config.output)) == (list(fallback.input), list(fallback.output))
    assert config.max_batch_size == fallback.max_batch_size
    assert not (model_repository / trt_onnx.MODEL).exists(), "a CPU host cannot load a plan: keep it in docker/"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def repository(source_dir: Path, tmp_path: Path) -> Path:
    """A repository holding only the source version (what the script reads) and no TensorRT model."""
    shutil.copytree(source_dir, tmp_path / "repository" / source_dir.parent.name / source_dir.name)
    return tmp_path / "repository"


def test_manifest_names_the_source_and_refuses_a_stale_one(repository: Path, config: mc.ModelConfig, tmp_path: Path):
    plan, onnx_path = tmp_path / "model.plan", tmp_path / "model.onnx"
    plan.write_bytes(b"an engine")
    onnx_path.write_bytes(b"an onnx")
    options = {"gpu": GPU, "tensorrt": "10.14", "precision": "fp32", "trtexec_log": "no timing", "config": config}
    manifest = trt_onnx.tensorrt_manifest(repository, plan, onnx_path, **options)
    source = version_dir(repository, trt_onnx.SOURCE)
    assert manifest.recipe["source_sha256"] == _sha256(source / "model.onnx") == Manifest.read(source).artifact_sha256
    assert (manifest.artifact, manifest.artifact_sha256, manifest.runtime) == ("model.plan", _sha256(plan), "tensorrt")
    assert manifest.accepts_missing is False
    assert math.isnan(manifest.us_per_sample)  # unmeasured, not zero

    (source / "model.onnx").write_bytes(b"another network")
    with pytest.raises(ValueError, match="does not match its manifest"):
        trt_onnx.tensorrt_manifest(repository, plan, onnx_path, **options)


def _run(script: Path, *args: str, nvidia_smi: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("nvidia-smi", nvidia_smi), ("trtexec", FAKE_TRTEXEC)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k != "TRT_VERSION"}
    environment |= {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "TIERSERVE_TRT_CACHE": str(tmp_path / "cache"),
        "TRTEXEC_CALLS": str(tmp_path / "trtexec_calls"),
        **env,
    }
    return subprocess.run(["bash", str(script), *args], env=environment, capture_output=True, text=True, timeout=120)


def _builds(tmp_path: Path) -> list[str]:
    """The command lines of the fake trtexec's engine builds (the script also asks it for its version)."""
    calls = tmp_path / "trtexec_calls"
    return [line for line in calls.read_text().splitlines() if "--saveEngine=" in line] if calls.exists() else []


def test_build_script_builds_once_per_gpu_and_installs_the_model(
    repository: Path, config: mc.ModelConfig, tmp_path: Path
):
    built = _run(BUILD_SCRIPT, str(repository), nvidia_smi=FAKE_NVIDIA_SMI, tmp_path=tmp_path)
    assert built.returncode == 0, built.stderr
    target = repository / trt_onnx.MODEL
    assert (target / "config.pbtxt").read_text() == trt_onnx.CONFIG.read_text()
    manifest = Manifest.read(target / str(trt_onnx.VERSION))
    assert manifest.artifact_sha256 == _sha256(target / "1" / "model.plan")
    assert manifest.recipe["gpu"] == GPU and manifest.recipe["precision"] == "fp32"
    assert manifest.libraries["tensorrt"] == "101400"  # from trtexec's banner where $TRT_VERSION is unset
    assert manifest.us_per_sample == pytest.approx(0.032 * 1000 / 64)
    trt_onnx.write_onnx(repository, tmp_path / "expected.onnx", config)
    assert manifest.recipe["onnx_sha256"] == _sha256(tmp_path / "expected.onnx")
    (call,) = _builds(tmp_path)
    assert all(flag in call.split() for flag in [*trt_onnx.shape_flags(config), "--noTF32"])

    again = _run(BUILD_SCRIPT, str(repository), nvidia_smi=FAKE_NVIDIA_SMI, tmp_path=tmp_path)
    assert again.returncode == 0 and "reusing" in again.stderr
    assert len(_builds(tmp_path)) == 1  # the cached engine of this GPU and TensorRT was installed, not rebuilt

    fp16 = _run(BUILD_SCRIPT, "--fp16", str(repository), nvidia_smi=FAKE_NVIDIA_SMI, tmp_path=tmp_path)
    assert fp16.returncode == 0, fp16.stderr
    assert "--fp16" in _builds(tmp_path)[-1].split() and len(_builds(tmp_path)) == 2
    assert Manifest.read(target / "1").recipe["precision"] == "fp16"

    cpu = _run(BUILD_SCRIPT, str(repository), nvidia_smi=NO_GPU_NVIDIA_SMI, tmp_path=tmp_path)
    assert cpu.returncode == 0 and "no GPU" in cpu.stderr
    assert not target.exists(), "a CPU host must not keep a plan Triton cannot load"


def test_a_failed_build_leaves_no_model_and_serving_goes_on(repository: Path, tmp_path: Path):
    failed = _run(BUILD_SCRIPT, str(repository), nvidia_smi=FAKE_NVIDIA_SMI, tmp_path=tmp_path, TRTEXEC_FAIL="1")
    assert failed.returncode != 0 and "trtexec failed" in failed.stderr
    assert not (repository / trt_onnx.MODEL).exists()
    assert not list((tmp_path / "cache").glob("*")), "nothing half-built is cached"

    # the entrypoint builds into the project's repository, which has no digits_heavy_trt to lose (tested above)
    for nvidia_smi, env in ((NO_GPU_NVIDIA_SMI, {}), (FAKE_NVIDIA_SMI, {"TRTEXEC_FAIL": "1"})):
        started = _run(ENTRYPOINT, "echo", "serving", nvidia_smi=nvidia_smi, tmp_path=tmp_path, **env)
        assert (started.returncode, started.stdout) == (0, "serving\n"), started.stderr


@pytest.mark.parametrize("script", sorted(DOCKER.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script: Path):
    assert os.access(script, os.X_OK), f"{script} must be executable: the Dockerfile runs it directly"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shellcheck := shutil.which("shellcheck"):
        result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
