"""A state store that fails is no outage: the guard stops calling it after one failure until a probe finds it back
(and counts what failed), the experimenter answers from what it read last and keeps its counts for later, feedback
is refused UNAVAILABLE; a Redis that is stopped fails fast and is used again once it is back."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tierserve.experiment_spec import parse_experiments
from tierserve.experiment_stats import ArmRow, ExperimentStats
from tierserve.experimenter import EXPERIMENTS_KEY, MAX_PENDING_ROWS, Experimenter
from tierserve.feedback import FeedbackBook, FeedbackRefused, Learned, Refusal
from tierserve.guarded_store import PROBE, GuardedStore, StoreUnavailable
from tierserve.policy import Policy
from tierserve.redis_store import RedisStore
from tierserve.request_ids import IssuedRow, RequestIds, new_seeds
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.signature import RequestContext
from tierserve.state_store import SECRET_KEY, MemoryStore, StateStoreError, shared_secret
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.redis_server import RedisServer
from tierserve.user_adaptation import UserStates

BANDIT = {
    "name": "bandit",
    "kind": "bandit",
    "unit": "request",
    "bandit": {"strategy": "thompson"},
    "arms": [{"name": "policy"}, {"name": "rules", "models": {"digits_light:2": "digits_rules:1"}}],
}


class Breakable(MemoryStore):
    """A MemoryStore that fails every call while `broken`, as a Redis that is stopped would."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.broken:
            raise StateStoreError("state store redis://test: ConnectionError: refused")

    def get(self, key: str) -> bytes | None:
        self._check()
        return super().get(key)

    def set(self, key: str, value: bytes, *, ttl_s: float | None = None, only_if_absent: bool = False) -> bool:
        self._check()
        return super().set(key, value, ttl_s=ttl_s, only_if_absent=only_if_absent)

    def add(self, counts: Mapping[str, Mapping[str, float]]) -> None:
        self._check()
        super().add(counts)

    def counts_many(self, keys):
        self._check()
        return super().counts_many(keys)

    def mark(self, key: str, members: Mapping[str, float]) -> None:
        self._check()
        super().mark(key, members)


NOW = 1_800_000_000.0


@pytest.fixture
def backend() -> Breakable:
    return Breakable()


@pytest.fixture
def policy() -> Policy:
    return Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)


def test_after_a_failure_the_guard_calls_nothing_until_a_probe_finds_the_store_back(backend: Breakable):
    changes: list[tuple[bool, str]] = []
    store = GuardedStore(backend, on_change=lambda up, why: changes.append((up, why)))
    store.set("k", b"v")
    backend.broken = True
    with pytest.raises(StateStoreError, match="ConnectionError"):
        store.get("k")
    assert not store.up and changes == [(False, "state store redis://test: ConnectionError: refused")]
    calls = backend.calls
    for _ in range(3):
        with pytest.raises(StoreUnavailable, match="unavailable for"):
            store.add({"h": {"a": 1}})
    assert backend.calls == calls  # refused without touching the store
    with pytest.raises(StateStoreError):
        store.probe()
    backend.broken = False
    assert store.probe() is None  # it answers (and holds no secret)
    assert store.up and changes[-1][0] is True
    assert store.get("k") == b"v"
    assert store.errors() == {"get": 1, "add": 3, PROBE: 1}


def test_with_retry_after_one_call_per_interval_tries_the_store(backend: Breakable):
    now = [100.0]
    store = GuardedStore(backend, retry_after_s=1.0, clock=lambda: now[0])
    backend.broken = True
    with pytest.raises(StateStoreError):
        store.get("k")
    calls = backend.calls
    with pytest.raises(StoreUnavailable):
        store.get("k")
    now[0] += 1.0
    backend.broken = False
    assert store.get("k") is None and store.up
    assert backend.calls == calls + 1


def test_the_experimenter_answers_from_what_it_read_last_and_catches_up(backend: Breakable, policy: Policy):
    store = GuardedStore(backend)
    stats = ExperimentStats(store)
    stats.record_feedback("bandit", "rules", correct=False, at=0.0)
    experimenter = Experimenter(parse_experiments({"experiments": [BANDIT]}, policy), policy, store)
    contexts = [RequestContext("standard", user_id=f"u{i}") for i in range(8)]
    experimenter.plan(contexts, adapt=True)
    assert experimenter._posteriors == {"bandit": {"rules": (1.0, 2.0)}}
    backend.broken = True
    experimenter._posteriors_at = float("-inf")  # due for a read, which fails
    plans = experimenter.plan(contexts, adapt=True)
    assert experimenter._posteriors == {"bandit": {"rules": (1.0, 2.0)}}  # frozen, not lost
    assert all(plan.arms.startswith("bandit=") for plan in plans)
    rows = [ArmRow("bandit", "policy", "", 0.003, 60.0)] * 5
    experimenter._pending.extend(rows)
    with pytest.raises(StateStoreError):
        experimenter.flush()
    assert len(experimenter._pending) == 5 and experimenter.dropped_rows == 0  # kept for the next flush
    backend.broken = False
    store.probe()
    experimenter.flush()
    assert experimenter._pending == []
    assert stats.report("bandit").arms[0].rows == 5  # each row counted once


def test_rows_beyond_the_bound_are_dropped_and_counted_while_the_store_is_down(backend: Breakable, policy: Policy):
    experimenter = Experimenter(parse_experiments({"experiments": [BANDIT]}, policy), policy, GuardedStore(backend))
    backend.broken = True
    experimenter._pending.extend([ArmRow("bandit", "policy", "", 0.003, 60.0)] * MAX_PENDING_ROWS)
    with pytest.raises(StateStoreError):
        experimenter.flush()
    experimenter._pending.extend([ArmRow("bandit", "policy", "", 0.003, 60.0)] * 10)
    with pytest.raises(StateStoreError):
        experimenter.flush()
    assert len(experimenter._pending) == MAX_PENDING_ROWS and experimenter.dropped_rows == 10


def test_what_servers_agree_on_is_written_back_to_a_store_that_lost_it(backend: Breakable, policy: Policy):
    experimenter = Experimenter(parse_experiments({"experiments": [BANDIT]}, policy), policy, backend)
    backend.delete(SECRET_KEY, EXPERIMENTS_KEY)  # a Redis restarted without its data
    experimenter.restore_shared()
    assert shared_secret(backend) == experimenter.secret
    assert b'"bandit"' in backend.get(EXPERIMENTS_KEY)


def test_feedback_is_refused_unavailable_while_the_store_is_down(backend: Breakable):
    store = GuardedStore(backend)
    ids = RequestIds(shared_secret(store))
    book = FeedbackBook(store, ids, ExperimentStats(store), UserStates(store, 10))
    (request_id,) = ids.issue([IssuedRow(new_seeds(1)[0], NOW, "", "standard", 3, 3, (("bandit", "rules"),))])
    backend.broken = True
    with pytest.raises(FeedbackRefused, match="state store is unavailable, so this feedback was not taken") as refused:
        book.accept([request_id], [3], NOW)
    assert refused.value.why is Refusal.UNAVAILABLE
    backend.broken = False
    store.probe()
    assert book.accept([request_id], [3], NOW) == [Learned("bandit", "rules", True)]  # taken once the store is back


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def test_a_stopped_redis_is_used_again_once_it_is_back(redis_server: RedisServer):
    store = GuardedStore(RedisStore(redis_server.url))
    assert shared_secret(store)
    redis_server.stop()
    with pytest.raises(StateStoreError, match="ConnectionError"):
        store.add({"h": {"a": 1}})
    with pytest.raises(StoreUnavailable):
        store.add({"h": {"a": 1}})
    redis_server.start()  # the same port, empty
    assert store.probe() is None and store.up
    store.add({"h": {"a": 1}})
    assert store.counts("h") == {"a": 1.0}
    store.close()
