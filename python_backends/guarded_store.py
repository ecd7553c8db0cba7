"""A state store that keeps its callers out of a failing store's way: after a call fails (Redis stopped, hung or
unreachable; SQLite locked past its busy timeout), further calls fail at once with StoreUnavailable, without touching
the store, until a probe finds it answering again. So only the first call of an outage waits for a timeout; the
router's executes answer from what they last read, and its background thread probes.

Counts every call that failed or was not made while the store was down, per operation, for the metrics
(tierserve_state_store_errors_total{operation}, tierserve_state_store_up).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from tierserve.state_store import SECRET_KEY, StateStore, StateStoreError

T = TypeVar("T")
PROBE = "probe"  # the operation label of probes


class StoreUnavailable(StateStoreError):
    """The store failed recently and is not called until it answers a probe again."""


class GuardedStore:
    """`store` behind a guard. While it is down, only `probe()` calls it, and, when `retry_after_s` is set, one
    ordinary call per `retry_after_s` (for callers with no thread of their own to probe). `on_change(up, why)` is
    called on every transition, outside the guard's lock (to log it)."""

    def __init__(
        self,
        store: StateStore,
        *,
        retry_after_s: float | None = None,
        on_change: Callable[[bool, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._retry_after_s = retry_after_s
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._errors: Counter[str] = Counter()
        self._down_since: float | None = None
        self._tried_at = float("-inf")
        self._why = ""

    def __repr__(self) -> str:
        return f"GuardedStore({self.store!r})"

    @property
    def up(self) -> bool:
        """False from a failed call until a call or probe succeeds."""
        return self._down_since is None

    def errors(self) -> dict[str, int]:
        """Calls that failed or were not made while the store was down, per operation, since this guard was made."""
        with self._lock:
            return dict(self._errors)

    def probe(self) -> bytes | None:
        """GET the shared secret (a key every server has), whether the store is up or down: what it holds (None when
        the store answered without one: it lost its data), or StateStoreError when it does not answer."""
        return self._call(PROBE, self.store.get, SECRET_KEY, probing=True)

    def _call(self, operation: str, method: Callable[..., T], *args: object, probing: bool = False, **kw: object) -> T:
        with self._lock:
            now = self._clock()
            down_for = None if self._down_since is None else now - self._down_since
            retry_due = self._retry_after_s is not None and now - self._tried_at >= self._retry_after_s
            if down_for is not None and not probing and not retry_due:
                self._errors[operation] += 1
                raise StoreUnavailable(f"{self.store!r} is unavailable for {down_for:.1f} s: {self._why}")
            self._tried_at = now
        try:
            result = method(*args, **kw)
        except StateStoreError as error:
            self._changed(up=False, why=str(error), operation=operation)
            raise
        if down_for is not None:
            self._changed(up=True, why=f"answers again after {down_for:.1f} s", operation=operation)
        return result

    def _changed(self, up: bool, why: str, operation: str) -> None:
        with self._lock:
            if not up:
                self._errors[operation] += 1
            was_up = self._down_since is None
            if up == was_up:
                return
            self._down_since, self._why = (None, "") if up else (self._clock(), why)
        if self._on_change is not None:
            self._on_change(up, why)

    def get(self, key: str) -> bytes | None:
        return self._call("get", self.store.get, key)

    def set(self, key: str, value: bytes, *, ttl_s: float | None = None, only_if_absent: bool = False) -> bool:
        return self._call("set", self.store.set, key, value, ttl_s=ttl_s, only_if_absent=only_if_absent)

    def delete(self, *keys: str) -> None:
        self._call("delete", self.store.delete, *keys)

    def set_if_equal(self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None) -> bool:
        return self._call("set_if_equal", self.store.set_if_equal, key, expected, value, ttl_s=ttl_s)

    def delete_if_equal(self, key: str, expected: bytes) -> bool:
        return self._call("delete_if_equal", self.store.delete_if_equal, key, expected)

    def add(self, counts: Mapping[str, Mapping[str, float]]) -> None:
        self._call("add", self.store.add, counts)

    def counts(self, key: str) -> dict[str, float]:
        return self._call("counts", self.store.counts, key)

    def counts_many(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        return self._call("counts_many", self.store.counts_many, keys)

    def mark(self, key: str, members: Mapping[str, float]) -> None:
        self._call("mark", self.store.mark, key, members)

    def members(self, key: str, *, limit: int | None = None) -> list[tuple[str, float]]:
        return self._call("members", self.store.members, key, limit=limit)

    def size(self, key: str) -> int:
        return self._call("size", self.store.size, key)

    def unmark(self, key: str, members: Sequence[str]) -> None:
        self._call("unmark", self.store.unmark, key, members)

    def close(self) -> None:
        self.store.close()
