"""The router's load, posted for `preprocess`, so that requests the router would shed are refused first thing.

Shedding in the router comes late: a shed request has already been resized by `preprocess` and sent to
the router, and under a flood that work takes the CPU. Each router instance therefore posts its load
gauge (moving average of its queue wait) and the tiers it sheds at that load into its own slot of a small
memory-mapped file shared by one server's processes. `preprocess` reads the board and refuses those
tiers before doing anything else. A post older than STALE_S is ignored, so once `preprocess` has let
nothing through for that long it lets requests through again and the router measures afresh.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

SLOTS = 8
RECORD = struct.Struct("<ddi4x")  # posted at (monotonic s), queue wait ms, shed level
STALE_S = 0.2
SHED_LEVELS = {"best_effort": 1, "standard": 2}  # a tier is shed when the posted level reaches its value


def server_scratch(server_pid: int) -> Path:
    """Scratch space shared by the Python stubs of one tritonserver (the load board, the routers' reload
    log); tools/server.py removes it when the server stops."""
    return Path(tempfile.gettempdir()) / f"tierserve-{server_pid}"


class LoadBoard:
    """One slot per router instance in `directory`/load; readers take the highest fresh level."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / "load", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * RECORD.size:
                os.ftruncate(fd, SLOTS * RECORD.size)
            self._map = mmap.mmap(fd, SLOTS * RECORD.size)
        finally:
            os.close(fd)

    def post(self, slot: int, wait_ms: float, shed_tiers: list[str], now: float) -> None:
        level = max((SHED_LEVELS[tier] for tier in shed_tiers), default=0)
        RECORD.pack_into(self._map, (slot % SLOTS) * RECORD.size, now, wait_ms, level)

    def read(self, now: float) -> Posted:
        """The highest shed level among fresh posts, with the queue wait posted beside it."""
        highest = Posted(0, 0.0)
        for slot in range(SLOTS):
            posted_at, wait_ms, level = RECORD.unpack_from(self._map, slot * RECORD.size)
            if level > highest.level and 0 <= now - posted_at < STALE_S:
                highest = Posted(level, wait_ms)
        return highest


@dataclass(frozen=True)
class Posted:
    """What the board says at one moment: the tiers up to `level` are shed (0: none)."""

    level: int
    wait_ms: float

    def reason(self, tier: str) -> str:
        """Why a request of `tier` is refused, or "" when it may pass (always, for tiers never shed here)."""
        if self.level < SHED_LEVELS.get(tier, self.level + 1):
            return ""
        return f"router queue wait {self.wait_ms:.1f} ms (moving average) sheds {tier}"
