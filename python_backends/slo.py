"""Per-tier service level objectives: latency SLO, target, and the error budget being burnt."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TierSlo:
    """A tier's objective: `target` of its requests answered within `slo_ms` (also its default deadline)."""

    slo_ms: float
    target: float


class BudgetBurn:
    """How fast a tier burns its error budget: the share of SLO misses in the window over (1 - target).

    1.0 means misses arrive exactly at the budgeted rate; above 1.0 the budget runs out early. Outcomes
    are counted in `slices` time slices of the window, so recording costs O(1) at any request rate."""

    def __init__(
        self, slo: TierSlo, window_s: float = 60.0, slices: int = 60, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.slo = slo
        self._slice_s = window_s / slices
        self._slices = slices
        self._clock = clock
        self._counts: deque[list[int]] = deque()  # [slice index, requests, misses], oldest first
        self._requests = self._misses = 0

    def record(self, met: int = 0, missed: int = 0) -> float:
        """Record `met` requests answered within the SLO and `missed` ones answered late; return the burn rate."""
        index = math.floor(self._clock() / self._slice_s)
        if not self._counts or self._counts[-1][0] != index:
            self._counts.append([index, 0, 0])
        newest = self._counts[-1]
        newest[1] += met + missed
        newest[2] += missed
        self._requests += met + missed
        self._misses += missed
        while self._counts[0][0] <= index - self._slices:
            _, requests, misses = self._counts.popleft()
            self._requests -= requests
            self._misses -= misses
        return self.rate()

    def rate(self) -> float:
        if not self._requests:
            return 0.0
        return self._misses / self._requests / max(1.0 - self.slo.target, 1e-9)
