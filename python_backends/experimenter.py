"""Experiments and per-user adaptation for one router instance: who is in which arm, what that changes for the
row, the REQUEST_ID and ARMS of each answer, and the per-arm counts the report and the bandits read.

Pure Python (no Triton): the router glue calls `plan` before routing a batch and `finish` after it. Nothing here
writes to the state store on the hot path: per-arm rows are queued and written by `flush`, which the glue calls
from a background thread; posteriors and user records are read at most once per REFRESH_S.

A store that fails is no outage: `plan` answers from the posteriors and user records it read last (the bandits
freeze), and `flush` keeps the rows it could not write (up to MAX_PENDING_ROWS) for the next flush.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tierserve.assignment import Assigner, Assignment, Unit
from tierserve.experiment_spec import (
    MIRRORED,
    ExperimentsFile,
    experiments_json,
    load_experiments,
    parse_experiments,
)
from tierserve.experiment_stats import ArmRow, ExperimentStats, ShadowOutcome
from tierserve.policy import Policy
from tierserve.replay_tokens import ReplayRow
from tierserve.request_ids import IssuedRow, RequestIds, new_seeds, user_key
from tierserve.routing import BASE, Answer, Variant
from tierserve.signature import RequestContext
from tierserve.state_store import SECRET_KEY, StateStore, StateStoreError, shared_secret
from tierserve.user_adaptation import UserRecord, UserStates, adapted_cascade

REFRESH_S = 1.0  # posteriors and user records are at most this old
EXPERIMENTS_PARAMETER = "experiments"  # the router config parameter `tierserve experiment apply` loads it with
EXPERIMENTS_KEY = "experiments"  # the experiments the routers serve (JSON), as last applied or read from the file
EXPERIMENTS_FILE_KEY = "experiments:file_sha256"  # the repository file's digest when it was last taken
MAX_PENDING_ROWS = 100_000  # per-arm rows waiting for `flush`; beyond this they are dropped (and counted)
USER_CACHE = 10_000  # user records an instance keeps between reads


def next_revision(spec: ExperimentsFile, clock: Callable[[], float] = time.time) -> ExperimentsFile:
    """`spec` with a revision above its own and above every earlier one (microseconds since the epoch): what
    `tierserve experiment apply` serves, so that every server's routers take it over what they serve."""
    return spec.model_copy(update={"revision": max(int(clock() * 1_000_000), spec.revision + 1)})


def stored_experiments(store: StateStore, policy: Policy) -> ExperimentsFile | None:
    """The experiments the store holds (None when none); ExperimentSpecError if they do not validate against
    `policy`."""
    stored = store.get(EXPERIMENTS_KEY)
    return None if stored is None else parse_experiments(json.loads(stored), policy)


def served_experiments(
    store: StateStore, policy: Policy, repository_file: Path, applied: str | None
) -> tuple[ExperimentsFile, str]:
    """The experiments to serve and where they came from: `applied` (a config parameter set by `tierserve experiment
    apply`) unless the store holds a higher revision (applied on another server since, or this parameter is a stale
    one a reload kept), else the repository file when it changed since it was last taken, else what the store holds
    (applied earlier: it outlives a restart), else the file. What is taken anew (applied, or the file, given a
    revision above the store's) is written to the store, for `list` and for the routers of every server, which
    follow it (`ExperimentsFollower`). ExperimentSpecError names the bad key; nothing is written then."""
    file_digest = hashlib.sha256(repository_file.read_bytes()).hexdigest() if repository_file.exists() else ""
    stored = stored_experiments(store, policy)
    file_changed = (store.get(EXPERIMENTS_FILE_KEY) or b"").decode() != file_digest
    newest = -1 if stored is None else stored.revision
    taken: ExperimentsFile | None = None
    if applied is not None and (spec := parse_experiments(json.loads(applied), policy)).revision > newest:
        taken, source = spec, "applied"
    elif stored is not None and (applied is not None or not file_changed):
        return stored, "state store" if applied is None else "state store (a newer revision than the applied one)"
    elif repository_file.exists():
        taken, source = load_experiments(repository_file, policy), str(repository_file.name)
    else:
        taken, source = ExperimentsFile(), "none"
    if taken.revision <= newest:
        taken = taken.model_copy(update={"revision": newest + 1})
    store.set(EXPERIMENTS_KEY, experiments_json(taken).encode())
    store.set(EXPERIMENTS_FILE_KEY, file_digest.encode())
    return taken, source


class ExperimentsFollower:
    """Watches the experiments in the store for a higher revision than a router instance serves: how an apply on one
    server reaches the routers of every server sharing the store. One stored value is the whole set, so a router
    takes all of a new revision or none of it."""

    def __init__(self, store: StateStore, policy: Policy, serving: ExperimentsFile) -> None:
        self.store = store
        self.policy = policy
        self.revision = serving.revision
        self._seen: bytes | None = None

    def newer(self) -> ExperimentsFile | None:
        """The stored experiments when their revision is above the one served (then served from now on), else None.
        ExperimentSpecError (once per stored value) when they do not validate here: the served ones stay;
        StateStoreError when the store fails."""
        stored = self.store.get(EXPERIMENTS_KEY)
        if stored is None or stored == self._seen:
            return None
        self._seen = stored
        spec = parse_experiments(json.loads(stored), self.policy)
        if spec.revision <= self.revision:
            return None
        self.revision = spec.revision
        return spec


@dataclass(frozen=True)
class RowPlan:
    """What experiments and adaptation decided for one row before it was routed."""

    seed: int
    user: str  # keyed hash of the user id, "" without one
    assignments: tuple[Assignment, ...]
    variant: Variant
    replayed: bool = False  # re-sent by `tierserve replay`: counted for no experiment, mirrored nowhere, not logged

    @property
    def arms(self) -> str:
        """The ARMS output: experiment=arm pairs joined by ',' ("" when in none)."""
        return ",".join(f"{a.experiment}={a.arm}" for a in self.assignments)

    @property
    def shadow_to(self) -> list[tuple[str, str]]:
        """(experiment, candidate) for each shadow experiment mirroring this row."""
        return [(a.experiment, a.shadow_to) for a in self.assignments if a.shadow_to]


@dataclass(frozen=True)
class _Serving:
    """The experiments a router instance serves, as one value: a batch is planned with one of them, whole."""

    spec: ExperimentsFile
    assigner: Assigner
    bandits: tuple[str, ...]
    stored: bytes  # as written to the state store

    @classmethod
    def of(cls, spec: ExperimentsFile) -> _Serving:
        bandits = tuple(e.name for e in spec.experiments if e.kind == "bandit")
        return cls(spec, Assigner(spec), bandits, experiments_json(spec).encode())


class Experimenter:
    """One router instance's experiments, bandit posteriors and per-user records, all kept in `store`."""

    def __init__(
        self,
        spec: ExperimentsFile,
        policy: Policy,
        store: StateStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.stats = ExperimentStats(store)
        self.users = UserStates(store, policy.adaptation.max_users)
        self.store = store
        self.secret = shared_secret(store)
        self.ids = RequestIds(self.secret)
        self.clock = clock
        self._serving = _Serving.of(spec)
        self._posteriors: dict[str, dict[str, tuple[float, float]]] = {}
        self._posteriors_at = float("-inf")
        self._records: dict[str, tuple[UserRecord | None, float]] = {}
        self._pending: list[ArmRow] = []
        self._shadowed: dict[str, list[tuple[ShadowOutcome, float | None]]] = {}
        self._lock = threading.Lock()
        self.dropped_rows = 0  # per-arm rows not counted because `flush` fell behind

    def plan(
        self, contexts: Sequence[RequestContext], adapt: bool, replays: Sequence[ReplayRow | None] = ()
    ) -> list[RowPlan]:
        """Each row's seed, arms and variant. `adapt` is False under load: the global policy answers then. A row
        with a ReplayRow (`tierserve replay`) is decided from its logged seed and user hash instead."""
        seeds = new_seeds(len(contexts))
        hashes = {c.user_id: user_key(self.secret, c.user_id) for c in contexts}
        rows = list(replays) or [None] * len(contexts)
        users = [hashes[c.user_id] if r is None else r.user for c, r in zip(contexts, rows, strict=True)]
        serving = self._serving
        posteriors = self._current_posteriors(serving.bandits)
        adapting = adapt and self.policy.adaptation.enabled
        records = self._user_records(sorted({u for u in users if u})) if adapting else {}
        plans = []
        for context, seed, user, replay in zip(contexts, seeds, users, rows, strict=True):
            seed = seed if replay is None else replay.seed
            unit = Unit(context.tier, user, context.attributes, seed)
            assignments = tuple(serving.assigner.assign(unit, posteriors))
            changes = Assigner.changes(assignments)
            reasons = [a.reason for a in assignments]
            threshold, escalate_when = changes.thresholds.get(context.tier), changes.escalate_when
            if adapting and user:
                base = self.policy.cascade.thresholds[context.tier] if threshold is None else threshold
                escalates = escalate_when or self.policy.cascade.escalate_when
                if (adapted := adapted_cascade(self.policy.adaptation, base, escalates, records.get(user))) is not None:
                    threshold, escalate_when = adapted.threshold, adapted.escalate_when or escalate_when
                    reasons.append(adapted.reason)
            variant = (
                Variant(dict(changes.models), threshold, escalate_when, tuple(reasons))
                if reasons  # an arm or per-user adaptation
                else BASE
            )
            plans.append(RowPlan(seed, user, assignments, variant, replayed=replay is not None))
        return plans

    def finish(
        self,
        plans: Sequence[RowPlan],
        answers: Sequence[Answer],
        contexts: Sequence[RequestContext],
        latencies_s: Sequence[float],
    ) -> list[str]:
        """The REQUEST_ID of each answered row; the rows of experiment arms are queued for `flush`."""
        now = self.clock()
        issued, arm_rows = [], []
        for plan, answer, context, latency in zip(plans, answers, contexts, latencies_s, strict=True):
            arms = tuple((a.experiment, a.arm) for a in plan.assignments)
            issued.append(
                IssuedRow(plan.seed, now, plan.user, context.tier, int(answer.probs.argmax()), answer.first_label, arms)
            )
            if not plan.replayed:
                arm_rows.extend(ArmRow(e, arm, plan.user, latency, now) for e, arm in arms if arm != MIRRORED)
        if arm_rows:
            with self._lock:
                room = MAX_PENDING_ROWS - len(self._pending)
                self._pending.extend(arm_rows[: max(room, 0)])
                self.dropped_rows += max(len(arm_rows) - max(room, 0), 0)
        return self.ids.issue(issued)

    def shadowed(self, experiment: str, outcomes: Sequence[ShadowOutcome], latency_s: float | None) -> None:
        """Queue mirrored rows' outcomes for `flush` (latency None: the call was not made or failed)."""
        with self._lock:
            queued = self._shadowed.setdefault(experiment, [])
            if len(queued) < MAX_PENDING_ROWS:
                queued.extend((outcome, latency_s) for outcome in outcomes)

    def flush(self) -> None:
        """Write the queued per-arm rows and shadow outcomes to the store; called off the hot path. When the store
        fails, what was not written is queued again (rows beyond MAX_PENDING_ROWS are dropped and counted) and the
        StateStoreError raised. Each write is whole or not at all (one MULTI/EXEC), so none is counted twice."""
        with self._lock:
            rows, self._pending = self._pending, []
            shadowed, self._shadowed = self._shadowed, {}
        try:
            if rows:
                self.stats.record_rows(rows)
                rows = []
            while shadowed:
                experiment, outcomes = next(iter(shadowed.items()))
                self.stats.record_shadows(experiment, outcomes)
                del shadowed[experiment]
        finally:
            if rows or shadowed:
                self._queue_again(rows, shadowed)

    def _queue_again(self, rows: list[ArmRow], shadowed: dict[str, list[tuple[ShadowOutcome, float | None]]]) -> None:
        with self._lock:
            kept = (rows + self._pending)[:MAX_PENDING_ROWS]
            self.dropped_rows += len(rows) + len(self._pending) - len(kept)
            self._pending = kept
            for experiment, outcomes in shadowed.items():
                queued = self._shadowed.setdefault(experiment, [])
                queued[:0] = outcomes[: max(MAX_PENDING_ROWS - len(queued), 0)]

    def restore_shared(self) -> None:
        """Write back what every server must agree on when the store lost it (a Redis restarted without its data):
        the shared secret and the experiments this instance serves, each only where absent (SET NX)."""
        self.store.set(SECRET_KEY, self.secret, only_if_absent=True)
        self.store.set(EXPERIMENTS_KEY, self._serving.stored, only_if_absent=True)

    def serve(self, spec: ExperimentsFile) -> None:
        """Serve `spec` from the next batch on (a newer revision another server applied); the per-arm counts queued
        so far are kept, and the posteriors are read afresh for its bandits."""
        self._serving = _Serving.of(spec)
        self._posteriors_at = float("-inf")

    def _current_posteriors(self, bandits: tuple[str, ...]) -> dict[str, dict[str, tuple[float, float]]]:
        if bandits and time.monotonic() - self._posteriors_at >= REFRESH_S:
            self._posteriors_at = time.monotonic()
            with contextlib.suppress(StateStoreError):  # the bandits freeze on the posteriors read last
                self._posteriors = self.stats.posteriors(list(bandits))
        return self._posteriors

    def _user_records(self, users: list[str]) -> dict[str, UserRecord]:
        now = time.monotonic()
        stale = [u for u in users if now - self._records.get(u, (None, float("-inf")))[1] >= REFRESH_S]
        if stale:
            try:
                fresh = self.users.get(stale)
            except StateStoreError:  # the records read last still hold; a user never read has none for now
                fresh, stale = {}, [u for u in stale if u not in self._records]
            for user in stale:
                self._records[user] = (fresh.get(user), now)
            if len(self._records) > USER_CACHE:  # a bound on this cache, not on the users the store holds
                self._records = {u: self._records[u] for u in users}
        return {u: record for u in users if (record := self._records[u][0]) is not None}
