"""Triton glue for every downstream model: PIXELS [N, 8, 8] in, PROBS [N, 10] out, from the version's runner."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.batching import Rejected, infer_batched
from tierserve.faults import FaultInjector, FaultSpec
from tierserve.runners import load_runner
from tierserve.warmup import WarmUp


class TritonPythonModel:
    """Serves one model version: the runner named in its manifest, one runner call per dynamic batch."""

    def initialize(self, args: dict[str, str]) -> None:
        self.name = f"{args['model_name']}:{args['model_version']}"
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # for the Python backend, model_repository is this model's own folder; a lane (reserved
        # capacity for one tier) serves the artifacts of the model named in its `serves` parameter
        model_dir = Path(args["model_repository"])
        if serves := parameters.get("serves"):
            model_dir = model_dir.parent / serves
        self.runner = load_runner(model_dir / args["model_version"])
        self.warm_up = WarmUp(config)  # Triton's warm-up samples never meet an injected fault
        spec = FaultSpec.from_parameters(parameters)
        self.faults = FaultInjector(spec) if spec.active else None
        if self.faults:
            pb_utils.Logger.log_warn(f"{self.name}: fault injection is on: {spec}")

    def execute(self, requests: list) -> list:
        if not self.warm_up.take() and self.faults:
            time.sleep(self.faults.spec.latency_ms / 1000)
            if failure := self.faults.failure():
                error = pb_utils.TritonError(f"{self.name}: {failure}", pb_utils.TritonError.INTERNAL)
                return [pb_utils.InferenceResponse(error=error) for _ in requests]
        batches = [pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy() for request in requests]
        return [self._response(result) for result in infer_batched(self.runner, batches)]

    def _response(self, result: np.ndarray | Rejected) -> pb_utils.InferenceResponse:
        if isinstance(result, Rejected):
            error = pb_utils.TritonError(f"{self.name}: {result.message}", pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(error=error)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROBS", result)])
