"""Triton's model warm-up, as a model's execute sees it.

Triton runs each `model_warmup` sample of a model's config through every instance's execute before the
model is READY, and no client request reaches a model before it is READY. So the first executes of an
instance, as many as the samples' counts add up to, are warm-up: they must not meet injected faults
(the load would fail) or move shared state such as the router's load gauge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class WarmUp:
    """Counts down the warm-up executes of one model instance."""

    def __init__(self, model_config: Mapping[str, Any]) -> None:
        # model_config.proto: a sample runs `count` times; 0 (the default) means once
        self.left = sum(max(int(sample.get("count", 0)), 1) for sample in model_config.get("model_warmup", []))

    def take(self) -> bool:
        """Call once per execute: True while the executes are Triton's warm-up samples."""
        if self.left > 0:
            self.left -= 1
            return True
        return False
