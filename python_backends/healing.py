"""Self-healing: recognise a dead Python stub from a call's error, eject the model, reload it (rate-limited).

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


class Healer:
    """Turns failed calls into ejections and reloads. `trip(model, why)` ejects a model:version;
    `reload(name)` starts reloading a model (off the hot path); each model reloads at most once per
    `min_interval_s`."""

    def __init__(self, min_interval_s: float, trip: Callable[[str, str], None], reload: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self._trip = trip
        self._reload = reload
        self._clock = clock
        self._reload_started: dict[str, float] = {}

    def model_down(self, model: str, message: str, sent_at: float) -> bool:
        """Handle a failed call to `model` sent at `sent_at`; True when it shows the model is down now.

        An error from a call sent before the model's latest reload began is about the old stub: it is
        ignored, or it would eject the freshly loaded model."""
        name = model.split(":")[0]
        started = self._reload_started.get(name, float("-inf"))
        if not is_dead_stub(message) or sent_at < started:
            return False
        self._trip(model, f"model down: {message}")
        now = self._clock()
        if now - started >= self.min_interval_s:
            self._reload_started[name] = now
            self._reload(name)
        return True
