"""The inputs of the TensorRT variant of the heavy model (docker/build_trt_plan.sh builds its engine on a GPU).

TensorRT serves a plan natively, with no Python stub to adapt tensors, so the engine must already speak the
router's contract: `PIXELS` [N, 8, 8] in, `PROBS` [N, 10] out. This module writes that ONNX from the served
ONNX of SOURCE (a Reshape in front, the output renamed), the trtexec shape flags and the version's manifest,
all from the model's config.pbtxt, which is kept outside model_repository/ because a CPU host cannot load it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, compose, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from tierserve.manifest import Manifest, version_dir
from tierserve.tools.paths import DEFAULT_REPOSITORY, PROJECT_ROOT

SOURCE = "digits_heavy:3"  # the served ONNX the engine is built from
MODEL, VERSION = "digits_heavy_trt", 1
CONFIG = PROJECT_ROOT / "docker" / "gpu_models" / MODEL / "config.pbtxt"
SOURCE_OUTPUT = "probabilities"  # the runner convention of tools/onnx_export.py
OPT_BATCH = 16  # the batch TensorRT tunes its kernels for; min is 1, max the config's max_batch_size
VERIFY_TOLERANCE = 1e-6  # a Reshape and a rename change no arithmetic
_FLAT = "tensorrt_flat_pixels"
_BATCH = "batch"
# trtexec's summary of its timing run, e.g. "GPU Compute Time: min = 0.02 ms, max = 0.05 ms, mean = 0.03 ms"
_GPU_TIME = re.compile(r"GPU Compute Time: min = [\d.]+ ms, max = [\d.]+ ms, mean = ([\d.]+) ms")


def read_config(path: Path = CONFIG) -> mc.ModelConfig:
    """The TensorRT model's config.pbtxt, parsed with Triton's own protobuf."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def tensorrt_onnx(source: onnx.ModelProto, config: mc.ModelConfig) -> onnx.ModelProto:
    """`source` (flat pixels [N, 64] in, `probabilities` [N, 10] out) behind the config's input and output names
    and shapes, with a dynamic batch dimension; same opsets and IR version as `source`."""
    (pixels,) = config.input
    (probs,) = config.output
    (source_input,) = source.graph.input
    flat_size = math.prod(pixels.dims)
    source_shape = [d.dim_value for d in source_input.type.tensor_type.shape.dim[1:]]
    if source_shape != [flat_size]:
        raise ValueError(f"{SOURCE}: input {source_input.name} takes {source_shape} per image, expected [{flat_size}]")

    def part(name: str, nodes: list, inputs: list, outputs: list, initializer: Sequence = ()) -> onnx.ModelProto:
        graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializer)
        return helper.make_model(graph, opset_imports=source.opset_import, ir_version=source.ir_version)

    flatten = part(
        "flatten",
        [helper.make_node("Reshape", [pixels.name, "tensorrt_flat_shape"], [_FLAT])],
        [helper.make_tensor_value_info(pixels.name, TensorProto.FLOAT, [_BATCH, *pixels.dims])],
        [helper.make_tensor_value_info(_FLAT, TensorProto.FLOAT, [_BATCH, flat_size])],
        [numpy_helper.from_array(np.array([-1, flat_size], dtype=np.int64), "tensorrt_flat_shape")],
    )
    rename = part(
        "rename",
        [helper.make_node("Identity", [SOURCE_OUTPUT], [probs.name])],
        [helper.make_tensor_value_info(SOURCE_OUTPUT, TensorProto.FLOAT, [_BATCH, *probs.dims])],
        [helper.make_tensor_value_info(probs.name, TensorProto.FLOAT, [_BATCH, *probs.dims])],
    )
    merged = compose.merge_models(flatten, source, io_map=[(_FLAT, source_input.name)], outputs=[SOURCE_OUTPUT])
    model = compose.merge_models(merged, rename, io_map=[(SOURCE_OUTPUT, SOURCE_OUTPUT)], outputs=[probs.name])
    del model.opset_import[:]  # merge_models concatenates the parts' (equal) opset lists
    model.opset_import.extend(source.opset_import)
    model.graph.name = config.name
    model.producer_name, model.doc_string = "tierserve.tools.trt_onnx", f"{SOURCE} for TensorRT"
    onnx.checker.check_model(model, full_check=True)
    return model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source(repository: Path) -> tuple[Path, Manifest]:
    """The source ONNX and its manifest; refused when the file is not the one the manifest describes."""
    folder = version_dir(repository, SOURCE)
    manifest = Manifest.read(folder)
    artifact = folder / manifest.artifact
    if sha256(artifact) != manifest.artifact_sha256:
        raise ValueError(f"{artifact} does not match its manifest's sha256: rebuild with `tierserve build`")
    return artifact, manifest


def write_onnx(repository: Path, out: Path, config: mc.ModelConfig) -> None:
    """Write the TensorRT ONNX of SOURCE to `out`, after checking with ONNX Runtime that it gives the source's
    probabilities on the test split (as build_models checks every artifact before it is served)."""
    import onnxruntime as ort  # deferred, with the dataset's scikit-learn: `shapes` and `manifest` do not need them

    from tierserve.tools.dataset import load_split

    artifact, _ = _source(repository)
    model = tensorrt_onnx(onnx.load(artifact), config)
    images = load_split().test.images
    cpu = ["CPUExecutionProvider"]
    (expected,) = ort.InferenceSession(str(artifact), providers=cpu).run(
        [SOURCE_OUTPUT], {"pixels": images.reshape(len(images), -1)}
    )
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=cpu).run(None, {config.input[0].name: images})
    if (diff := float(np.abs(got - expected).max())) > VERIFY_TOLERANCE:
        raise ValueError(f"the TensorRT ONNX of {SOURCE} differs from it by {diff:g} on the test split")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)


def shape_flags(config: mc.ModelConfig, opt_batch: int = OPT_BATCH) -> list[str]:
    """trtexec's optimization profile (batch 1, `opt_batch` and the config's max_batch_size), then the shape of
    its timing run after the build: max_batch_size, which tensorrt_manifest divides the GPU time by."""
    (pixels,) = config.input
    dims = "x".join(str(d) for d in pixels.dims)
    batches = {"minShapes": 1, "optShapes": opt_batch, "maxShapes": config.max_batch_size}
    batches["shapes"] = config.max_batch_size
    return [f"--{flag}={pixels.name}:{batch}x{dims}" for flag, batch in batches.items()]


def tensorrt_manifest(
    repository: Path,
    plan: Path,
    onnx_path: Path,
    *,
    gpu: str,
    tensorrt: str,
    precision: str,
    trtexec_log: str,
    config: mc.ModelConfig,
) -> Manifest:
    """The manifest of the engine `plan`, built from `onnx_path` (the TensorRT ONNX of SOURCE) on `gpu`.

    Accuracy and multiply-adds are SOURCE's (the recipe says so); us_per_sample is trtexec's mean GPU compute
    time per image at max_batch_size on `gpu`, NaN where its log has none."""
    artifact, source = _source(repository)
    timing = _GPU_TIME.search(trtexec_log)
    return Manifest(
        MODEL,
        VERSION,
        runtime="tensorrt",
        artifact=plan.name,
        artifact_sha256=sha256(plan),
        accepts_missing=source.accepts_missing,
        seed=source.seed,
        recipe={
            "trainer": "tensorrt",
            "source": SOURCE,
            "source_sha256": sha256(artifact),
            "onnx_sha256": sha256(onnx_path),
            "precision": precision,
            "gpu": gpu,
            "batch": [1, OPT_BATCH, config.max_batch_size],
            "accuracy_of": SOURCE,
        },
        split=source.split,
        test_accuracy=source.test_accuracy,
        ops_per_sample=source.ops_per_sample,
        us_per_sample=float(timing.group(1)) * 1000 / config.max_batch_size if timing else math.nan,
        libraries={"tensorrt": tensorrt, "onnx": onnx.__version__},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tierserve.tools.trt_onnx", description=__doc__)
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="where SOURCE is built")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the TensorRT model's config.pbtxt")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("onnx", help=f"write the TensorRT ONNX of {SOURCE}")
    write.add_argument("out", type=Path)
    commands.add_parser("shapes", help="print trtexec's --minShapes/--optShapes/--maxShapes, one a line")
    manifest = commands.add_parser("manifest", help="write manifest.json beside a built plan")
    manifest.add_argument("plan", type=Path)
    manifest.add_argument("--onnx", type=Path, required=True, help="the TensorRT ONNX the plan was built from")
    manifest.add_argument("--gpu", required=True)
    manifest.add_argument("--tensorrt", required=True, help="TensorRT version")
    manifest.add_argument("--precision", choices=("fp32", "fp16"), required=True)
    manifest.add_argument("--trtexec-log", type=Path, required=True)
    args = parser.parse_args(argv)
    config = read_config(args.config)
    if args.command == "onnx":
        write_onnx(args.repository, args.out, config)
    elif args.command == "shapes":
        print("\n".join(shape_flags(config)))
    else:
        tensorrt_manifest(
            args.repository,
            args.plan,
            args.onnx,
            gpu=args.gpu,
            tensorrt=args.tensorrt,
            precision=args.precision,
            trtexec_log=args.trtexec_log.read_text(errors="replace"),
            config=config,
        ).write(args.plan.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
