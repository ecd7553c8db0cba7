#!/usr/bin/env bash
# The container's start, after NVIDIA's own entrypoint: build the TensorRT engine of the heavy model where a GPU
# is visible (docker/build_trt_plan.sh; TIERSERVE_TRT_FP16=1 builds it in FP16), then run the command, by
# default the image's CMD (`tierserve serve`). A failed build is reported and serving goes on without it.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
flags=()
if [[ ${TIERSERVE_TRT_FP16:-0} == 1 ]]; then flags=(--fp16); fi
if ! "$here/build_trt_plan.sh" "${flags[@]}" "$here/../model_repository"; then
  echo "entrypoint: digits_heavy_trt not built (see above); the router serves digits_heavy:3 on CPU" >&2
fi
exec "$@"
