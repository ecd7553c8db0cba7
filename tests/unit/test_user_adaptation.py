"""Per-user adaptation: records bounded by max_users (least recently seen forgotten), their size in SQLite, and the
threshold a user's record leads to."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierserve.experiment_spec import parse_experiments
from tierserve.experimenter import Experimenter
from tierserve.policy import AdaptationSettings, Policy
from tierserve.request_ids import user_key
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.routing import BASE, Variant
from tierserve.signature import RequestContext
from tierserve.state_store import MemoryStore, SqliteStore, StateStore, shared_secret
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.user_adaptation import (
    BYTES_PER_USER,
    ESCALATE_ALL,
    Adapted,
    Adjustment,
    UserRecord,
    UserStates,
    adapted_cascade,
)

POLICY = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
ON = AdaptationSettings(
    enabled=True,
    min_feedback=5,
    escalate_all_below=0.5,
    stricter_below=0.8,
    stricter_threshold=0.98,
    relax_above=0.97,
    relaxed_threshold=0.5,
)


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
            UserRecord(2, 7),  # 3/11 = 0.27
            Adapted(
                Adjustment.ESCALATE_ALL,
                ESCALATE_ALL,
                "per-user: first model right on 2/9 of this user's images, every row escalates",
                "threshold",
            ),
        ),
        (
            ON,
            UserRecord(6, 4),  # 7/12 = 0.58: above escalate_all_below, below stricter_below
            Adapted(
                Adjustment.STRICTER,
                0.98,
                "per-user: first model right on 6/10 of this user's images, escalates below 0.98",
            ),
        ),
        (
            ON,
            UserRecord(40, 0),
            Adapted(
                Adjustment.RELAXED,
                0.5,
                "per-user: first model right on 40/40 of this user's images, escalates below 0.50",
            ),
        ),
        (ON, UserRecord(30, 0), None),  # 31/32 = 0.969: not above relax_above once smoothed
        (ON, UserRecord(9, 1), None),  # 10/12 = 0.83: ordinary
    ],
)
def test_adapted_cascade(settings: AdaptationSettings, record: UserRecord | None, expected: Adapted | None):
    assert adapted_cascade(settings, 0.9, "either", record) == expected


def test_a_stricter_threshold_never_lowers_the_tier_threshold_nor_a_relaxed_one_raises_it():
    assert adapted_cascade(ON, 0.99, "either", UserRecord(6, 4)) == Adapted(
        Adjustment.STRICTER, 0.99, "per-user: first model right on 6/10 of this user's images, escalates below 0.99"
    )
    assert adapted_cascade(ON, 0.3, "either", UserRecord(100, 0)) == Adapted(
        Adjustment.RELAXED,
        0.3,
        "per-user: first model right on 100/100 of this user's images, escalates below 0.30",
    )


def test_where_only_the_learned_routers_doubt_escalates_a_threshold_changes_nothing_but_every_row_still_escalates():
    assert adapted_cascade(ON, 0.9, "learned", UserRecord(6, 4)) is None  # stricter
    assert adapted_cascade(ON, 0.9, "learned", UserRecord(40, 0)) is None  # relaxed
    assert adapted_cascade(ON, 0.9, "learned", UserRecord(2, 7)) == Adapted(
        Adjustment.ESCALATE_ALL,
        ESCALATE_ALL,
        "per-user: first model right on 2/9 of this user's images, every row escalates",
        "threshold",
    )
    assert adapted_cascade(ON, 0.9, "both", UserRecord(6, 4)).threshold == 0.98  # the threshold still counts there


def test_accuracy_is_smoothed():
    assert UserRecord(0, 0).accuracy == 0.5
    assert UserRecord(2, 7).accuracy == pytest.approx(3 / 11)
    assert UserRecord(2, 7).feedback == 9


def _planned(
    records: dict[str, tuple[int, int]], experiments: tuple[dict, ...] = (), adapt: bool = True
) -> list[Variant]:
    """The variant the router's Experimenter plans for one standard row of each user in `records` (right, wrong: the
    user's fed-back rows) and of a stranger without a record, in that order, with the shipped policy."""
    store = MemoryStore()
    experimenter = Experimenter(parse_experiments({"experiments": list(experiments)}, POLICY), POLICY, store)
    users, secret = UserStates(store, POLICY.adaptation.max_users), shared_secret(store)
    for user, (right, wrong) in records.items():
        for correct in [True] * right + [False] * wrong:
            users.record(user_key(secret, user), correct, 1.0)
    contexts = [RequestContext("standard", user) for user in [*records, "stranger"]]
    return [plan.variant for plan in experimenter.plan(contexts, adapt)]


def test_a_users_record_sets_their_rows_cascade_in_the_router():
    """Through the Experimenter the router plans with: a stricter or a relaxed user gets their own threshold and keeps
    the learned router's doubt; a user without a record (or with adaptation skipped) gets the policy's."""
    records = {"shifted": (7, 5), "clean": (40, 0)}
    stricter, relaxed, stranger = _planned(records)
    stricter_threshold, relaxed_threshold = POLICY.adaptation.stricter_threshold, POLICY.adaptation.relaxed_threshold
    assert (stricter.threshold, stricter.escalate_when) == (stricter_threshold, None)
    assert stricter.reasons == (
        f"per-user: first model right on 7/12 of this user's images, escalates below {stricter_threshold:.2f}",
    )
    assert (relaxed.threshold, relaxed.escalate_when) == (relaxed_threshold, None)
    assert relaxed.reasons == (
        f"per-user: first model right on 40/40 of this user's images, escalates below {relaxed_threshold:.2f}",
    )
    assert stranger == BASE
    assert all(variant == BASE for variant in _planned(records, adapt=False)), "skipped under load"


def test_every_row_of_a_user_the_first_model_is_no_use_for_escalates_whatever_an_arm_says():
    """An arm that escalates on the learned router's doubt alone would ignore the threshold above any confidence; a
    stricter or relaxed threshold, which it ignores too, is not applied nor claimed."""
    doubt_only = {
        "name": "doubt_only",
        "kind": "split",
        "arms": [
            {"name": "policy", "weight": 0},
            {"name": "learned", "weight": 100, "cascade": {"escalate_when": "learned"}},
        ],
    }
    contrarian, sometimes, stranger = _planned({"contrarian": (0, 10), "sometimes": (7, 7)}, (doubt_only,))
    assert (contrarian.threshold, contrarian.escalate_when) == (ESCALATE_ALL, "threshold"), contrarian
    # a stricter threshold would change nothing in this arm: REASON does not claim it
    assert (sometimes.threshold, sometimes.escalate_when) == (None, "learned"), sometimes
    assert not any("per-user" in reason for reason in sometimes.reasons), sometimes.reasons
    assert stranger.escalate_when == "learned", "the arm holds for everyone else"
