"""The state store: SqliteStore, MemoryStore and RedisStore (on a redis-server of the test's own) keep the same
Redis-shaped semantics; several stores and processes on one file or one Redis share state and lose no increment."""

from __future__ import annotations

import multiprocessing
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierserve.redis_store import RedisStore, shown_location
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
from tierserve.tools.redis_server import RedisServer


class Clock:
    """The stores' clock: a fake one that `advance` moves at once, or (`real`, for Redis, which keeps its own time)
    the wall clock, which `advance` sleeps for, in `unit`s of 0.1 s so that TTL tests stay short."""

    def __init__(self, real: bool = False) -> None:
        self.now = 1_000_000.0
        self.real = real
        self.unit = 0.1 if real else 1.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if self.real:
            time.sleep(seconds)
        else:
            self.now += seconds


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def clock(backend: str) -> Clock:
    return Clock(real=backend == "redis")


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[StateStore]:
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()  # each test starts from an empty database
        made: StateStore = RedisStore(server.url)
    else:
        made = SqliteStore(tmp_path / "state.db", clock=clock) if backend == "sqlite" else MemoryStore(clock=clock)
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
    ttl_s = 10 * clock.unit
    assert store.set("claim", b"1", ttl_s=ttl_s, only_if_absent=True)
    clock.advance(ttl_s / 2)
    assert store.get("claim") == b"1"
    assert not store.set("claim", b"2", ttl_s=ttl_s, only_if_absent=True)
    clock.advance(ttl_s * 0.6)
    assert store.get("claim") is None
    assert store.set("claim", b"2", ttl_s=ttl_s, only_if_absent=True)
    assert store.get("claim") == b"2"
    store.set("claim", b"forever")  # a plain SET drops the TTL, as in Redis
    clock.advance(ttl_s * 1.1)
    assert store.get("claim") == b"forever"
    with pytest.raises(ValueError, match="ttl_s"):
        store.set("x", b"", ttl_s=0)


def test_set_and_delete_if_equal_change_only_the_expected_live_value(store: StateStore, clock: Clock):
    ttl_s = 10 * clock.unit
    assert not store.set_if_equal("lease", b"mine", b"mine", ttl_s=ttl_s)  # nothing there
    assert not store.delete_if_equal("lease", b"mine")
    store.set("lease", b"theirs", ttl_s=ttl_s)
    assert not store.set_if_equal("lease", b"mine", b"mine", ttl_s=ttl_s)
    assert not store.delete_if_equal("lease", b"mine")
    assert store.get("lease") == b"theirs"
    store.set("lease", b"mine", ttl_s=ttl_s)
    clock.advance(ttl_s * 0.6)
    assert store.set_if_equal("lease", b"mine", b"mine", ttl_s=ttl_s)  # renewed: lives ttl_s from now
    clock.advance(ttl_s * 0.6)
    assert store.get("lease") == b"mine"
    clock.advance(ttl_s * 0.5)
    assert store.get("lease") is None
    assert not store.set_if_equal("lease", b"mine", b"mine", ttl_s=ttl_s)  # lapsed: not brought back
    assert store.get("lease") is None
    store.set("lease", b"mine")
    assert store.set_if_equal("lease", b"mine", b"new")  # no ttl_s: kept until deleted
    assert store.get("lease") == b"new"
    assert store.delete_if_equal("lease", b"new")
    assert store.get("lease") is None


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


@pytest.fixture(params=["sqlite", "redis"])
def shared_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where several stores (and processes) find one state: a SQLite file, or a Redis database emptied first."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    return server.url


def test_two_stores_on_one_location_share_state(shared_location: str):
    first, second = open_store(shared_location), open_store(shared_location)
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


def _add_many(location: str, times: int, start) -> None:
    store = open_store(location)
    start.wait(30)  # all writers at once, so their transactions interleave
    for _ in range(times):
        store.add({"h": {"n": 1}, "g": {"n": 2}})
        store.set("nx", b"x", only_if_absent=True)
    store.close()


def test_concurrent_processes_lose_no_increment(shared_location: str):
    open_store(shared_location).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    workers = [context.Process(target=_add_many, args=(shared_location, 1000, start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    _add_many(shared_location, 1000, start)
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    store = open_store(shared_location)
    assert store.counts_many(["h", "g"]) == {"h": {"n": 3000.0}, "g": {"n": 6000.0}}
    store.close()


def _open_at_once(path: Path, start, errors) -> None:
    start.wait(10)
    try:
        SqliteStore(path).close()
    except StateStoreError as error:
        errors.put(str(error))


def test_stubs_opening_a_new_store_file_at_the_same_moment_all_open_it(tmp_path: Path):
    """A server's stubs open the new state file together. Switching it to WAL could meet another process's switch
    with SQLITE_BUSY and no busy handler: 39 of 200 such starts failed "database is locked" before."""
    context = multiprocessing.get_context("fork")  # a fresh store per child; fork keeps 100 starts to seconds
    errors = context.Queue()
    for trial in range(100):
        path, start = tmp_path / f"state{trial}.db", context.Barrier(8)
        openers = [context.Process(target=_open_at_once, args=(path, start, errors)) for _ in range(8)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(30)
            assert opener.exitcode == 0
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []


def test_open_store_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert isinstance(open_store("memory:"), MemoryStore)
    for location in (f"sqlite://{tmp_path}/a.db", str(tmp_path / "b.db")):
        store = open_store(location)
        assert isinstance(store, SqliteStore) and store.path.parent == tmp_path
        store.close()
    for location in ("redis://localhost:6379/0", "unix:///run/redis.sock?db=2"):
        store = open_store(location)
        assert isinstance(store, RedisStore)  # no connection until the first command
        store.close()
    with pytest.raises(StateStoreError, match="redis://nowhere"):
        open_store("redis://nowhere:port/0")
    with pytest.raises(StateStoreError, match="absolute"):
        open_store("state.db")
    with pytest.raises(StateStoreError, match="expected"):
        open_store("postgres://db/state")
    monkeypatch.setenv(STATE_ENV, "memory:")
    assert default_location() == "memory:"
    monkeypatch.delenv(STATE_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_location() == str(tmp_path / "tierserve" / "state.db")


def test_a_redis_password_is_never_shown():
    assert shown_location("redis://:hunter2@db:6380/1") == "redis://:***@db:6380/1"
    assert shown_location("redis://app:hunter2@db/1") == "redis://app:***@db/1"
    assert shown_location("redis://db:6380/1") == "redis://db:6380/1"
    assert "hunter2" not in repr(RedisStore("redis://:hunter2@db:6380/1"))


def test_a_redis_that_is_gone_or_hung_is_an_error_naming_it(redis_server: RedisServer, tmp_path: Path):
    with RedisServer(tmp_path) as gone:
        url = gone.url
    store = RedisStore(url)
    with pytest.raises(StateStoreError, match=f"state store {url}: ConnectionError"):
        store.get("secret")
    store.close()
    store = RedisStore(redis_server.url)
    store.set("k", b"v")
    redis_server.pause()
    try:
        with pytest.raises(StateStoreError, match="TimeoutError"):
            store.add({"h": {"a": 1}})
    finally:
        redis_server.resume()
    assert store.get("k") == b"v"  # the pool's broken connection is replaced
    store.close()
