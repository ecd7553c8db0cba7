"""Route a batch of rows through the policy: shedding, rules, the confidence cascade, chains and breakers.

Under load, rows of lower tiers are shed or degraded first. Each remaining row walks hops: the route
the policy picks, maybe an escalation, and on a failed, timed-out or ejected model the next one in that
route's chain; a tier with a reserved lane is served by the lane. Every round sends one call per model
with the rows that need it concatenated, and all models of a round are called concurrently. Every
call is bounded by the tightest remaining deadline of its rows (the request's deadline_ms or its
tier's SLO) and the policy's call timeout. The router never calls a model outside the policy, and
never calls a model whose circuit breaker is open, but for the safe default when a row has nothing else (Envoy's
panic routing: an ejected last resort may answer; refusing the row surely fails it).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tierserve.circuit_breaker import CircuitBreaker
from tierserve.learned_router import LearnedRouter, escalation_inputs
from tierserve.load_shedding import DEGRADE, SHED, LoadMonitor
from tierserve.model_states import ModelStates
from tierserve.policy import Policy
from tierserve.signature import TIERS, Signature


class ModelCallError(RuntimeError):
    """A downstream model answered with an error."""


class ModelTimeout(ModelCallError):
    """A downstream model did not answer in time."""


class ModelDown(ModelCallError):
    """A downstream model cannot answer until it is restored (e.g. its process died): eject it at once."""


class ModelRefused(ModelCallError):
    """A downstream model refused the rows' input (INVALID_ARG): the input's fault, not the model's."""


# A timeout counts against a model only when the call had ample time: at least this many times the
# model's moving-average latency, and at least FAIR_TIMEOUT_FLOOR_S. A call cut short by a client's own
# tight deadline says nothing about the model, and must not eject it for everyone.
FAIR_TIMEOUT_FACTOR = 4.0
FAIR_TIMEOUT_FLOOR_S = 0.02
# ... while the average is this recent: only answers refresh it, so after a slow spell it would excuse, for good,
# every timeout of a model that then hangs. Once no call has been answered for this long, the floor alone judges.
FAIR_ESTIMATE_MAX_AGE_S = 5.0
# An escalation skipped because the target's measured latency would not fit the budget is tried again once the
# measurement is this old, so that a single slow call does not end escalations for good.
LATENCY_STALE_S = 1.0


class Failure(enum.Enum):
    """Why a hop gave no usable answer for a row."""

    ERROR = "error"  # the model failed the call
    TIMEOUT = "timeout"  # no answer within the call's bound
    REFUSED = "refused"  # the model refused the input
    NON_FINITE = "non_finite"  # the model answered with NaN or infinite probabilities for this row


@dataclass(frozen=True)
class HopFailure:
    """A failed hop for one row: its kind (for PATH and the next step) and the message (for REASON)."""

    kind: Failure
    message: str


class StallLog:
    """When this router was stuck waiting on failing or fault-drilled downstream calls (recent intervals only).

    Requests that queued for the router meanwhile waited because of a fault, not because of load: the
    load gauge must not read a dead or slow model as overload and shed healthy traffic."""

    def __init__(self, keep_s: float = 10.0) -> None:
        self._keep_s = keep_s
        self._intervals: deque[tuple[float, float]] = deque()

    def add(self, start: float, end: float) -> None:
        self._intervals.append((start, end))
        while self._intervals and self._intervals[0][1] < end - self._keep_s:
            self._intervals.popleft()

    def overlap(self, start: float, end: float) -> float:
        """Seconds of [start, end] spent stalled (overlapping intervals counted once)."""
        total, covered_to = 0.0, start
        for low, high in sorted(self._intervals):
            low, high = max(low, covered_to), min(high, end)
            if high > low:
                total += high - low
                covered_to = high
        return total


class InferFn(Protocol):
    """Calls one downstream model; raises ModelCallError, or ModelTimeout after `timeout_s`."""

    def __call__(
        self, model: str, images: np.ndarray, parameters: Mapping[str, str], *, timeout_s: float
    ) -> Awaitable[np.ndarray]: ...


@dataclass(frozen=True)
class Variant:
    """How one row's routing differs from the policy: its experiment arms' changes and per-user adaptation.

    Only what the policy allows reaches here (experiment_spec checks arms against the allowlist); lanes,
    breakers, fallback chains and deadlines apply to a variant's models exactly as to the policy's."""

    models: Mapping[str, str] = field(default_factory=dict)  # policy model -> the model:version called instead
    threshold: float | None = None  # the cascade's confidence threshold for this row (its tier's when None)
    escalate_when: str | None = None  # the cascade's escalate_when for this row (the policy's when None)
    reasons: tuple[str, ...] = ()  # why this row differs, for REASON


BASE = Variant()


@dataclass(frozen=True)
class Decision:
    """Where a row goes first, and why."""

    route: str
    reason: str
    cascade: bool = False  # the route is the cascade's first model, so the row may escalate
    confidence_cap: float | None = None


class HopOutcome(enum.Enum):
    """What became of a row at one model it was sent towards, as PATH says it."""

    OK = "ok"  # answered, and the row stopped there
    # answered; the cascade escalated the row past it: its confidence under the threshold or the learned router's
    # p(wrong) over its bound (REASON says which). One name for both: clients, metrics and logs read this value
    LOW_CONFIDENCE = "low_confidence"
    ERROR = "error"  # the call failed, or refused the row, or answered it with non-finite probabilities
    TIMEOUT = "timeout"  # no answer within the call's bound (or the deadline passed before the call)
    EJECTED = "ejected"  # not called: its circuit breaker is open
    UNAVAILABLE = "unavailable"  # not called: this server does not have it

    @property
    def failed(self) -> bool:
        """Whether the row went on past this model for a fault (the model's or its breaker's)."""
        return self in (HopOutcome.ERROR, HopOutcome.TIMEOUT, HopOutcome.EJECTED)

    @property
    def called(self) -> bool:
        """Whether the row was sent to the model (in process or through Triton)."""
        return self not in (HopOutcome.EJECTED, HopOutcome.UNAVAILABLE)


@dataclass(frozen=True)
class Hop:
    """One model tried for a row, in PATH order."""

    model: str  # model:version
    outcome: HopOutcome

    def __str__(self) -> str:
        return f"{self.model} {self.outcome.value}"


def path_text(hops: Iterable[Hop]) -> str:
    """PATH: every hop as `model:version outcome`, joined by '>'."""
    return ">".join(str(hop) for hop in hops)


@dataclass(frozen=True)
class Answer:
    """What the router returns for one row."""

    probs: np.ndarray
    confidence: float
    route: str  # the model:version whose probabilities these are
    reason: str
    hops: tuple[Hop, ...]  # every model tried, in order, with its outcome
    outcome: str = "direct"  # "direct", "fallback" (a model failed on the way) or "degraded" (by load)
    first_label: int | None = None  # the cascade's first model's label, when it answered the row

    @property
    def path(self) -> str:
        return path_text(self.hops)


@dataclass(frozen=True)
class Shed:
    """A row refused under load, and why (the request gets UNAVAILABLE)."""

    reason: str


@dataclass(frozen=True)
class Unanswered:
    """A row no model answered (the request gets an error): why, and every model tried, in order, with its
    outcome, so that a model's failures count even when the whole row failed."""

    message: str
    hops: tuple[Hop, ...] = ()

    def __str__(self) -> str:
        return self.message


RowResult = Answer | Shed | Unanswered  # what became of one row


@dataclass
class _Row:
    decision: Decision
    signature: Signature
    deadline: float | None  # clock time by which the row must be answered
    degraded: str = ""  # why the row may not escalate under load
    next_model: str | None = None
    hops: list[Hop] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    best: tuple[str, np.ndarray] | None = None  # the last answer in hand, from which model
    variant: Variant = BASE
    first_label: int | None = None  # the cascade's first model's label, once it answered


Outcome = np.ndarray | HopFailure  # one row's result of one hop: probabilities or why there are none


def merged_parameters(signatures: list[Signature]) -> dict[str, str]:
    """Parameters for one downstream call serving rows of several requests: the most urgent tier,
    the tightest deadline, and the user only when all rows share it."""
    parameters = {"tier": min((s.tier for s in signatures), key=TIERS.index)}
    deadlines = [s.deadline_ms for s in signatures if s.deadline_ms is not None]
    if deadlines:
        parameters["deadline_ms"] = str(min(deadlines))
    users = {s.user_id for s in signatures}
    if len(users) == 1 and (user := users.pop()):
        parameters["user_id"] = user
    return parameters


def _decimals_apart(value: float, bound: float) -> int:
    """How many decimals show `value` apart from `bound`: 0.9199 against 0.92 reads "0.9199 < 0.92", not
    "0.92 < 0.92". Two when they are equal to 6 decimals (a float32 0.8 against 0.8)."""
    return next((d for d in range(2, 7) if round(value, d) != round(bound, d)), 2)


class Router:
    """Applies one policy. `accepts_missing` says which listed models take images with missing pixels; `states`
    which models the router serves in-process and which optional models are unavailable now (none, by default)."""

    def __init__(
        self,
        policy: Policy,
        accepts_missing: Mapping[str, bool],
        learned: LearnedRouter | None,
        clock: Callable[[], float] = time.monotonic,
        states: ModelStates | None = None,
        alternates: Sequence[LearnedRouter] = (),
    ) -> None:
        if unknown := sorted(set(policy.models) - set(accepts_missing)):
            raise ValueError(f"no manifest for policy model(s) {', '.join(unknown)}")
        if policy.cascade.escalate_when != "threshold" and learned is None:
            raise ValueError(
                f"the policy escalates on the learned router ({policy.cascade.escalate_when!r}) "
                "but no learned router was built"
            )
        if not accepts_missing[policy.fallback]:
            raise ValueError(f"fallback {policy.fallback} must accept images with missing pixels")
        self.policy = policy
        self.accepts_missing = dict(accepts_missing)
        self.learned = learned
        self.alternates = tuple(alternates)
        # a learned router's doubts are about one first model's answers: `learned` judges the policy's cascade.first
        # (when it does not say), `alternates` other versions an experiment arm or a promotion may put first; rows
        # answered first by a model none judges escalate on the confidence threshold alone
        self.learned_by_first = {
            router.judges or policy.cascade.first: router
            for router in (*self.alternates, *([learned] if learned is not None else []))
        }
        self.clock = clock
        self.states = states or ModelStates()
        self.breakers = {model: CircuitBreaker(policy.breaker, clock) for model in policy.callable_models}
        self.load = LoadMonitor(policy.shedding, clock)
        self.latency_ewma: dict[str, float] = {}  # seconds per call, per model
        self.latency_measured: dict[str, float] = {}  # when each model's latency was last measured
        self.stalls = StallLog()

    def scratch_copy(self) -> Router:
        """A router with this one's policy, manifests and learned routers (alternates included) but none of its state:
        fresh breakers, load gauge and latencies, no model served in-process. For a warm-up that must move nothing."""
        return Router(self.policy, self.accepts_missing, self.learned, self.clock, alternates=self.alternates)

    def _can_serve(self, model: str, signature: Signature, variant: Variant = BASE) -> bool:
        return self.accepts_missing[variant.models.get(model, model)] or signature.missing_fraction == 0.0

    def target(self, model: str, tier: str, variant: Variant = BASE) -> str:
        """The model:version called for `model`: the variant's replacement, through the tier's lane if any (a model
        served in-process needs no lane: no row queues for it)."""
        chosen = variant.models.get(model, model)
        return chosen if self.states.in_process(chosen) else self.policy.lane(chosen, tier)

    def decide(self, signature: Signature, variant: Variant = BASE) -> Decision:
        for rule in self.policy.rules:
            if rule.matches(signature) and self._can_serve(rule.route, signature, variant):
                because = ", ".join(condition.explain(signature) for condition in rule.when)
                return Decision(rule.route, f"rule {rule.name} ({because})", confidence_cap=rule.confidence_cap)
        first = self.policy.cascade.first
        if self._can_serve(first, signature, variant):
            return Decision(first, "cascade", cascade=True)
        return Decision(self.policy.fallback, "fallback: no listed route takes images with missing pixels")

    def escalations(
        self, signatures: list[Signature], probs: np.ndarray, images: np.ndarray, variants: Sequence[Variant] = ()
    ) -> list[tuple[bool, str]]:
        """For rows answered by the cascade's first model (`probs`, on the native `images`): escalate or not, and
        why."""
        cascade = self.policy.cascade
        variants = list(variants) or [BASE] * len(signatures)
        confidence = probs.max(axis=1).tolist()  # Python floats: numpy scalars cost µs each to compare and format
        firsts = [variant.models.get(cascade.first, cascade.first) for variant in variants]
        wrong = (
            self._wrong_probabilities(firsts, escalation_inputs(signatures, probs, images))
            if self.learned_by_first and cascade.learned_escalate_above is not None
            else None
        )
        verdicts = []
        for i, signature in enumerate(signatures):
            variant = variants[i]
            threshold = cascade.thresholds[signature.tier] if variant.threshold is None else variant.threshold
            whose = f"{signature.tier} threshold" if variant.threshold is None else "this row's threshold"
            low = bool(confidence[i] < threshold)
            shown = _decimals_apart(confidence[i], threshold)
            why = f"confidence {confidence[i]:.{shown}f} {'<' if low else '>='} {threshold:.2f} ({whose})"
            escalate_when = variant.escalate_when or cascade.escalate_when
            if wrong is None or escalate_when == "threshold":
                verdicts.append((low, why))
                continue
            row_wrong = wrong[i]
            if row_wrong is None:
                why += f", no learned router was built for {firsts[i]}: threshold only"
                verdicts.append((low, why))
                continue
            doubt_above = cascade.learned_escalate_above[signature.tier]
            doubt = bool(row_wrong > doubt_above)
            why += f", learned router p(wrong)={row_wrong:.3f} {'>' if doubt else '<='} {doubt_above:g}"
            escalate = {"threshold": low, "learned": doubt, "either": low or doubt, "both": low and doubt}
            verdicts.append((escalate[escalate_when], why))
        return verdicts

    def _wrong_probabilities(self, firsts: list[str], inputs: np.ndarray) -> list[float | None]:
        """Per row, the p(wrong) of the learned router that judges the row's first model (None: none does)."""
        if len(set(firsts)) == 1:  # the common case: one first model for the whole batch, one matrix product
            router = self.learned_by_first.get(firsts[0])
            return router.wrong_probability(inputs).tolist() if router is not None else [None] * len(firsts)
        wrong: list[float | None] = [None] * len(firsts)
        for first, router in self.learned_by_first.items():
            rows = [i for i, row_first in enumerate(firsts) if row_first == first]
            if rows:
                for i, p in zip(rows, router.wrong_probability(inputs[rows]).tolist(), strict=True):
                    wrong[i] = p
        return wrong

    async def route(
        self,
        images: np.ndarray,
        signatures: list[Signature],
        infer: InferFn,
        waits_ms: Sequence[float] = (),
        spent_ms: Sequence[float] = (),
        variants: Sequence[Variant] = (),
    ) -> list[RowResult]:
        """An Answer per row, Shed for a row refused under load, or Unanswered: why no model answered it.

        Each row must be answered within its deadline_ms, or its tier's SLO when it sent none, counted from
        when the server started on its request: `spent_ms[i]` of row i's budget went before the router (none
        given: nothing). `waits_ms[i]` is how long row i's request queued for the router because of load
        (none given: no wait); the caller feeds the load gauge (`self.load.observe`). `variants[i]` is how row i's
        routing differs from the policy (none given: not at all)."""
        start = self.clock()
        waits = list(waits_ms) or [0.0] * len(signatures)
        spent = list(spent_ms) or [0.0] * len(signatures)
        row_variants = list(variants) or [BASE] * len(signatures)
        results: list[RowResult] = [Unanswered("not routed")] * len(signatures)
        rows, kept = [], []
        for index, (signature, wait_ms, spent_before_ms, variant) in enumerate(
            zip(signatures, waits, spent, row_variants, strict=True)
        ):
            action, why = self.load.action(signature.tier, wait_ms)
            if action == SHED:
                results[index] = Shed(why)
                continue
            decision = self.decide(signature, variant)
            budget_ms = signature.deadline_ms or self.policy.tiers[signature.tier].slo_ms
            deadline = start + (budget_ms - spent_before_ms) / 1000
            row = _Row(decision, signature, deadline, degraded=why if action == DEGRADE else "", variant=variant)
            self._send(row, [decision.route, *self.policy.chain(decision.route)])
            rows.append(row)
            kept.append(index)
        for index, answer in zip(kept, await self._walk(rows, images[kept], infer), strict=True):
            results[index] = answer
        return results

    async def _walk(self, rows: list[_Row], images: np.ndarray, infer: InferFn) -> list[Answer | Unanswered]:
        signatures = [row.signature for row in rows]
        while pending := {i: row.next_model for i, row in enumerate(rows) if row.next_model}:
            outcomes = await self._call(pending, images, rows, infer)
            first = self.policy.cascade.first
            cascading = [
                i
                for i, outcome in outcomes.items()
                if not isinstance(outcome, HopFailure)
                and rows[i].decision.cascade
                and pending[i] == first
                and rows[i].best is None
            ]
            verdicts = dict(
                zip(
                    cascading,
                    self.escalations(
                        [signatures[i] for i in cascading],
                        np.stack([outcomes[i] for i in cascading]),
                        images[cascading],
                        [rows[i].variant for i in cascading],
                    )
                    if cascading
                    else [],
                    strict=True,
                )
            )
            for i, outcome in outcomes.items():
                self._advance(rows[i], pending[i], outcome, verdicts.get(i))
        return [self._answer(row) for row in rows]

    def _time_left(self, row: _Row) -> float | None:
        return None if row.deadline is None else row.deadline - self.clock()

    def _send(self, row: _Row, candidates: Iterable[str]) -> None:
        """Point the row at the first candidate it has not tried, can use, and whose breaker lets it through. An
        optional model this server does not have is passed over for its own fallbacks. The safe default, which
        ends every chain, is called whatever its breaker says: nothing comes after it, so its breaker could only
        fail the row (while its half-open probe was out, it refused every other row; a slow spell of a healthy
        model ejected it and failed rows it would have answered). Its outcome still goes to its breaker."""
        row.next_model = None

        def untried(model: str) -> bool:
            return model not in row.tried and self._can_serve(model, row.signature, row.variant)

        for model, target, available in self._past_unavailable(candidates, row, untried):
            row.tried.add(model)
            if not available:
                row.hops.append(Hop(target, HopOutcome.UNAVAILABLE))
                row.notes.append(f"{target} is not loaded on this server")
                continue
            breaker = self.breakers[target]
            if breaker.allow():
                row.next_model = model
                return
            if model == self.policy.fallback:
                row.notes.append(f"{target} {breaker.describe()}: called all the same, as the last resort")
                row.next_model = model
                return
            row.hops.append(Hop(target, HopOutcome.EJECTED))
            row.notes.append(f"{target} {breaker.describe()}")

    async def _call(
        self, pending: dict[int, str], images: np.ndarray, rows: list[_Row], infer: InferFn
    ) -> dict[int, Outcome]:
        groups: dict[str, list[int]] = defaultdict(list)  # by the model:version actually called (lanes apart)
        outcomes: dict[int, Outcome] = {}
        for row, model in pending.items():
            target = self.target(model, rows[row].signature.tier, rows[row].variant)
            left = self._time_left(rows[row])
            if left is not None and left <= 0 and model != self.policy.fallback:
                # nothing to wait for: the row goes on to the safe default, which is never skipped
                outcomes[row] = HopFailure(Failure.TIMEOUT, f"timeout: deadline passed before {target} was called")
                continue
            if model == self.policy.fallback and rows[row].deadline is not None:
                # the safe default is the last resort: it gets the whole call timeout, however little budget
                # is left, and a late answer beats none (a few ms left used to fail the row)
                if left is not None and left <= 0:
                    rows[row].notes.append("deadline passed: the fallback answers late rather than not at all")
                rows[row].deadline = None
            groups[target].append(row)
        call_timeout = self.policy.call_timeout_ms / 1000

        async def call(model: str, members: list[int]) -> np.ndarray | HopFailure:
            # as long as the most patient row may wait: a tight deadline never cuts short its neighbours
            lefts = [self._time_left(rows[r]) for r in members]
            timeout = min(call_timeout, max(call_timeout if t is None else t for t in lefts))
            started = self.clock()
            try:
                probs = await infer(
                    model, images[members], merged_parameters([rows[r].signature for r in members]), timeout_s=timeout
                )
            except ModelTimeout:
                excused = self._latency(model, started, FAIR_ESTIMATE_MAX_AGE_S) or 0.0
                if timeout >= max(FAIR_TIMEOUT_FLOOR_S, FAIR_TIMEOUT_FACTOR * excused):
                    self.breakers[model].record(False, self.clock() - started)
                self.stalls.add(started, self.clock())
                return HopFailure(Failure.TIMEOUT, f"timeout: {model} did not answer within {timeout * 1000:.0f} ms")
            except ModelDown as error:
                self.breakers[model].trip(f"model down: {error}")
                self.stalls.add(started, self.clock())
                return HopFailure(Failure.ERROR, f"{model} failed: {error}")
            except ModelRefused as error:
                return HopFailure(Failure.REFUSED, f"{model} refused the input: {error}")
            except ModelCallError as error:
                self.breakers[model].record(False, self.clock() - started)
                self.stalls.add(started, self.clock())
                return HopFailure(Failure.ERROR, f"{model} failed: {error}")
            elapsed = self.clock() - started
            if self.states.drilled(model):  # a latency drill's wait is not load
                self.stalls.add(started, started + elapsed)
            self.breakers[model].record(True, elapsed)
            # an estimate stale when the call began is forgotten, not averaged in: _expected_latency ignored it, and
            # averaged it would keep escalations skipped for seconds after one slow spell (one call a second)
            previous = self._latency(model, started, LATENCY_STALE_S)
            self.latency_ewma[model] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
            self.latency_measured[model] = self.clock()
            return probs

        if len(groups) == 1:  # one model this round (the usual case): no tasks to create and gather
            ((model, members),) = groups.items()
            results = [await call(model, members)]
        else:
            results = await asyncio.gather(*(call(model, members) for model, members in groups.items()))
        for (model, members), result in zip(groups.items(), results, strict=True):
            if isinstance(result, HopFailure):
                outcomes.update(dict.fromkeys(members, result))
                continue
            finite = np.isfinite(result).all(axis=1)
            for position, row in enumerate(members):
                outcomes[row] = (
                    result[position]
                    if finite[position]
                    else HopFailure(Failure.NON_FINITE, f"{model} answered non-finite probabilities for this image")
                )
        return outcomes

    def _advance(self, row: _Row, logical: str, outcome: Outcome, verdict: tuple[bool, str] | None) -> None:
        """Record the call to `logical` (through the row's variant and lane, if any) and choose the row's next hop."""
        model = self.target(logical, row.signature.tier, row.variant)
        row.next_model = None
        if isinstance(outcome, HopFailure):
            row.hops.append(Hop(model, HopOutcome.TIMEOUT if outcome.kind is Failure.TIMEOUT else HopOutcome.ERROR))
            row.notes.append(outcome.message)
            if row.best is not None:
                row.notes.append(f"answered with {row.best[0]}")
                return
            left = self._time_left(row)
            if left is not None and left <= 0:
                # late beats failed: the safe default gets the policy's call timeout, not the spent deadline
                row.notes.append("deadline passed: only the fallback is tried")
                row.deadline = None
                self._send(row, [self.policy.fallback])
            else:
                self._send(row, self.policy.chain(logical))
            if row.next_model:
                row.notes.append(f"fell back to {self.target(row.next_model, row.signature.tier, row.variant)}")
            return
        row.best = (model, outcome)
        if verdict is None:
            row.hops.append(Hop(model, HopOutcome.OK))
            return
        escalate, why = verdict
        row.first_label = int(np.argmax(outcome))
        row.notes.append(f"{model} {why}")
        left = self._time_left(row)
        target = self._reached(self.policy.cascade.escalate_to, row)
        needed = self._expected_latency(target)
        if escalate and row.degraded:
            row.hops.append(Hop(model, HopOutcome.OK))
            row.notes.append(f"escalation skipped, {row.degraded}")
        elif escalate and left is not None and left <= needed:
            row.hops.append(Hop(model, HopOutcome.OK))
            row.notes.append(
                f"escalation skipped: {max(left, 0) * 1000:.0f} ms left of the "
                f"{row.signature.tier} budget, {target} takes ~{needed * 1000:.0f} ms"
            )
        elif escalate:
            row.hops.append(Hop(model, HopOutcome.LOW_CONFIDENCE))
            self._send(row, [self.policy.cascade.escalate_to])
            if row.next_model:
                row.notes.append(f"escalated to {self.target(row.next_model, row.signature.tier, row.variant)}")
            else:
                row.notes.append(f"answered with {model}")
        else:
            row.hops.append(Hop(model, HopOutcome.OK))

    def _past_unavailable(
        self, candidates: Iterable[str], row: _Row, eligible: Callable[[str], bool] = lambda model: True
    ) -> Iterator[tuple[str, str, bool]]:
        """The `eligible` candidates in order, each with its target for this row and whether this server has it: an
        optional model it lacks is followed by its own fallbacks (eligibility is judged as each comes up)."""
        queue = deque(candidates)
        while queue:
            model = queue.popleft()
            if not eligible(model):
                continue
            target = self.target(model, row.signature.tier, row.variant)
            available = not self.states.unavailable(target)
            yield model, target, available
            if not available:
                queue.extendleft(reversed(self.policy.fallbacks.get(model, ())))

    def _reached(self, model: str, row: _Row) -> str:
        """The model:version a call for `model` reaches for this row: past optional models this server does not
        have, to the first of their fallbacks it has (`model`'s own target when none is)."""
        reached = (target for _, target, available in self._past_unavailable([model], row) if available)
        return next(reached, self.target(model, row.signature.tier, row.variant))

    def _latency(self, model: str, at: float, max_age_s: float) -> float | None:
        """The model's moving-average latency as of `at`; None when none was measured within `max_age_s` before. Only
        answered calls refresh it, so an old one must not decide for good (skip escalations, excuse timeouts)."""
        if at - self.latency_measured.get(model, float("-inf")) > max_age_s:
            return None
        return self.latency_ewma.get(model)

    def _expected_latency(self, model: str) -> float:
        """What a call to `model` is expected to take, 0 when its estimate is LATENCY_STALE_S old: an estimate that
        only calls refresh must not stop the calls for good (one slow call would otherwise end escalations forever)."""
        return self._latency(model, self.clock(), LATENCY_STALE_S) or 0.0

    def _answer(self, row: _Row) -> Answer | Unanswered:
        if row.best is None:
            return Unanswered(f"no model could answer ({path_text(row.hops)}): {'; '.join(row.notes)}", tuple(row.hops))
        model, probs = row.best
        confidence = float(probs.max())
        if row.decision.confidence_cap is not None and model == self.target(
            row.decision.route, row.signature.tier, row.variant
        ):
            confidence = min(confidence, row.decision.confidence_cap)
        reason = "; ".join([row.decision.reason, *row.variant.reasons, *row.notes, f"cues: {row.signature.cues()}"])
        failed_on_the_way = any(hop.outcome.failed for hop in row.hops)
        outcome = "fallback" if failed_on_the_way else "degraded" if row.degraded else "direct"
        return Answer(probs, confidence, model, reason, tuple(row.hops), outcome, row.first_label)
