"""Per-arm counts of experiments, kept in the state store: the router writes rows (with latency and users), the
`feedback` model writes right/wrong answers, the bandits read posteriors and `tierserve experiment report` reads
everything. The key layout lives here and nowhere else:

    exp:{experiment}:arms          hash  "{arm}|total|{metric}" and "{arm}|{bucket start}|{metric}", where metric is
                                         rows, feedback, correct or lat{i} (rows in latency bucket i)
    exp:{experiment}:posterior     hash  "{arm}|correct", "{arm}|wrong" (what the bandits read, kept small)
    exp:{experiment}:users:{arm}   zset  user hash -> when last seen (distinct users per arm)
    exp:{experiment}:shadow        hash  "{outcome}" and "lat{i}" for the shadow calls
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from tierserve.state_store import StateStore

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # upper bounds; one more bucket above 2000
TOTAL = "total"
_SEP = "|"


class ShadowOutcome(str, Enum):
    """How a shadow call compared with the answer the client got."""

    AGREE = "agree"
    DISAGREE = "disagree"
    ERROR = "error"
    DROPPED = "dropped"  # not sent: the shadow queue was full or the server under load


@dataclass(frozen=True)
class ArmRow:
    """One row answered in an experiment arm."""

    experiment: str
    arm: str
    user: str  # keyed hash of the user id, or ""
    latency_s: float
    at: float  # unix seconds


@dataclass(frozen=True)
class TimePoint:
    """One time bucket of an arm: rows answered and feedback received in it."""

    start: float  # unix seconds
    rows: int
    feedback: int
    correct: int
    p50_ms: float | None


@dataclass(frozen=True)
class ArmReport:
    arm: str
    users: int  # distinct users seen
    rows: int
    feedback: int
    correct: int
    latency_counts: tuple[int, ...]  # per LATENCY_BUCKETS_MS bucket, then the overflow bucket
    p50_ms: float | None  # estimated from the bucket counts; None without rows
    p99_ms: float | None
    timeline: tuple[TimePoint, ...]  # by start


@dataclass(frozen=True)
class ExperimentReport:
    experiment: str
    arms: tuple[ArmReport, ...]  # by arm name
    shadow: Mapping[str, int]  # shadow calls per ShadowOutcome value (shadow experiments only)
    shadow_p50_ms: float | None
    shadow_p99_ms: float | None


def latency_bucket(latency_s: float) -> int:
    """The index of the latency bucket (upper bound inclusive, as Prometheus's `le`); len(bounds) for overflow."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_s * 1000)


def quantile_ms(counts: Sequence[float], q: float) -> float | None:
    """The q-quantile estimated from bucket counts by linear interpolation within its bucket (Prometheus's
    histogram_quantile): the first bucket spans 0 to 1 ms; a quantile in the overflow bucket is reported as its lower
    bound, 2000 ms. None without counts."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0.0
    for index, count in enumerate(counts):
        if count > 0 and seen + count >= rank:
            if index == len(LATENCY_BUCKETS_MS):
                return float(LATENCY_BUCKETS_MS[-1])
            lower = 0.0 if index == 0 else float(LATENCY_BUCKETS_MS[index - 1])
            return lower + (LATENCY_BUCKETS_MS[index] - lower) * (rank - seen) / count
        seen += count
    return float(LATENCY_BUCKETS_MS[-1])


def _name(kind: str, name: str) -> str:
    if not name or _SEP in name or ":" in name:
        raise ValueError(f"{kind} name {name!r} must be non-empty, without '{_SEP}' or ':'")
    return name


class ExperimentStats:
    """Reads and writes experiment counts in `store`; time buckets of `bucket_s` seconds for the timeline."""

    def __init__(self, store: StateStore, bucket_s: float = 60.0) -> None:
        self.store = store
        self.bucket_s = bucket_s

    @staticmethod
    def _arms_key(experiment: str) -> str:
        return f"exp:{_name('experiment', experiment)}:arms"

    @staticmethod
    def _posterior_key(experiment: str) -> str:
        return f"exp:{_name('experiment', experiment)}:posterior"

    @staticmethod
    def _users_key(experiment: str, arm: str) -> str:
        return f"exp:{_name('experiment', experiment)}:users:{_name('arm', arm)}"

    @staticmethod
    def _shadow_key(experiment: str) -> str:
        return f"exp:{_name('experiment', experiment)}:shadow"

    def _bucket(self, at: float) -> float:
        """The start of the time bucket that holds `at`."""
        return math.floor(at / self.bucket_s) * self.bucket_s

    def record_rows(self, rows: Iterable[ArmRow]) -> None:
        """Count a batch of rows: one mark per arm for the users it saw, then one store.add for all of it (whole or
        not at all: a batch whose write failed can be recorded again without counting a row twice)."""
        cells: Counter[tuple[str, str, float, int]] = Counter()  # (experiment, arm, bucket, latency bucket)
        users: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        for row in rows:
            cells[row.experiment, row.arm, self._bucket(row.at), latency_bucket(row.latency_s)] += 1
            if row.user:
                seen = users[row.experiment, row.arm]
                seen[row.user] = max(row.at, seen.get(row.user, row.at))
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for (experiment, arm, bucket, latency), n in cells.items():
            fields = counts[self._arms_key(experiment)]
            for span in (TOTAL, _span(bucket)):
                fields[f"{_name('arm', arm)}{_SEP}{span}{_SEP}rows"] += n
                fields[f"{arm}{_SEP}{span}{_SEP}lat{latency}"] += n
        for (experiment, arm), seen in users.items():  # first: marks are idempotent, so a failed batch can be retried
            self.store.mark(self._users_key(experiment, arm), seen)
        if counts:
            self.store.add(counts)

    def record_shadow(self, experiment: str, outcome: ShadowOutcome | str, latency_s: float | None, at: float) -> None:
        """Count one shadow call (`at` is accepted for symmetry; shadow counts have no timeline)."""
        self.record_shadows(experiment, [(outcome, latency_s)])

    def record_shadows(self, experiment: str, rows: Iterable[tuple[ShadowOutcome | str, float | None]]) -> None:
        """Count mirrored rows of one experiment, each (outcome, latency of its call or None), in one write."""
        fields: Counter[str] = Counter()
        for outcome, latency_s in rows:
            fields[ShadowOutcome(outcome).value] += 1
            if latency_s is not None:
                fields[f"lat{latency_bucket(latency_s)}"] += 1
        if fields:
            self.store.add({self._shadow_key(experiment): {k: float(v) for k, v in fields.items()}})

    def record_feedback(self, experiment: str, arm: str, correct: bool, at: float) -> None:
        """Count one fed-back row of an arm: for the report (total and the bucket of `at`) and the posterior."""
        fields: dict[str, float] = {}
        for span in (TOTAL, _span(self._bucket(at))):
            fields[f"{_name('arm', arm)}{_SEP}{span}{_SEP}feedback"] = 1.0
            if correct:
                fields[f"{arm}{_SEP}{span}{_SEP}correct"] = 1.0
        self.store.add(
            {
                self._arms_key(experiment): fields,
                self._posterior_key(experiment): {f"{arm}{_SEP}{'correct' if correct else 'wrong'}": 1.0},
            }
        )

    def posteriors(self, experiments: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
        """Per experiment, per arm with feedback: the Beta(1 + correct, 1 + wrong) posterior of its accuracy."""
        keys = {experiment: self._posterior_key(experiment) for experiment in experiments}
        found = self.store.counts_many(list(keys.values()))
        posteriors: dict[str, dict[str, tuple[float, float]]] = {}
        for experiment, key in keys.items():
            per_arm: dict[str, dict[str, float]] = defaultdict(dict)
            for field, value in found[key].items():
                arm, outcome = field.rsplit(_SEP, 1)
                per_arm[arm][outcome] = value
            posteriors[experiment] = {
                arm: (1.0 + c.get("correct", 0.0), 1.0 + c.get("wrong", 0.0)) for arm, c in sorted(per_arm.items())
            }
        return posteriors

    def rows(self, experiment: str) -> int:
        """How many rows were counted for `experiment`, all arms together."""
        return sum(arm.rows for arm in self.report(experiment).arms)

    def report(self, experiment: str) -> ExperimentReport:
        """Everything counted for `experiment`, per arm and per time bucket."""
        found = self.store.counts_many([self._arms_key(experiment), self._shadow_key(experiment)])
        spans: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        for field, value in found[self._arms_key(experiment)].items():
            arm, span, metric = field.split(_SEP)
            spans[arm][span][metric] = value
        arms = []
        for arm in sorted(spans):
            total = spans[arm].pop(TOTAL, {})
            latency = _latency_counts(total)
            timeline = tuple(
                TimePoint(
                    start=float(start),
                    rows=round(metrics.get("rows", 0)),
                    feedback=round(metrics.get("feedback", 0)),
                    correct=round(metrics.get("correct", 0)),
                    p50_ms=quantile_ms(_latency_counts(metrics), 0.5),
                )
                for start, metrics in sorted(spans[arm].items(), key=lambda item: float(item[0]))
            )
            arms.append(
                ArmReport(
                    arm=arm,
                    users=self.store.size(self._users_key(experiment, arm)),
                    rows=round(total.get("rows", 0)),
                    feedback=round(total.get("feedback", 0)),
                    correct=round(total.get("correct", 0)),
                    latency_counts=latency,
                    p50_ms=quantile_ms(latency, 0.5),
                    p99_ms=quantile_ms(latency, 0.99),
                    timeline=timeline,
                )
            )
        shadow = found[self._shadow_key(experiment)]
        shadow_latency = _latency_counts(shadow)
        return ExperimentReport(
            experiment=experiment,
            arms=tuple(arms),
            shadow={o.value: round(shadow[o.value]) for o in ShadowOutcome if o.value in shadow},
            shadow_p50_ms=quantile_ms(shadow_latency, 0.5),
            shadow_p99_ms=quantile_ms(shadow_latency, 0.99),
        )

    def forget(self, experiment: str) -> None:
        """Delete everything counted for `experiment` (tests, and before re-using a name)."""
        fields = self.store.counts(self._arms_key(experiment))
        arms = {field.split(_SEP, 1)[0] for field in fields}
        self.store.delete(
            self._arms_key(experiment),
            self._posterior_key(experiment),
            self._shadow_key(experiment),
            *(self._users_key(experiment, arm) for arm in sorted(arms)),
        )


def _span(start: float) -> str:
    """A time bucket's start as a field name part: whole seconds without a decimal point."""
    return str(int(start)) if start == int(start) else repr(start)


def _latency_counts(metrics: Mapping[str, float]) -> tuple[int, ...]:
    return tuple(round(metrics.get(f"lat{i}", 0)) for i in range(len(LATENCY_BUCKETS_MS) + 1))
