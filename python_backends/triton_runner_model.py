"""Triton glue for every downstream model: PIXELS [N, 8, 8] in, PROBS [N, 10] out, from the version's runner."""

from __future__ import annotations

import hmac
import json
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.batching import Rejected, infer_batched
from tierserve.faults import FaultInjector, FaultSpec
from tierserve.runners import load_runner
from tierserve.server_scratch import LANE_TOKEN_PARAMETER, lane_token, server_scratch, server_secret
from tierserve.warmup import WarmUp


def _error(message: str, code: int) -> pb_utils.InferenceResponse:
    """A response with an error of its own: Triton 2.51's Python backend crashes the whole server (signal 11) when
    one TritonError object is shared by several responses of a batch."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    """Serves one model version: the runner named in its manifest, one runner call per dynamic batch."""

    def initialize(self, args: dict[str, str]) -> None:
        self.name = f"{args['model_name']}:{args['model_version']}"
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # for the Python backend, model_repository is this model's own folder; a lane (reserved
        # capacity for one tier) serves the artifacts of the model named in its `serves` parameter
        model_dir = Path(args["model_repository"])
        self.lane_token: str | None = None  # a lane serves only the router's calls, which carry this token
        if serves := parameters.get("serves"):
            model_dir = model_dir.parent / serves
            self.lane_token = lane_token(server_secret(server_scratch(os.getppid())))
        self.runner = load_runner(model_dir / args["model_version"])
        self.warm_up = WarmUp(config)  # Triton's warm-up samples never meet an injected fault
        spec = FaultSpec.from_parameters(parameters)
        self.faults = FaultInjector(spec) if spec.active else None
        if self.faults:
            pb_utils.Logger.log_warn(f"{self.name}: fault injection is on: {spec}")

    def execute(self, requests: list) -> list:
        if self.warm_up.take():
            return self._infer(requests)
        return self._lane(requests) if self.lane_token else self._serve(requests)

    def _serve(self, requests: list) -> list:
        """Requests that may be served: injected faults first, if any, then one runner call."""
        if self.faults:
            time.sleep(self.faults.spec.latency_ms / 1000)
            if failure := self.faults.failure():
                return [_error(f"{self.name}: {failure}", pb_utils.TritonError.INTERNAL) for _ in requests]
        return self._infer(requests)

    def _infer(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy() for request in requests]
        return [self._response(result) for result in infer_batched(self.runner, batches)]

    def _lane(self, requests: list) -> list:
        """Serve the router's calls; refuse anyone else's (reserved capacity is not for direct callers)."""
        mine = [
            hmac.compare_digest(str(json.loads(r.parameters()).get(LANE_TOKEN_PARAMETER, "")), self.lane_token)
            for r in requests
        ]
        served = iter(self._serve([r for r, ok in zip(requests, mine, strict=True) if ok]) if any(mine) else [])
        refusal = (
            f"{self.name} is capacity reserved for critical rows that digits routes; "
            "call digits, or the shared model it serves"
        )
        return [next(served) if ok else _error(refusal, pb_utils.TritonError.INVALID_ARG) for ok in mine]

    def _response(self, result: np.ndarray | Rejected) -> pb_utils.InferenceResponse:
        if isinstance(result, Rejected):
            return _error(f"{self.name}: {result.message}", pb_utils.TritonError.INVALID_ARG)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROBS", result)])
