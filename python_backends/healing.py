"""Self-healing: recognise a dead Python stub from a call's error, eject the model, reload it (rate-limited).

Triton 2.51 does not restart a crashed stub; the model stays READY and every call fails with
"Stub process '...' is not healthy" until the model is unloaded and loaded again.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

DEAD_STUB_MARKERS = ("is not healthy", "Stub process")
RELOAD_WAIT_S = 30.0  # someone else's reload that has not said it ended is waited for this long at most


def is_dead_stub(message: str) -> bool:
    """Whether a failed call's message says the model's stub process is gone."""
    return any(marker in message for marker in DEAD_STUB_MARKERS)


class ReloadLog:
    """When each model's latest reload began, and ended, shared by every router instance of one server and its
    supervisor.

    One small file per model under `directory` ("<began>" while a reload runs, "<began> <ended>" once it ended),
    read and written under an exclusive lock, so two router processes never both reload a model that died once.
    Times are CLOCK_MONOTONIC, which all processes of the machine share."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[tuple[IO[str], float, float | None]]:
        with (self.directory / f"{name}.reload").open("a+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            file.seek(0)
            times = [float(t) for t in file.read().split()]
            yield file, (times[0] if times else float("-inf")), (times[1] if len(times) > 1 else None)

    def claim(self, name: str, sent_at: float, now: float, min_interval_s: float) -> str:
        """ "stale" if a reload began after the failed call was sent, "recent" if one began less than
        `min_interval_s` ago, otherwise "reload" (recorded at `now`: the caller reloads, then calls `finish`)."""
        with self._locked(name) as (file, started, _):
            if sent_at < started:
                return "stale"
            if now - started < min_interval_s:
                return "recent"
            file.seek(0)
            file.truncate()
            file.write(repr(now))
            return "reload"

    def finish(self, name: str, now: float) -> None:
        """The reload the caller claimed has ended (done or failed)."""
        with self._locked(name) as (file, started, ended):
            if started > float("-inf") and ended is None:
                file.seek(0)
                file.truncate()
                file.write(f"{started!r} {now!r}")

    def in_progress(self, name: str, now: float, timeout_s: float) -> bool:
        """Whether a reload of `name` began less than `timeout_s` ago and has not ended (a reloader that died, or
        one that does not say when it ends, is waited for `timeout_s` at most)."""
        with self._locked(name) as (_, started, ended):
            return ended is None and now - started < timeout_s


class Healer:
    """Turns failed calls into ejections and reloads. `trip(model, why)` ejects a model:version;
    `reload(name)` starts reloading a model (off the hot path); each model reloads at most once per
    `min_interval_s` across all router instances sharing `log`; `await_reload(name)` is told of a failure while
    someone else's reload of the model runs (its calls would only meet it half-loaded)."""

    def __init__(
        self,
        min_interval_s: float,
        log: ReloadLog,
        trip: Callable[[str, str], None],
        reload: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        await_reload: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.min_interval_s = min_interval_s
        self._log = log
        self._trip = trip
        self._reload = reload
        self._await_reload = await_reload
        self._clock = clock

    def model_down(self, model: str, message: str, sent_at: float) -> bool:
        """Handle a failed call to `model` sent at `sent_at`; True when it shows the model is down now.

        An error from a call sent before the model's latest reload began is about the old stub: it is
        ignored, or it would eject the freshly loaded model."""
        if not is_dead_stub(message):
            return False
        name = model.split(":")[0]
        now = self._clock()
        claim = self._log.claim(name, sent_at, now, self.min_interval_s)
        if claim != "reload" and self._log.in_progress(name, now, RELOAD_WAIT_S):
            self._await_reload(name)
        if claim == "stale":
            return False
        self._trip(model, f"model down: {message}")
        if claim == "reload":
            self._reload(name)
        return True
