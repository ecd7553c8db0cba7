"""Per-user adaptation of the cascade: how often the cascade's first model was right on a user's fed-back images,
and the escalation threshold that follows for that user's rows (every row escalates, a stricter threshold, the
tier's own, or a relaxed one).

Users are known only by their keyed hash (request_ids.user_key). Each has a hash `user:{hash}` (right, wrong) in the
state store, and a score in the sorted set `users:seen` (when last seen); beyond `max_users` the least recently seen
are forgotten. In SQLite a user takes about BYTES_PER_USER bytes, so the default 100,000 users take about 16 MB.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from tierserve.policy import AdaptationSettings
from tierserve.state_store import StateStore

SEEN_KEY = "users:seen"
ESCALATE_ALL = 1.01  # a threshold above any confidence: every row escalates
# Store bytes per user in SQLite with both right and wrong counted, measured over 10,000 users by
# tests/unit/test_user_adaptation.py, which fails when the measurement drifts more than 25% from this
BYTES_PER_USER = 160


@dataclass(frozen=True)
class UserRecord:
    """The cascade's first model on this user's fed-back images."""

    right: int
    wrong: int

    @property
    def feedback(self) -> int:
        return self.right + self.wrong

    @property
    def accuracy(self) -> float:
        """Beta(1, 1)-smoothed: a user with little feedback sits near 0.5, not at 0 or 1."""
        return (self.right + 1) / (self.feedback + 2)


def _user_key(user: str) -> str:
    return f"user:{user}"


class UserStates:
    """Per-user records in `store`, at most `max_users` of them."""

    def __init__(self, store: StateStore, max_users: int) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be at least 1, got {max_users}")
        self.store = store
        self.max_users = max_users

    def record(self, user: str, first_right: bool, now: float) -> None:
        """Count one fed-back row of `user` and mark them seen; forget the least recently seen beyond max_users."""
        if not user:
            raise ValueError("a user record needs a user (the keyed hash of a user id)")
        self.store.add({_user_key(user): {"right" if first_right else "wrong": 1.0}})
        self.store.mark(SEEN_KEY, {user: now})
        if (excess := self.store.size(SEEN_KEY) - self.max_users) > 0:
            forgotten = [member for member, _ in self.store.members(SEEN_KEY, limit=excess)]
            self.store.unmark(SEEN_KEY, forgotten)
            self.store.delete(*map(_user_key, forgotten))

    def get(self, users: Iterable[str]) -> dict[str, UserRecord]:
        """The records of those `users` that have one."""
        wanted = [user for user in dict.fromkeys(users) if user]
        found = self.store.counts_many([_user_key(user) for user in wanted])
        return {
            user: UserRecord(round(counts.get("right", 0)), round(counts.get("wrong", 0)))
            for user in wanted
            if (counts := found[_user_key(user)])
        }


class Adjustment(enum.Enum):
    """How a user's record changes their cascade (the name the benchmark's report counts users by)."""

    ESCALATE_ALL = "every row escalates"  # the first model is of no use for this user's images
    STRICTER = "stricter"  # escalates below stricter_threshold; the learned router's doubt still escalates
    RELAXED = "relaxed"  # escalates below relaxed_threshold; the learned router's doubt still escalates


@dataclass(frozen=True)
class Adapted:
    """A user's cascade, as their record makes it: the threshold for their rows, what escalates them (None: as the
    row's arm or the policy says), and the REASON clause saying why."""

    adjustment: Adjustment
    threshold: float
    reason: str
    escalate_when: str | None = None


def adapted_cascade(
    settings: AdaptationSettings, threshold: float, escalate_when: str, record: UserRecord | None
) -> Adapted | None:
    """How a user's record changes the cascade for their row whose tier (or arm) escalates below `threshold` as
    `escalate_when` says, or None when it changes nothing (adaptation off, no record, too little feedback, an
    ordinary accuracy, or a threshold where only the learned router's doubt escalates). A stricter threshold never
    lowers the tier's, a relaxed one never raises it; every row escalates on a threshold above any confidence."""
    if not settings.enabled or record is None or record.feedback < settings.min_feedback:
        return None
    seen = f"per-user: first model right on {record.right}/{record.feedback} of this user's images"
    if record.accuracy < settings.escalate_all_below:
        return Adapted(Adjustment.ESCALATE_ALL, ESCALATE_ALL, f"{seen}, every row escalates", "threshold")
    if escalate_when == "learned":
        return None
    if record.accuracy < settings.stricter_below:
        stricter = max(threshold, settings.stricter_threshold)
        return Adapted(Adjustment.STRICTER, stricter, f"{seen}, escalates below {stricter:.2f}")
    if record.accuracy > settings.relax_above:
        relaxed = min(threshold, settings.relaxed_threshold)
        return Adapted(Adjustment.RELAXED, relaxed, f"{seen}, escalates below {relaxed:.2f}")
    return None
