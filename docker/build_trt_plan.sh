#!/usr/bin/env bash
# Builds digits_heavy_trt:1, the TensorRT engine of digits_heavy:3, into a model repository: run inside NVIDIA's
# Triton container at start (docker/entrypoint.sh), before tritonserver loads the repository.
#   docker/build_trt_plan.sh [--fp16] [REPOSITORY]    (default: the model_repository/ beside docker/)
# An engine only runs on the GPU model and TensorRT version it was built with, so it is built where it runs and
# cached in $TIERSERVE_TRT_CACHE under a key of both (and of the ONNX and precision); a cached engine is reused.
# Without a GPU it builds nothing and removes any digits_heavy_trt from the repository: a CPU host cannot load a
# plan, and the router then serves digits_heavy:3 on ONNX Runtime. Exits non-zero, leaving no digits_heavy_trt
# behind, when a GPU is visible but the engine could not be built.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
precision=fp32
if [[ ${1:-} == --fp16 ]]; then
  precision=fp16
  shift
fi
repository=${1:-$here/../model_repository}
cache=${TIERSERVE_TRT_CACHE:-$here/../.tierserve/tensorrt}
python=${PYTHON:-python3}
model=digits_heavy_trt
config=$here/gpu_models/$model/config.pbtxt
target=$repository/$model
say() { echo "build_trt_plan: $*" >&2; }
trt_onnx() { "$python" -m tierserve.tools.trt_onnx --repository "$repository" --config "$config" "$@"; }

if ! gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader --id=0 2>/dev/null) || [[ -z $gpu ]]; then
  rm -rf "$target"
  say "no GPU visible to nvidia-smi: $model not built; the router serves digits_heavy:3 on ONNX Runtime (CPU)"
  exit 0
fi

work=$(mktemp -d)
# on any failure, no half-installed model is left for tritonserver to refuse
trap 'status=$?; rm -rf "$work"; if ((status)); then rm -rf "$target"; fi' EXIT

trtexec=${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}
if [[ ! -x $trtexec ]]; then
  say "a GPU ($gpu) is visible but there is no trtexec at $trtexec: $model not built"
  exit 1
fi
# NGC images set TRT_VERSION; otherwise trtexec's banner says "[TensorRT v101400]"
tensorrt=${TRT_VERSION:-$({ "$trtexec" --help 2>&1 || true; } | grep -o -m 1 'TensorRT v[0-9]*' | cut -c 11-)}
if [[ -z $tensorrt ]]; then
  say "cannot tell TensorRT's version (no \$TRT_VERSION, no banner from $trtexec): $model not built"
  exit 1
fi

trt_onnx onnx "$work/model.onnx"
onnx_sha=$(sha256sum "$work/model.onnx" | cut -c 1-16)
key=$(printf '%s' "$gpu" | tr -c 'A-Za-z0-9._-' '_')_trt$tensorrt-${precision}_onnx$onnx_sha
entry=$cache/$key

if [[ -f $entry/model.plan && -f $entry/manifest.json ]]; then
  say "reusing the engine built for $gpu with TensorRT $tensorrt ($entry)"
else
  say "building the $precision engine for $gpu with TensorRT $tensorrt (a minute or so)"
  mapfile -t shapes < <(trt_onnx shapes)
  # fp32 means fp32: TF32, TensorRT's default for convolutions on Ampere and later, is turned off
  if [[ $precision == fp16 ]]; then precision_flags=(--fp16); else precision_flags=(--noTF32); fi
  # after building, trtexec runs the engine at the timing shape: a plan that cannot run here fails the build
  if ! "$trtexec" --onnx="$work/model.onnx" --saveEngine="$work/model.plan" "${shapes[@]}" "${precision_flags[@]}" \
    >"$work/trtexec.log" 2>&1; then
    tail -n 30 "$work/trtexec.log" >&2
    say "trtexec failed (its last lines above): $model not built"
    exit 1
  fi
  trt_onnx manifest "$work/model.plan" --onnx "$work/model.onnx" --gpu "$gpu" --tensorrt "$tensorrt" \
    --precision "$precision" --trtexec-log "$work/trtexec.log"
  mkdir -p "$cache"
  staged=$(mktemp -d "$cache/.staging.XXXXXX")
  cp "$work/model.plan" "$work/manifest.json" "$staged/"
  rm -rf "$entry"
  mv "$staged" "$entry"
fi

rm -rf "$target"
mkdir -p "$target/1"
cp "$entry/model.plan" "$entry/manifest.json" "$target/1/"
cp "$config" "$target/config.pbtxt"
say "installed $target (TensorRT $tensorrt, $precision, $gpu)"
