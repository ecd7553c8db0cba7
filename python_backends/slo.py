"""Per-tier service level objectives: latency SLO, target, and the error budget being burnt."""

from __future__ import annotations

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

    1.0 means misses arrive exactly at the budgeted rate; above 1.0 the budget runs out early."""

    def __init__(self, slo: TierSlo, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.slo = slo
        self.window_s = window_s
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()

    def record(self, missed: bool) -> float:
        now = self._clock()
        self._outcomes.append((now, missed))
        while self._outcomes[0][0] < now - self.window_s:
            self._outcomes.popleft()
        return self.rate()

    def rate(self) -> float:
        if not self._outcomes:
            return 0.0
        misses = sum(missed for _, missed in self._outcomes) / len(self._outcomes)
        return misses / max(1.0 - self.slo.target, 1e-9)
