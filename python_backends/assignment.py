"""Which experiment arms a row is in: the same answer on every process, instance and restart.

A row enters an experiment when it is eligible (tier and attribute tests; a unit=user experiment also needs a
user_id), and its layer bucket falls in the experiment's share of the layer: experiments in one layer with
disjoint ranges never share a unit, and layers (hashed with different salts) are independent. Its arm is then
picked by kind:
- split, canary: the unit's bucket under the experiment's salt; arms are laid out cumulatively over the buckets
  in declared order. A canary's treatment comes first, so growing its weight only moves users from control into
  treatment, never back. For a split with more arms only growing the first arm at the expense of the last is
  monotone like that; any other reweighting moves some units between arms.
- shadow: a per-row draw below `fraction` mirrors the row to the candidate.
- bandit: per row, Thompson sampling or epsilon-greedy over the arms' Beta posteriors of a correct answer.
Per-row randomness (request-unit keys, shadow and bandit draws) comes only from the row's seed, and a user unit is
its keyed hash (never the clear id), so replaying a logged row with its seed and user hash makes the same decisions.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import itertools
import math
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from tierserve.experiment_spec import MIRRORED, ExperimentsFile, ExperimentSpec, int_test
from tierserve.policy import COMPARISONS

BUCKETS = 10_000
_UNIT = 2.0**-53
_LOG4 = math.log(4.0)
_MAX = sys.float_info.max
_LOG_MAX = math.log(_MAX)  # math.exp of more raises OverflowError


def bucket(salt: str, key: str) -> int:
    """The bucket, 0 to BUCKETS-1, of `key` (a user id or a row seed) under `salt`."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") % BUCKETS


def _words(seed: int, experiment: str, block: int) -> tuple[int, ...]:
    return struct.unpack(">4Q", hashlib.sha256(f"{seed}:{experiment}:{block}".encode()).digest())


def _unit_interval(word: int) -> float:
    return ((word >> 11) + 0.5) * _UNIT


def uniforms(seed: int, experiment: str) -> Iterator[float]:
    """A row's random numbers in (0, 1) for one experiment, from its seed alone: four per sha256 block."""
    for block in itertools.count():
        for word in _words(seed, experiment, block):
            yield _unit_interval(word)


def first_uniform(seed: int, experiment: str) -> float:
    """The first number of uniforms(seed, experiment), without a generator (one draw is the common case)."""
    return _unit_interval(_words(seed, experiment, 0)[0])


def beta_sampler(alpha: float, beta: float) -> Callable[[Iterator[float]], float]:
    """Draws Beta(alpha, beta) variates from uniforms, by Cheng's (1978) rejection algorithms: BB when both shapes
    exceed 1, else BC; a draw usually takes two uniforms. The constants are computed once per posterior."""
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta shapes must be positive, got ({alpha}, {beta})")
    a, b = min(alpha, beta), max(alpha, beta)
    total = a + b
    if a > 1.0:  # BB, with a the smaller shape
        scale = math.sqrt((total - 2.0) / (2.0 * a * b - total))  # below 1, so exp(v) below exp(38): no overflow
        shift = a + 1.0 / scale

        def bb(draw: Iterator[float]) -> float:
            while True:
                u1, u2 = next(draw), next(draw)
                v = scale * math.log(u1 / (1.0 - u1))
                w = a * math.exp(v)
                z = u1 * u1 * u2
                r = shift * v - _LOG4
                s = a + r - w
                if s + 2.609438 >= 5.0 * z:
                    break
                t = math.log(z)
                if s >= t or r + total * math.log(total / (b + w)) >= t:
                    break
            return w / (b + w) if alpha == a else b / (b + w)

        return bb
    a, b = b, a  # BC, with a the larger shape
    scale = 1.0 / b
    delta = 1.0 + a - b
    k1 = delta * (0.0138889 + 0.0416667 * b) / (a * scale - 0.777778)
    k2 = 0.25 + (0.5 + 0.25 / delta) * b

    def bc(draw: Iterator[float]) -> float:
        while True:
            u1, u2 = next(draw), next(draw)
            y = u1 * u2
            z = u1 * y
            if u1 < 0.5:
                if 0.25 * u2 + z - y >= k1:
                    continue
            elif z <= 0.25:
                v = scale * math.log(u1 / (1.0 - u1))
                w = min(a * math.exp(v), _MAX) if v < _LOG_MAX else _MAX
                break
            elif z >= k2:
                continue
            v = scale * math.log(u1 / (1.0 - u1))
            w = min(a * math.exp(v), _MAX) if v < _LOG_MAX else _MAX
            if total * (math.log(total / (b + w)) + v) - _LOG4 >= math.log(z):
                break
        return w / (b + w) if alpha == a else b / (b + w)

    return bc


@dataclass(frozen=True)
class Unit:
    """Who a row is, for assignment."""

    tier: str
    user: str  # the user's keyed hash (tierserve.request_ids.user_key), "" when the request sent no user_id
    attributes: Mapping[str, str | int]  # the declared attributes the request sent (absent ones missing; int ones int)
    seed: int  # the row's 64-bit random seed, minted by the router and logged for replay


@dataclass(frozen=True)
class Changes:
    """What a row's arms change, merged over its experiments."""

    models: Mapping[str, str] = field(default_factory=dict)  # policy model -> model:version to call instead
    thresholds: Mapping[str, float] = field(default_factory=dict)  # per tier, over policy.cascade.thresholds
    escalate_when: str | None = None  # over policy.cascade.escalate_when

    def merged(self, other: Changes) -> Changes:
        """These changes with `other`'s on top: other wins where both set something."""
        if other.empty:
            return self
        if self.empty:
            return other
        return Changes(
            MappingProxyType({**self.models, **other.models}),
            MappingProxyType({**self.thresholds, **other.thresholds}),
            self.escalate_when if other.escalate_when is None else other.escalate_when,
        )

    @property
    def empty(self) -> bool:
        """Whether nothing changes (a control arm, a shadow, or no experiment)."""
        return not self.models and not self.thresholds and self.escalate_when is None


NO_CHANGES = Changes(MappingProxyType({}), MappingProxyType({}))


@dataclass(frozen=True)
class Assignment:
    """A row's arm in one experiment."""

    experiment: str
    arm: str  # the arm's name; "mirrored" for a shadow experiment's mirrored rows
    kind: str  # split | canary | bandit | shadow
    changes: Changes  # empty for a control arm and for shadow
    reason: str  # one short clause for REASON
    shadow_to: str | None = None  # the candidate a mirrored row is also sent to


# experiment -> arm -> (alpha, beta) of a Beta posterior over "answer correct"; a missing arm means (1, 1)
Posteriors = Mapping[str, Mapping[str, tuple[float, float]]]
NO_POSTERIORS: Posteriors = MappingProxyType({})
_FLAT = (1.0, 1.0)


@dataclass(frozen=True)
class _Posterior:
    """A bandit's arm posteriors, prepared once for the rows until they change."""

    params: tuple[tuple[float, float], ...]  # (alpha, beta) per arm, in declared order
    text: str  # for REASON: successes/total per arm (alpha - 1 / alpha + beta - 2)
    samplers: list[Callable[[Iterator[float]], float]]
    means: list[float]


def _attribute_test(name: str, test: tuple[str, ...] | str) -> Callable[[Mapping[str, str | int]], bool]:
    """Whether a unit's attributes pass one eligibility test; a missing attribute never does."""
    if isinstance(test, tuple):
        allowed = frozenset(test)
        return lambda attributes: attributes.get(name) in allowed
    comparison = int_test(test)
    assert comparison is not None, f"{name}: {test!r} was validated as a comparison"
    compare, bound = COMPARISONS[comparison[0]], comparison[1]

    def holds(attributes: Mapping[str, str | int]) -> bool:
        value = attributes.get(name)
        return type(value) is int and compare(value, bound)

    return holds


def _changes(spec: ExperimentSpec, arm_index: int) -> Changes:
    arm = spec.arms[arm_index]
    if arm.is_control:
        return NO_CHANGES
    cascade = arm.cascade
    return Changes(
        MappingProxyType(dict(arm.models)),
        MappingProxyType(dict(cascade.thresholds) if cascade else {}),
        cascade.escalate_when if cascade else None,
    )


class _Experiment(abc.ABC):
    """One experiment's eligibility and layer share, precomputed so that a row costs no pydantic access."""

    def __init__(self, spec: ExperimentSpec) -> None:
        self.name, self.kind, self.unit = spec.name, spec.kind, spec.unit
        self.by_user = spec.unit == "user"
        self.tiers = frozenset(spec.eligible.tiers)
        self.tests = tuple(_attribute_test(name, test) for name, test in spec.eligible.attributes.items())
        self.layer_salt = f"layer:{spec.layer}"
        lo, hi = spec.layer_range  # percent, to the nearest bucket (0.01%); neighbours share their boundary
        self.layer_lo, self.layer_hi = round(lo * BUCKETS / 100), round(hi * BUCKETS / 100)
        self.whole_layer = self.layer_lo == 0 and self.layer_hi == BUCKETS

    def eligible(self, unit: Unit) -> bool:
        """Whether the unit may enter: its tier, a user_id for unit=user, and every attribute test."""
        if unit.tier not in self.tiers or (self.by_user and not unit.user):
            return False
        attributes = unit.attributes
        return not self.tests or all(test(attributes) for test in self.tests)

    @abc.abstractmethod
    def pick(self, key: str, unit: Unit, posteriors: Posteriors) -> Assignment | None:
        """The row's assignment, once it is eligible and in the experiment's share of its layer."""


class _Buckets(_Experiment):
    """split and canary: the unit's bucket under the salt picks the arm."""

    def __init__(self, spec: ExperimentSpec) -> None:
        super().__init__(spec)
        self.salt = spec.salt
        bounds = [round(w * BUCKETS / 100) for w in itertools.accumulate(arm.weight or 0.0 for arm in spec.arms)]
        self.uppers = bounds
        # per arm: its name, its changes and its REASON with a %d for the bucket (names are [a-z0-9_])
        self.arms = [
            (
                arm.name,
                _changes(spec, index),
                f"{self.kind} {self.name} arm {arm.name} ({self.unit} bucket %d in [{lower}, {upper}))",
            )
            for index, (arm, lower, upper) in enumerate(zip(spec.arms, [0, *bounds[:-1]], bounds, strict=True))
        ]

    def pick(self, key: str, unit: Unit, posteriors: Posteriors) -> Assignment:
        b = bucket(self.salt, key)
        arm, changes, reason = self.arms[bisect.bisect_right(self.uppers, b)]
        return Assignment(self.name, arm, self.kind, changes, reason % b)


class _Shadow(_Experiment):
    """shadow: a per-row draw below the fraction mirrors the row to the candidate."""

    def __init__(self, spec: ExperimentSpec) -> None:
        super().__init__(spec)
        assert spec.shadow is not None
        self.fraction = spec.shadow.fraction
        candidate = spec.shadow.candidate
        reason = f"shadow {spec.name} mirrored to {candidate}"
        self.mirrored = Assignment(spec.name, MIRRORED, "shadow", NO_CHANGES, reason, shadow_to=candidate)

    def pick(self, key: str, unit: Unit, posteriors: Posteriors) -> Assignment | None:
        return self.mirrored if first_uniform(unit.seed, self.name) < self.fraction else None


class _Bandit(_Experiment):
    """bandit: per row, the arm picked from the arms' posteriors by Thompson sampling or epsilon-greedy."""

    def __init__(self, spec: ExperimentSpec) -> None:
        super().__init__(spec)
        assert spec.bandit is not None
        self.strategy, self.epsilon = spec.bandit.strategy, spec.bandit.epsilon or 0.0
        self.names = [arm.name for arm in spec.arms]
        self.changes = [_changes(spec, index) for index in range(len(spec.arms))]
        self.draws_text = "thompson draws " + " ".join(f"{name}=%.2f" for name in self.names)
        self.posterior = self.prepare(tuple(_FLAT for _ in self.names))

    def prepare(self, params: tuple[tuple[float, float], ...]) -> _Posterior:
        text = ", ".join([f"{n} {a - 1:g}/{a + b - 2:g}" for n, (a, b) in zip(self.names, params, strict=True)])
        return _Posterior(params, text, [beta_sampler(a, b) for a, b in params], [a / (a + b) for a, b in params])

    def pick(self, key: str, unit: Unit, posteriors: Posteriors) -> Assignment:
        by_arm = posteriors.get(self.name)
        posterior = self.posterior
        if by_arm:
            params = tuple([by_arm.get(name, _FLAT) for name in self.names])
            if params != posterior.params:  # posteriors change with feedback, not per row
                posterior = self.posterior = self.prepare(params)
        draw = uniforms(unit.seed, self.name)
        if self.strategy == "thompson":
            scores = [sample(draw) for sample in posterior.samplers]
            chosen = scores.index(max(scores))  # the first declared on ties
            how = self.draws_text % tuple(scores)
        elif (u := next(draw)) < self.epsilon:
            chosen = min(int(next(draw) * len(self.names)), len(self.names) - 1)
            how = f"epsilon_greedy explored ({u:.2f} < epsilon {self.epsilon:g})"
        else:
            chosen = posterior.means.index(max(posterior.means))  # the first declared on ties
            how = f"epsilon_greedy highest mean {posterior.means[chosen]:.2f}"
        name = self.names[chosen]
        reason = f"bandit {self.name} arm {name} ({how}; posteriors {posterior.text})"
        return Assignment(self.name, name, "bandit", self.changes[chosen], reason)


_KINDS: dict[str, type[_Experiment]] = {"split": _Buckets, "canary": _Buckets, "shadow": _Shadow, "bandit": _Bandit}


class Assigner:
    """Assigns rows to the arms of the experiments in an experiments file (everything precomputed here)."""

    def __init__(self, spec: ExperimentsFile) -> None:
        self._experiments = [_KINDS[experiment.kind](experiment) for experiment in spec.experiments]
        self._by_name = {experiment.name: experiment for experiment in self._experiments}
        # what assign() needs of each experiment, bound once: the per-row path does no attribute lookups
        self._steps = [
            (
                experiment.eligible,
                experiment.pick,
                experiment.by_user,
                None if experiment.whole_layer else (experiment.layer_salt, experiment.layer_lo, experiment.layer_hi),
            )
            for experiment in self._experiments
        ]

    def assign(self, unit: Unit, posteriors: Posteriors = NO_POSTERIORS) -> list[Assignment]:
        """The row's assignments, in file order; [] when it is in no experiment."""
        assignments: list[Assignment] = []
        layer_buckets: dict[str, int] = {}  # experiments of a layer share one unit, hence one layer bucket
        for eligible, pick, by_user, layer in self._steps:
            if not eligible(unit):
                continue
            key = unit.user if by_user else str(unit.seed)
            if layer is not None:
                salt, lower, upper = layer
                layer_bucket = layer_buckets.get(salt)
                if layer_bucket is None:
                    layer_bucket = layer_buckets[salt] = bucket(salt, key)
                if not lower <= layer_bucket < upper:
                    continue
            assignment = pick(key, unit, posteriors)
            if assignment is not None:
                assignments.append(assignment)
        return assignments

    @staticmethod
    def changes(assignments: Sequence[Assignment]) -> Changes:
        """What the assignments change, merged in order (later experiments win)."""
        merged = NO_CHANGES
        for assignment in assignments:
            if assignment.changes is not NO_CHANGES:
                merged = merged.merged(assignment.changes)
        return merged

    def eligible(self, experiment: str, unit: Unit) -> bool:
        """Whether the unit may enter the experiment: its tier and attribute tests, and a user_id for unit=user."""
        if experiment not in self._by_name:
            raise KeyError(f"no experiment named {experiment!r} (running: {', '.join(self._by_name) or 'none'})")
        return self._by_name[experiment].eligible(unit)
