"""Circuit breakers per downstream model, with the outlier-detection vocabulary operators know from Envoy.

A breaker is closed (calls flow), open (the model is ejected: calls route around it without trying
it) or half-open (the ejection time is over: one probe call decides). The k-th ejection in a row
lasts k times `base_ejection_time_s`, capped at `max_ejection_time_s`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    consecutive_errors: int = 5  # Envoy consecutive_5xx: eject after this many failed calls in a row
    interval_s: float = 10.0  # Envoy interval: the window the failure percentage is taken over
    failure_percentage_threshold: float = 50.0  # Envoy failure_percentage_threshold, percent of calls
    failure_percentage_request_volume: int = 20  # calls in the window before the percentage counts
    latency_threshold_ms: float | None = None  # a call slower than this counts as failed
    base_ejection_time_s: float = 2.0  # Envoy base_ejection_time
    max_ejection_time_s: float = 30.0  # Envoy max_ejection_time


class CircuitBreaker:
    """The health of one downstream model, judged from the outcomes of real calls to it."""

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.state = CLOSED
        self.ejections = 0  # ejections since the model last stayed healthy for max_ejection_time_s
        self.why = ""  # why it was last ejected
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (time, failed) of recent calls
        self._window_failures = 0  # how many of them failed
        self._ejected_until = 0.0
        self._closed_at = 0.0
        self._probing = False
        self._held = False  # open until release(), whatever the ejection time (its model is being reloaded)
        self._before_hold: tuple[int, str] | None = None  # (ejections, why) of a breaker that was closed when held

    def allow(self) -> bool:
        """Whether a call may go to the model now; an open breaker past its ejection time lets one probe through."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and not self._held and self._clock() >= self._ejected_until:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record(self, ok: bool, latency_s: float) -> None:
        """The outcome of one call (one BLS request, however many rows it carried)."""
        if self._held:  # a late outcome of a call sent before the model's reload began: about the old process
            return
        now = self._clock()
        threshold = self.settings.latency_threshold_ms
        slow = threshold is not None and latency_s * 1000 > threshold
        failed = not ok or slow
        if self.state != CLOSED:
            self._probing = False
            if failed:
                self._eject(now, "half-open probe " + ("was slow" if ok else "failed"))
            else:
                self._close(now)
            return
        self._consecutive = self._consecutive + 1 if failed else 0
        self._window.append((now, failed))
        self._window_failures += failed
        while self._window and self._window[0][0] < now - self.settings.interval_s:
            self._window_failures -= self._window.popleft()[1]
        failures = self._window_failures  # kept as calls come and go: a sum over the window cost ~0.1 ms a call
        if self._consecutive >= self.settings.consecutive_errors:
            self._eject(now, f"{self._consecutive} consecutive failed calls")
        elif (
            len(self._window) >= self.settings.failure_percentage_request_volume
            and 100.0 * failures / len(self._window) >= self.settings.failure_percentage_threshold
        ):
            self._eject(now, f"{failures} of {len(self._window)} calls failed in {self.settings.interval_s:g} s")

    def trip(self, why: str) -> None:
        """Eject now, without waiting for failures to add up: the model is known to be down."""
        if self.state != OPEN:
            self._probing = False
            self._eject(self._clock(), why)

    def hold(self, why: str) -> None:
        """Eject until release(), however long that takes: the model is being reloaded, and a probe would only meet
        it half-loaded (failing, it doubled the next ejection and kept traffic off the reloaded model longer)."""
        if not self._held and self.state == CLOSED:
            self._before_hold = (self.ejections, self.why)
        self.trip(why)
        self._held = True

    def release(self) -> None:
        """End a hold. A breaker that was closed when held closes again (nothing spoke against the model, and its
        reload has ended); one that was open probes the model with the next call, at once."""
        if not self._held:
            return
        self._held = False
        if self._before_hold is not None:
            self.ejections, self.why = self._before_hold
            self._before_hold = None
            self._close(self._clock())
        else:
            self._ejected_until = min(self._ejected_until, self._clock())

    def describe(self) -> str:
        """The state as REASON shows it."""
        if self.state == OPEN and self._held:
            return f"breaker open ({self.why}; ejection {self.ejections}, until its reload is done)"
        if self.state == OPEN:
            left = max(self._ejected_until - self._clock(), 0.0)
            return f"breaker open ({self.why}; ejection {self.ejections}, {left:.1f} s left)"
        return f"breaker {self.state.replace('_', '-')}"

    def _eject(self, now: float, why: str) -> None:
        if now - self._closed_at > self.settings.max_ejection_time_s and self.state == CLOSED:
            self.ejections = 0  # healthy long enough: start the multiplier over
        self.ejections += 1
        ejection = min(self.settings.base_ejection_time_s * self.ejections, self.settings.max_ejection_time_s)
        self.state, self.why, self._ejected_until = OPEN, why, now + ejection
        self._consecutive = 0
        self._window.clear()
        self._window_failures = 0

    def _close(self, now: float) -> None:
        self.state, self._closed_at = CLOSED, now
        self._consecutive = 0
        self._window.clear()
        self._window_failures = 0
