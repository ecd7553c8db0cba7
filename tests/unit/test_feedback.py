"""Feedback: each REQUEST_ID is taken once, within the retention, with a label 0-9; it teaches the arms it was
answered in (not a shadow's) and the user's record; a refused request, whichever row, teaches nothing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from tierserve.experiment_spec import MIRRORED
from tierserve.experiment_stats import ExperimentStats
from tierserve.feedback import FeedbackBook, FeedbackRefused, Learned, Refusal
from tierserve.request_ids import RETENTION_S, IssuedRow, RequestIds, new_seeds, user_key
from tierserve.state_store import MemoryStore, shared_secret
from tierserve.user_adaptation import UserRecord, UserStates

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _altered(request_id: str) -> str:
    """The id with one character of its payload changed."""
    return request_id[:20] + ("B" if request_id[20] == "A" else "A") + request_id[21:]


@dataclass
class Book:
    clock: Clock
    store: MemoryStore
    ids: RequestIds
    stats: ExperimentStats
    users: UserStates
    book: FeedbackBook
    alice: str

    def issue(self, label: int = 3, first_label: int | None = 3, user: str | None = None, arms=None) -> str:
        row = IssuedRow(
            new_seeds(1)[0],
            NOW,
            self.alice if user is None else user,
            "standard",
            label,
            first_label,
            (("bandit", "light"), ("shadow", MIRRORED)) if arms is None else arms,
        )
        return self.ids.issue([row])[0]

    def learned_nothing(self) -> bool:
        return self.stats.posteriors(["bandit"]) == {"bandit": {}} and self.users.get([self.alice]) == {}


@pytest.fixture
def book() -> Book:
    clock = Clock()
    store = MemoryStore(clock=clock)
    ids = RequestIds(shared_secret(store))
    stats, users = ExperimentStats(store), UserStates(store, max_users=100)
    alice = user_key(shared_secret(store), "alice")
    return Book(clock, store, ids, stats, users, FeedbackBook(store, ids, stats, users), alice)


def test_feedback_teaches_the_arms_and_the_user(book: Book):
    # answered 3 on each row; the cascade's first model said 3, 5, 5; the true labels are 3, 5, 3
    rows = [book.issue(label=3, first_label=3), book.issue(label=3, first_label=5), book.issue(label=3, first_label=5)]
    learned = book.book.accept(rows, [3, 5, 3], NOW + 10)
    assert [arm.correct for arm in learned] == [True, False, True]
    assert {(arm.experiment, arm.arm) for arm in learned} == {("bandit", "light")}  # not the shadow's "mirrored"
    assert book.stats.posteriors(["bandit", "shadow"]) == {"bandit": {"light": (3.0, 2.0)}, "shadow": {}}
    assert book.users.get([book.alice]) == {book.alice: UserRecord(right=2, wrong=1)}
    report = book.stats.report("bandit")
    assert (report.arms[0].feedback, report.arms[0].correct) == (3, 2)


def test_rows_without_a_user_or_first_label_teach_only_the_arms(book: Book):
    book.book.accept([book.issue(user=""), book.issue(first_label=None)], np.array([3, 3]), NOW)
    assert book.users.get([book.alice]) == {}
    assert book.stats.posteriors(["bandit"]) == {"bandit": {"light": (3.0, 1.0)}}


def test_a_second_feedback_for_an_id_is_refused(book: Book):
    request_id = book.issue()
    book.book.accept([request_id], [3], NOW)
    with pytest.raises(FeedbackRefused, match="row 0: duplicate feedback for REQUEST_ID") as refused:
        book.book.accept([request_id], [4], NOW + 1)
    assert refused.value.why is Refusal.DUPLICATE
    assert book.stats.posteriors(["bandit"]) == {"bandit": {"light": (2.0, 1.0)}}, "the second label taught nothing"


def test_the_same_id_twice_in_one_request_is_refused_before_anything_is_learned(book: Book):
    request_id = book.issue()
    with pytest.raises(FeedbackRefused, match="row 2: duplicate feedback: row 0 of this request") as refused:
        book.book.accept([request_id, book.issue(), request_id], [3, 3, 3], NOW)
    assert refused.value.why is Refusal.DUPLICATE
    assert book.learned_nothing()
    book.book.accept([request_id], [3], NOW)  # nothing was claimed either


@pytest.mark.parametrize(
    ("bad_row", "why", "message"),
    [
        (
            lambda b: (_altered(b.issue()), 3),
            Refusal.UNKNOWN,
            "row 1: unknown REQUEST_ID '.*': not issued by this server",
        ),
        (lambda b: ("garbage", 3), Refusal.UNKNOWN, "row 1: unknown REQUEST_ID 'garbage'"),
        (lambda b: (b.issue(), 12), Refusal.LABEL, "row 1: LABEL outside 0-9: expected a digit, got 12"),
        (lambda b: (b.issue(), -1), Refusal.LABEL, "row 1: LABEL outside 0-9"),
        (lambda b: (b.issue(), True), Refusal.LABEL, "row 1: LABEL outside 0-9"),
    ],
)
def test_a_refused_row_refuses_the_request_and_nothing_is_learned(book: Book, bad_row, why: Refusal, message: str):
    request_id, label = bad_row(book)
    good, later = book.issue(), book.issue()
    with pytest.raises(FeedbackRefused, match=message) as refused:
        book.book.accept([good, request_id, later], [3, label, 3], NOW)
    assert (refused.value.why, refused.value.row) == (why, 1)
    assert book.learned_nothing()
    book.book.accept([good, later], [3, 3], NOW)  # the good rows were not claimed: they can still be sent


def test_an_expired_id_is_refused(book: Book):
    request_id = book.issue()
    with pytest.raises(FeedbackRefused, match=r"row 0: expired REQUEST_ID .*: issued 8\.0 days ago") as refused:
        book.book.accept([request_id], [3], NOW + 8 * 86400)
    assert refused.value.why is Refusal.EXPIRED


def test_a_claim_lost_to_a_concurrent_request_says_the_earlier_rows_were_recorded(book: Book):
    first, second = book.issue(), book.issue()
    book.store.set(f"feedback:{book.ids.read(second, NOW).seed}", b"1")  # another request claimed it meanwhile
    with pytest.raises(FeedbackRefused, match=r"row 1: duplicate .* row 0 of this request was recorded") as refused:
        book.book.accept([first, second], [3, 3], NOW)
    assert refused.value.learned == (Learned("bandit", "light", True),)
    assert book.stats.posteriors(["bandit"]) == {"bandit": {"light": (2.0, 1.0)}}


def test_a_claim_lasts_as_long_as_its_id_is_valid(book: Book):
    request_id = book.issue()
    book.book.accept([request_id], [3], NOW + 60)
    book.clock.now = NOW + RETENTION_S  # the id's last valid second: still claimed
    with pytest.raises(FeedbackRefused, match="duplicate"):
        book.book.accept([request_id], [3], NOW + RETENTION_S)


def test_mismatched_lengths_are_a_malformed_request(book: Book):
    with pytest.raises(ValueError, match="1 REQUEST_IDs but 2 LABELs"):
        book.book.accept([book.issue()], [3, 3], NOW)
