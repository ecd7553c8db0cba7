"""Triton glue for `preprocess`: any image 4x4 to 64x64 -> native 8x8 IMAGE, SOURCE facts [4] and a STAMP."""

from __future__ import annotations

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.pixels import infinity_problem
from tierserve.resize import resize_to_native, size_problem, source_stats


class TritonPythonModel:
    """The first step of the `digits` ensemble; each request is resized on its own (shapes differ)."""

    def execute(self, requests: list) -> list:
        return [self._preprocess(request) for request in requests]

    def _preprocess(self, request) -> pb_utils.InferenceResponse:
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()
        if problem := size_problem(pixels.shape) or infinity_problem(pixels):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("IMAGE", resize_to_native(pixels)),
            pb_utils.Tensor("SOURCE", source_stats(pixels)),
            # the system-wide monotonic clock: the router measures how long the request waited for it
            pb_utils.Tensor("STAMP", np.full((len(pixels), 1), time.monotonic(), np.float64)),
        ])
