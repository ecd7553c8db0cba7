"""Load shedding and degradation by tier, from a load signal Triton measures.

The signal is how long requests queued for the router, as Triton counts it (tierserve.queue_wait: the mean
queue wait of the requests dispatched since the last reading, read every 50 ms). Batching absorbs
concurrency; a wait that grows means requests arrive faster than the router serves them. The readings feed
a moving average (the load gauge), and a request is judged by the gauge once it has stayed past a
threshold for `sustain_s`: only sustained load counts. Past the thresholds, best_effort is first
degraded (the first model only, no escalation), then shed, then standard is shed; critical is never shed
by the router."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

NORMAL, DEGRADE, SHED = "normal", "degrade", "shed"


def shed_message(tier: str, reason: str) -> str:
    """The UNAVAILABLE message of a shed request."""
    return f"digits: {tier} request shed: {reason}; retry later or with a higher tier"


@dataclass(frozen=True)
class SheddingSettings:
    degrade_best_effort_at_ms: float = 10.0
    shed_best_effort_at_ms: float = 25.0
    shed_standard_at_ms: float = 60.0
    smoothing: float = 0.3  # weight of the newest execute in the moving average
    memory_s: float = 0.5  # after a pause this long, the newest execute weighs 63%: an old flood is forgotten
    sustain_s: float = 0.1  # the average acts only once it has stayed past a threshold this long


class LoadMonitor:
    """What a request's queue wait means for its tier, and the moving average of the waits."""

    def __init__(self, settings: SheddingSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.wait_ms = 0.0
        self._clock = clock
        self._last = clock()
        self._past_since: dict[float, float] = {}  # threshold -> since when the average is at or past it

    def observe(self, longest_wait_ms: float) -> float:
        """Fold one reading of the queue wait (the mean since the last reading) into the average; return it."""
        now = self._clock()
        alpha = max(self.settings.smoothing, 1.0 - math.exp(-(now - self._last) / self.settings.memory_s))
        self._last = now
        self.wait_ms = (1 - alpha) * self.wait_ms + alpha * max(longest_wait_ms, 0.0)
        s = self.settings
        for threshold in (s.degrade_best_effort_at_ms, s.shed_best_effort_at_ms, s.shed_standard_at_ms):
            if self.wait_ms >= threshold:
                self._past_since.setdefault(threshold, now)
            else:
                self._past_since.pop(threshold, None)
        return self.wait_ms

    def _past(self, threshold: float, wait_ms: float) -> bool:
        """Whether a request that waited `wait_ms` is past `threshold`, with the average past it for sustain_s."""
        since = self._past_since.get(threshold)
        return (
            min(wait_ms, self.wait_ms) >= threshold
            and since is not None
            and self._clock() - since >= self.settings.sustain_s
        )

    def action(self, tier: str, wait_ms: float) -> tuple[str, str]:
        """NORMAL, DEGRADE or SHED for a request of `tier` that waited `wait_ms` for the router, and why.

        Overload must be sustained (the moving average past the threshold for sustain_s: one slow execute
        is not overload) and must have made this request wait; the load it is told is the lower of the two."""
        s, wait = self.settings, min(wait_ms, self.wait_ms)
        if tier == "best_effort" and self._past(s.shed_best_effort_at_ms, wait_ms):
            return SHED, f"router queue wait {wait:.1f} ms >= {s.shed_best_effort_at_ms:g} ms sheds best_effort"
        if tier == "standard" and self._past(s.shed_standard_at_ms, wait_ms):
            return SHED, f"router queue wait {wait:.1f} ms >= {s.shed_standard_at_ms:g} ms sheds standard"
        if tier == "best_effort" and self._past(s.degrade_best_effort_at_ms, wait_ms):
            return DEGRADE, (
                f"degraded: router queue wait {wait:.1f} ms >= {s.degrade_best_effort_at_ms:g} ms, first model only"
            )
        return NORMAL, ""
