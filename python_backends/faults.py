"""Fault injection for drills and tests, configured per model in config.pbtxt `parameters`, off by default.

Switch it on or off on a running server by reloading the model with a config override
(`tierserve fault`). Keys: fault_latency_ms (added to every batch), fault_error_rate (0-1, the share
of batches that fail), fault_hard_failure ("true": every batch fails).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

FAULT_KEYS = ("fault_latency_ms", "fault_error_rate", "fault_hard_failure")


class FaultConfigError(ValueError):
    """A fault parameter is malformed; the message names it."""


@dataclass(frozen=True)
class FaultSpec:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    hard_failure: bool = False

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.error_rate > 0 or self.hard_failure

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> FaultSpec:
        """Read the fault_* keys of a model's parameters (other keys are not ours and are ignored)."""

        def number(key: str, low: float, high: float) -> float:
            raw = parameters.get(key, "0")
            try:
                value = float(raw)
            except ValueError:
                raise FaultConfigError(f"parameter {key} must be a number, got {raw!r}") from None
            if not low <= value <= high:
                raise FaultConfigError(f"parameter {key} must be from {low:g} to {high:g}, got {raw!r}")
            return value

        hard = parameters.get("fault_hard_failure", "false").strip().lower()
        if hard not in ("true", "false"):
            raise FaultConfigError(f"parameter fault_hard_failure must be true or false, got {hard!r}")
        return cls(number("fault_latency_ms", 0, 60_000), number("fault_error_rate", 0, 1), hard == "true")

    def to_parameters(self) -> dict[str, str]:
        return {
            "fault_latency_ms": f"{self.latency_ms:g}",
            "fault_error_rate": f"{self.error_rate:g}",
            "fault_hard_failure": str(self.hard_failure).lower(),
        }


def refuse_faults(model: str, config: Mapping) -> None:
    """For the Python models that run no injector (the router, preprocess, feedback): FaultConfigError when `config`
    (model_config.proto as JSON) has a fault_* parameter, so `tierserve fault` on such a model fails its load, naming
    why, instead of being reported as on while it does nothing."""
    if given := [key for key in FAULT_KEYS if key in config.get("parameters", {})]:
        raise FaultConfigError(
            f"{model} takes no fault injection ({', '.join(given)}): "
            "drills are for the classifier models and their lanes"
        )


class FaultInjector:
    """Decides, per batch, the injected delay and whether the batch fails."""

    def __init__(self, spec: FaultSpec, seed: int = 0) -> None:
        self.spec = spec
        self._random = random.Random(seed)

    def failure(self) -> str | None:
        """Why this batch fails, or None when it is served."""
        if self.spec.hard_failure:
            return "injected fault: hard failure"
        if self.spec.error_rate and self._random.random() < self.spec.error_rate:
            return f"injected fault: error (rate {self.spec.error_rate:g})"
        return None
