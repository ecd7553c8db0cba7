"""Per-user adaptation: records bounded by max_users (least recently seen forgotten), their size in SQLite, and the
threshold a user's record leads to."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierserve.policy import AdaptationSettings
from tierserve.request_ids import user_key
from tierserve.state_store import MemoryStore, SqliteStore, StateStore
from tierserve.user_adaptation import BYTES_PER_USER, ESCALATE_ALL, UserRecord, UserStates, adapted_threshold

ON = AdaptationSettings(enabled=True, min_feedback=5, escalate_all_below=0.7, relax_above=0.97, relaxed_threshold=0.5)


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    made: StateStore = SqliteStore(tmp_path / "state.db") if request.param == "sqlite" else MemoryStore()
    yield made
    made.close()


def test_records_count_right_and_wrong(store: StateStore):
    users = UserStates(store, max_users=10)
    for right in (True, True, False):
        users.record("aaaa", right, 1.0)
    users.record("bbbb", False, 2.0)
    assert users.get(["aaaa", "bbbb", "cccc", ""]) == {"aaaa": UserRecord(2, 1), "bbbb": UserRecord(0, 1)}
    with pytest.raises(ValueError, match="needs a user"):
        users.record("", True, 3.0)


def test_the_least_recently_seen_users_are_forgotten_beyond_max_users(store: StateStore):
    users = UserStates(store, max_users=3)
    for when, user in enumerate(["u1", "u2", "u3"]):
        users.record(user, True, float(when))
    users.record("u1", True, 10.0)  # u1 seen again: u2 is now the least recently seen
    users.record("u4", False, 11.0)
    assert set(users.get(["u1", "u2", "u3", "u4"])) == {"u1", "u3", "u4"}
    assert store.size("users:seen") == 3
    for when in range(20):
        users.record(f"new{when}", True, 20.0 + when)
        assert store.size("users:seen") <= 3
    assert set(users.get([f"new{i}" for i in range(20)] + ["u1", "u3", "u4"])) == {"new17", "new18", "new19"}
    assert store.counts("user:u1") == {}, "a forgotten user's counts are deleted"


def test_bytes_per_user_in_sqlite(tmp_path: Path):
    """The figure user_adaptation.BYTES_PER_USER quotes: 10,000 users with both counts, in the database's pages."""
    store = SqliteStore(tmp_path / "state.db")
    users = UserStates(store, max_users=100_000)
    before = store.bytes_used()
    count = 10_000
    for index in range(count):
        user = user_key(b"k" * 32, f"user{index}")
        users.record(user, True, float(index))
        users.record(user, False, float(index))
    measured = (store.bytes_used() - before) / count
    print(f"SQLite bytes per user: {measured:.0f}")
    assert BYTES_PER_USER * 0.75 <= measured <= BYTES_PER_USER * 1.25, f"measured {measured:.0f}: update BYTES_PER_USER"
    store.close()


@pytest.mark.parametrize(
    ("settings", "record", "expected"),
    [
        (AdaptationSettings(enabled=False), UserRecord(0, 50), None),
        (ON, None, None),
        (ON, UserRecord(0, 4), None),  # fewer than min_feedback
        (
            ON,
            UserRecord(2, 7),
            (ESCALATE_ALL, "per-user: first model right on 2/9 of this user's images, every row escalates"),
        ),
        (
            ON,
            UserRecord(40, 0),
            (0.5, "per-user: first model right on 40/40 of this user's images, escalates below 0.50 only"),
        ),
        (ON, UserRecord(30, 0), None),  # 31/32 = 0.969: not above relax_above once smoothed
        (ON, UserRecord(8, 2), None),  # 9/12 = 0.75: ordinary
    ],
)
def test_adapted_threshold(settings: AdaptationSettings, record: UserRecord | None, expected):
    assert adapted_threshold(settings, 0.9, record) == expected


def test_a_relaxed_threshold_never_raises_the_tier_threshold():
    assert adapted_threshold(ON, 0.3, UserRecord(100, 0)) == (
        0.3,
        "per-user: first model right on 100/100 of this user's images, escalates below 0.30 only",
    )


def test_accuracy_is_smoothed():
    assert UserRecord(0, 0).accuracy == 0.5
    assert UserRecord(2, 7).accuracy == pytest.approx(3 / 11)
    assert UserRecord(2, 7).feedback == 9
