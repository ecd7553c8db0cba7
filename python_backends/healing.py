"""Self-healing: recognise a dead Python stub from a call's error, and rate-limit reloads per model.

Triton 2.51 does not restart a crashed stub; the model stays READY and every call fails with
"Stub process '...' is not healthy" until the model is unloaded and loaded again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEAD_STUB_MARKERS = ("is not healthy", "Stub process")


def is_dead_stub(message: str) -> bool:
    """Whether a failed call's message says the model's stub process is gone."""
    return any(marker in message for marker in DEAD_STUB_MARKERS)


class ReloadLimiter:
    """Allows a model's reload at most once per `min_interval_s`."""

    def __init__(self, min_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last: dict[str, float] = {}

    def allow(self, model: str) -> bool:
        now = self._clock()
        if now - self._last.get(model, float("-inf")) < self.min_interval_s:
            return False
        self._last[model] = now
        return True
