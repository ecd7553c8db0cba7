"""Triton glue for `preprocess`: any image 4x4 to 64x64 -> native 8x8 IMAGE, SOURCE facts [4] and a STAMP."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.load_board import LoadBoard, Posted, server_scratch
from tierserve.load_shedding import shed_message
from tierserve.pixels import infinity_problem
from tierserve.resize import resize_to_native, size_problem, source_stats
from tierserve.seal import seal_rows, server_secret


class TritonPythonModel:
    """The first step of the `digits` ensemble; each request is resized on its own (shapes differ). A request
    of a tier the router is shedding (tierserve.load_board) is refused here, before any work."""

    def initialize(self, args: dict[str, str]) -> None:
        scratch = server_scratch(os.getppid())  # shared by this server's stubs (their parent is tritonserver)
        self.board = LoadBoard(scratch)
        self.secret = server_secret(scratch)

    def execute(self, requests: list) -> list:
        # The earliest moment tierserve sees a request: deadlines and SLO latencies count from here. (Triton
        # 2.51 tells a Python model nothing of when the request arrived, so the wait for this step is outside.)
        received = time.monotonic()
        posted = self.board.read(received)  # once per execute; tiers are read only while shedding
        return [
            (posted.level and self._shed(request, posted)) or self._preprocess(request, received)
            for request in requests
        ]

    @staticmethod
    def _shed(request, posted: Posted) -> pb_utils.InferenceResponse | None:
        tier = json.loads(request.parameters()).get("tier")  # a malformed tier is the router's to refuse
        if isinstance(tier, str) and (why := posted.reason(tier)):
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(shed_message(tier, why), pb_utils.TritonError.UNAVAILABLE)
            )
        return None

    def _preprocess(self, request, received: float) -> pb_utils.InferenceResponse:
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()
        if problem := size_problem(pixels.shape) or infinity_problem(pixels):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG))
        image, source = resize_to_native(pixels), source_stats(pixels)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("IMAGE", image),
                pb_utils.Tensor("SOURCE", source),
                # the system-wide monotonic clock: the router counts budgets and its queue wait from it
                pb_utils.Tensor("STAMP", np.full((len(pixels), 1), received, np.float64)),
                # only rows sealed here pass the router: a direct caller cannot forge a stamp, facts or pixels
                pb_utils.Tensor(
                    "SEAL",
                    np.array([[seal] for seal in seal_rows(self.secret, received, source, image)], dtype=np.object_),
                ),
            ]
        )
