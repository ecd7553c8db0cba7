"""Steady, bounded load on a running server: one thread per tier, one image per request, back to back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from tierserve.client import Classification, TierserveClient, TierserveError

LOAD_LIMIT_S = 60.0  # no load loop runs longer than this, whatever happens


@dataclass(frozen=True)
class Sent:
    """One request: when it was answered (monotonic clock), its tier, its answer or error, and when it was sent."""

    at: float
    tier: str
    answer: Classification | None
    error: str | None
    sent_at: float


_Load = TypeVar("_Load", bound="LoadThreads")


class LoadThreads:
    """Client threads that send until stopped; use as a context manager. A subclass fills `_threads`, whose
    loops end once `_stop` is set; leaving waits up to JOIN_S for each thread (None: as long as it takes)."""

    JOIN_S: float | None = None

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def alive(self) -> int:
        """How many of the threads are still running."""
        return sum(thread.is_alive() for thread in self._threads)

    def __enter__(self: _Load) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.JOIN_S)


class SteadyLoad(LoadThreads):
    """Sends until stopped (or LOAD_LIMIT_S); use as a context manager. Loopback addresses only."""

    def __init__(
        self,
        url: str,
        images: np.ndarray,
        tiers: tuple[str, ...] = ("critical", "standard"),
        pause_s: float = 0.005,
        tier_key: str | None = None,
        protocol: str = "grpc",
        **parameters: Any,
    ) -> None:
        super().__init__()
        self.sent: list[Sent] = []
        self._tier_key = tier_key  # sent with every request (tiers above standard need one)
        self._protocol = protocol
        self._threads = [
            threading.Thread(target=self._run, args=(url, images, tier, pause_s, parameters)) for tier in tiers
        ]

    def _run(self, url: str, images: np.ndarray, tier: str, pause_s: float, parameters: dict[str, Any]) -> None:
        started = time.monotonic()
        with TierserveClient(url, self._protocol, tier_key=self._tier_key) as client:
            i = 0
            while not self._stop.is_set() and time.monotonic() - started < LOAD_LIMIT_S:
                sent_at = time.monotonic()
                try:
                    (answer,) = client.classify(images[i % len(images)], tier=tier, **parameters)
                    self.sent.append(Sent(time.monotonic(), tier, answer, None, sent_at))
                except TierserveError as error:
                    self.sent.append(Sent(time.monotonic(), tier, None, str(error), sent_at))
                i += 1
                time.sleep(pause_s)

    def wait_until(self, condition: Callable[[list[Sent]], bool], timeout_s: float) -> bool:
        """Poll `condition` on what was sent so far, until it holds or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition(list(self.sent)):
                return True
            time.sleep(0.1)
        return False
