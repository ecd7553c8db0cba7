"""Feedback on answers: a client sends back the REQUEST_ID of a digits answer and the true label. Each id is taken
once, within request_ids.RETENTION_S; it teaches the bandits (right or wrong per experiment arm) and per-user
adaptation (was the cascade's first model right on this user's image).

A request is checked whole before anything is learned: one refused row refuses the request, naming the row.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from tierserve.experiment_spec import MIRRORED
from tierserve.experiment_stats import ExperimentStats
from tierserve.pixels import NUM_CLASSES
from tierserve.request_ids import ExpiredRequestId, IssuedRow, RequestIds, UnknownRequestId, shown_id
from tierserve.state_store import StateStore, StateStoreError
from tierserve.user_adaptation import UserStates

CLAIM_MARGIN_S = 3600.0  # a claim outlives its id's retention by this much (clocks of several processes differ)


class Refusal(Enum):
    """Why feedback was refused (also the `why` label of tierserve_feedback_refused_total)."""

    UNKNOWN = "unknown"  # the REQUEST_ID was not issued by this server
    EXPIRED = "expired"  # issued longer ago than the retention
    DUPLICATE = "duplicate"  # feedback for that id was taken already
    LABEL = "label"  # LABEL is not a digit 0-9
    UNAVAILABLE = "unavailable"  # the state store does not answer: nothing is taken, the client sends it again later


@dataclass(frozen=True)
class Learned:
    """One experiment arm taught by a fed-back row."""

    experiment: str
    arm: str
    correct: bool


class FeedbackRefused(ValueError):
    """A request's feedback is refused; the message says which row and why."""

    def __init__(self, why: Refusal, row: int, message: str, learned: Sequence[Learned] = ()) -> None:
        super().__init__(f"row {row}: {message}")
        self.why = why
        self.row = row
        self.learned = tuple(learned)  # what earlier rows taught before a claim was lost to a concurrent request


class FeedbackBook:
    """Takes feedback: checks it, claims each REQUEST_ID once in the store, and teaches stats and user records."""

    def __init__(self, store: StateStore, ids: RequestIds, stats: ExperimentStats, users: UserStates) -> None:
        self.store = store
        self.ids = ids
        self.stats = stats
        self.users = users

    def accept(self, request_ids: Sequence[str], labels: Sequence[int], now: float) -> list[Learned]:
        """Learn from every row, or raise FeedbackRefused for the first row refused. Rows are checked before any is
        claimed, so a refused request taught nothing; only a claim lost to a concurrent request for the same id
        stops part way (the message then says which earlier rows were recorded). Returns what the arms learned."""
        if len(request_ids) != len(labels):
            raise ValueError(f"{len(request_ids)} REQUEST_IDs but {len(labels)} LABELs; send one of each per row")
        rows = [
            self._checked(index, request_id, label, now)
            for index, (request_id, label) in enumerate(zip(request_ids, labels, strict=True))
        ]
        first_row: dict[int, int] = {}
        for index, row in enumerate(rows):
            if (earlier := first_row.setdefault(row.seed, index)) != index:
                raise FeedbackRefused(
                    Refusal.DUPLICATE,
                    index,
                    f"duplicate feedback: row {earlier} of this request has the same REQUEST_ID",
                )
        learned: list[Learned] = []
        for index, (row, label) in enumerate(zip(rows, labels, strict=True)):
            ttl_s = self.ids.retention_s - (now - row.issued_at) + CLAIM_MARGIN_S
            recorded = {0: "", 1: "; row 0 of this request was recorded"}.get(
                index, f"; rows 0-{index - 1} of this request were recorded"
            )
            try:
                if not self.store.set(f"feedback:{row.seed}", b"1", ttl_s=ttl_s, only_if_absent=True):
                    raise FeedbackRefused(
                        Refusal.DUPLICATE,
                        index,
                        f"duplicate feedback for REQUEST_ID {shown_id(request_ids[index])}: "
                        f"an answer takes feedback once{recorded}",
                        learned,
                    )
                learned.extend(self._learn(row, int(label), now))
            except StateStoreError:
                raise FeedbackRefused(
                    Refusal.UNAVAILABLE,
                    index,
                    f"the state store is unavailable, so this feedback was not taken{recorded}; send it again later",
                    learned,
                ) from None
        return learned

    def _checked(self, index: int, request_id: str, label: int, now: float) -> IssuedRow:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < NUM_CLASSES:
            raise FeedbackRefused(Refusal.LABEL, index, f"LABEL outside 0-9: expected a digit, got {label!r}")
        try:
            return self.ids.read(request_id, now)
        except UnknownRequestId as error:
            raise FeedbackRefused(Refusal.UNKNOWN, index, str(error)) from None
        except ExpiredRequestId as error:
            raise FeedbackRefused(Refusal.EXPIRED, index, str(error)) from None

    def _learn(self, row: IssuedRow, label: int, now: float) -> list[Learned]:
        # a mirrored row was answered by the base route: the shadow candidate's answer is not what was fed back on
        learned = [Learned(e, arm, label == row.label) for e, arm in row.arms if arm != MIRRORED]
        for arm in learned:
            self.stats.record_feedback(arm.experiment, arm.arm, arm.correct, now)
        if row.user and row.first_label is not None:
            self.users.record(row.user, row.first_label == label, now)
        return learned
