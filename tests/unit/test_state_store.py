"""The state store: SqliteStore and MemoryStore keep the same Redis-shaped semantics; several SqliteStore objects
and processes on one file share state and lose no increment."""

from __future__ import annotations

import multiprocessing
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierserve.state_store import (
    STATE_ENV,
    MemoryStore,
    SqliteStore,
    StateStore,
    StateStoreError,
    default_location,
    open_store,
    shared_secret,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[StateStore]:
    made = SqliteStore(tmp_path / "state.db", clock=clock) if request.param == "sqlite" else MemoryStore(clock=clock)
    yield made
    made.close()


def test_set_get_and_only_if_absent(store: StateStore):
    assert store.get("k") is None
    assert store.set("k", b"one", only_if_absent=True)
    assert not store.set("k", b"two", only_if_absent=True)
    assert store.get("k") == b"one"
    assert store.set("k", b"three")
    assert store.get("k") == b"three"


def test_ttl_expiry_hides_the_value_and_frees_the_key(store: StateStore, clock: Clock):
    assert store.set("claim", b"1", ttl_s=10, only_if_absent=True)
    clock.now += 9.9
    assert store.get("claim") == b"1"
    assert not store.set("claim", b"2", ttl_s=10, only_if_absent=True)
    clock.now += 0.1
    assert store.get("claim") is None
    assert store.set("claim", b"2", ttl_s=10, only_if_absent=True)
    assert store.get("claim") == b"2"
    store.set("claim", b"forever")  # a plain SET drops the TTL, as in Redis
    clock.now += 100
    assert store.get("claim") == b"forever"
    with pytest.raises(ValueError, match="ttl_s"):
        store.set("x", b"", ttl_s=0)


def test_add_and_counts(store: StateStore):
    assert store.counts("h") == {}
    store.add({"h": {"a": 1, "b": 0.5}, "g": {"a": 2}})
    store.add({"h": {"a": 1}})
    assert store.counts("h") == {"a": 2.0, "b": 0.5}
    assert store.counts_many(["h", "g", "none", "h"]) == {"h": {"a": 2.0, "b": 0.5}, "g": {"a": 2.0}, "none": {}}
    with pytest.raises(ValueError, match="finite"):
        store.add({"h": {"a": float("nan")}})
    assert store.counts("h")["a"] == 2.0


def test_sorted_set(store: StateStore):
    assert store.size("z") == 0 and store.members("z") == []
    store.mark("z", {"u1": 3, "u2": 1})
    store.mark("z", {"u1": 0.5, "u3": 9, "u0": 1})  # u1's score updated, not a second member
    assert store.size("z") == 4
    assert store.members("z") == [("u1", 0.5), ("u0", 1.0), ("u2", 1.0), ("u3", 9.0)]  # ties by member
    assert store.members("z", limit=2) == [("u1", 0.5), ("u0", 1.0)]
    store.unmark("z", ["u1", "absent", "u1"])
    assert store.size("z") == 3
    store.unmark("z", ["u0", "u2", "u3"])
    assert store.size("z") == 0 and store.members("z") == []


def test_delete_removes_any_kind_of_key(store: StateStore):
    store.set("s", b"x")
    store.add({"h": {"a": 1}})
    store.mark("z", {"m": 1})
    store.delete("s", "h", "z", "absent")
    assert (store.get("s"), store.counts("h"), store.size("z"), store.members("z")) == (None, {}, 0, [])
    store.mark("z", {"m": 1})
    assert store.size("z") == 1


def test_shared_secret_is_made_once(store: StateStore):
    secret = shared_secret(store)
    assert len(secret) == 32
    assert shared_secret(store) == secret


def test_two_sqlite_stores_on_one_file_share_state(tmp_path: Path):
    first, second = SqliteStore(tmp_path / "state.db"), SqliteStore(tmp_path / "state.db")
    assert shared_secret(first) == shared_secret(second)
    assert first.set("claim", b"1", only_if_absent=True)
    assert not second.set("claim", b"1", only_if_absent=True)
    first.add({"h": {"a": 1}})
    second.add({"h": {"a": 1}})
    first.mark("z", {"m": 1})
    second.mark("z", {"m": 2, "n": 3})
    assert first.counts("h") == second.counts("h") == {"a": 2.0}
    assert first.members("z") == [("m", 2.0), ("n", 3.0)] and first.size("z") == 2
    first.close()
    second.close()


def test_the_file_is_private_and_reopens_with_its_state(tmp_path: Path):
    path = tmp_path / "deeper" / "state.db"
    store = SqliteStore(path)
    secret = shared_secret(store)
    store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reopened = SqliteStore(path)
    assert shared_secret(reopened) == secret
    reopened.close()
    with pytest.raises(StateStoreError, match="closed"):
        reopened.get("secret")


def _add_many(path: str, times: int, start) -> None:
    store = SqliteStore(Path(path))
    start.wait(30)  # all writers at once, so their transactions interleave
    for _ in range(times):
        store.add({"h": {"n": 1}, "g": {"n": 2}})
        store.set("nx", b"x", only_if_absent=True)
    store.close()


def test_concurrent_processes_lose_no_increment(tmp_path: Path):
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    workers = [context.Process(target=_add_many, args=(str(path), 1000, start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    _add_many(str(path), 1000, start)
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    store = SqliteStore(path)
    assert store.counts_many(["h", "g"]) == {"h": {"n": 3000.0}, "g": {"n": 6000.0}}
    store.close()


def test_open_store_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert isinstance(open_store("memory:"), MemoryStore)
    for location in (f"sqlite://{tmp_path}/a.db", str(tmp_path / "b.db")):
        store = open_store(location)
        assert isinstance(store, SqliteStore) and store.path.parent == tmp_path
        store.close()
    with pytest.raises(StateStoreError, match="Redis comes with the several-servers issue"):
        open_store("redis://localhost:6379/0")
    with pytest.raises(StateStoreError, match="absolute"):
        open_store("state.db")
    with pytest.raises(StateStoreError, match="expected"):
        open_store("postgres://db/state")
    monkeypatch.setenv(STATE_ENV, "memory:")
    assert default_location() == "memory:"
    monkeypatch.delenv(STATE_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_location() == str(tmp_path / "tierserve" / "state.db")
