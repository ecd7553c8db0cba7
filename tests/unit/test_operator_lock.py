"""One operator change at a time: a lease in the state store, refused to a second change while the first runs,
renewed while it runs, given back when it ends, and lapsing when its holder died."""

from __future__ import annotations

import threading
import time

import pytest

from tierserve.operator_lock import LEASE_KEY, ChangeRefused, ChangeUnderWay, one_change_at_a_time, operator_name
from tierserve.state_store import MemoryStore


def _change(store: MemoryStore, change: str, **options) -> None:
    """Take the lease for `change` and give it back (a change that does nothing)."""
    with one_change_at_a_time(store, change, **options):
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_second_change_is_refused_naming_the_first_and_goes_once_it_ended():
    store = MemoryStore()
    with one_change_at_a_time(store, "promote digits_heavy:3") as mine:
        assert (mine.change, mine.operator) == ("promote digits_heavy:3", operator_name())
        with pytest.raises(ChangeRefused) as refused:
            _change(store, "retire digits_heavy:1")
        assert refused.value.under_way == mine
        message = str(refused.value)
        assert message.startswith(f"another change is under way: promote digits_heavy:3 by {operator_name()} on ")
        assert message.endswith("try `retire digits_heavy:1` again once it is done (one change at a time)")
    assert store.get(LEASE_KEY) is None  # given back
    _change(store, "retire digits_heavy:1")


def test_the_lease_is_given_back_when_the_change_raises():
    store = MemoryStore()
    with pytest.raises(RuntimeError), one_change_at_a_time(store, "load digits_heavy:2"):
        raise RuntimeError("the server refused")
    assert store.get(LEASE_KEY) is None


def test_the_lease_is_renewed_while_the_change_runs():
    store = MemoryStore()
    with one_change_at_a_time(store, "canary digits_heavy:2", lease_s=0.3, renew_s=0.05):
        time.sleep(0.9)  # three leases long
        with pytest.raises(ChangeRefused):
            _change(store, "retire digits_heavy:1")


def test_a_holder_that_died_blocks_the_next_change_for_one_lease_at_most():
    clock = Clock()
    store = MemoryStore(clock=clock)
    dead = ChangeUnderWay(change="promote digits_heavy:3", operator="alice", host="laptop", since=clock.now, token="1")
    store.set(LEASE_KEY, dead.model_dump_json().encode(), ttl_s=30.0)  # its process was killed: nothing renews it
    with pytest.raises(ChangeRefused, match="promote digits_heavy:3 by alice on laptop, since 2027-01-15 08:00:00 UTC"):
        _change(store, "retire digits_heavy:1", clock=clock)
    clock.now += 30.0
    _change(store, "retire digits_heavy:1", clock=clock)


def test_a_lease_taken_by_another_change_since_is_not_given_back():
    store = MemoryStore()
    with one_change_at_a_time(store, "retire digits_heavy:1", renew_s=60):
        # the store stalled past the lease, which lapsed and another change took
        store.set(LEASE_KEY, b'{"change": "theirs"}')
    assert store.get(LEASE_KEY) == b'{"change": "theirs"}'


class TakenMidRenewal(MemoryStore):
    """Another change takes the lease the moment the renewal first asks the store about it: right after a read
    (between a check and a write), or right before a compare-and-set."""

    THEIRS = b'{"change": "theirs"}'

    def __init__(self) -> None:
        super().__init__()
        self.taken = False

    def _take(self, key: str) -> None:
        if key == LEASE_KEY and threading.current_thread().name == "operator-lease" and not self.taken:
            self.taken = True
            MemoryStore.set(self, LEASE_KEY, self.THEIRS, ttl_s=30.0)

    def get(self, key: str) -> bytes | None:
        value = super().get(key)
        self._take(key)
        return value

    def set_if_equal(self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None) -> bool:
        self._take(key)
        return super().set_if_equal(key, expected, value, ttl_s=ttl_s)


def test_a_renewal_never_overwrites_a_lease_taken_by_another_change():
    store = TakenMidRenewal()
    with one_change_at_a_time(store, "canary digits_heavy:2", renew_s=0.02):
        time.sleep(0.2)
    assert store.taken
    assert store.get(LEASE_KEY) == TakenMidRenewal.THEIRS


def test_an_unreadable_lease_is_still_a_lease_and_is_shown_as_it_is():
    store = MemoryStore()
    store.set(LEASE_KEY, b"garbage", ttl_s=30.0)
    with pytest.raises(ChangeRefused, match=r"another change is under way: an unreadable lease b'garbage'"):
        _change(store, "unload preprocess")
