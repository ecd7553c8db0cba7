"""Triton glue for `preprocess`: any image 4x4 to 64x64 -> the native 8x8 IMAGE, for the static ensemble."""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from tierserve.faults import refuse_faults
from tierserve.pixels import infinity_problem
from tierserve.resize import resize_to_native, size_problem


class TritonPythonModel:
    """The first step of `digits_static_light`, the benchmarks' baseline without a router. `digits` resizes in
    its own step; this one shares the code (tierserve.resize). Each request is resized on its own."""

    def initialize(self, args: dict[str, str]) -> None:
        refuse_faults(args["model_name"], json.loads(args["model_config"]))

    def execute(self, requests: list) -> list:
        return [self._preprocess(request) for request in requests]

    @staticmethod
    def _preprocess(request) -> pb_utils.InferenceResponse:
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()
        if problem := size_problem(pixels.shape) or infinity_problem(pixels):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", resize_to_native(pixels))])
