"""Triton glue for every downstream model: PIXELS [N, 8, 8] in, PROBS [N, 10] out, from the version's runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.batching import Rejected, infer_batched
from tierserve.runners import load_runner


class TritonPythonModel:
    """Serves one model version: the runner named in its manifest, one runner call per dynamic batch."""

    def initialize(self, args: dict[str, str]) -> None:
        self.name = f"{args['model_name']}:{args['model_version']}"
        # for the Python backend, model_repository is this model's own folder
        self.runner = load_runner(Path(args["model_repository"]) / args["model_version"])

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy() for request in requests]
        return [self._response(result) for result in infer_batched(self.runner, batches)]

    def _response(self, result: np.ndarray | Rejected) -> pb_utils.InferenceResponse:
        if isinstance(result, Rejected):
            error = pb_utils.TritonError(f"{self.name}: {result.message}", pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(error=error)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROBS", result)])
