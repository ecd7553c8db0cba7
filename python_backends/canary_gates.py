"""The gates of a metric-gated canary: its settings, the figures read per arm, and the verdict on them.

A canary raises its treatment's weight step by step (`tierserve canary`, tools/canary.py). At every reading the
figures of the step so far are judged: a gate fails when its figures show, with 95% confidence where they are a
proportion (the treatment's p99 is one: the share of its rows slower than the limit), that the candidate is worse
than allowed; a step passes once it has lasted `step_s` with enough data for the required gates (errors and
latency); a step that cannot gather that data within `max_step_s` fails on traffic.
Accuracy and shadow agreement are judged once enough of them arrived and never hold a step back. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

Z_95 = 1.959963984540054  # two-sided 95% of the standard normal
P99_TAIL = 0.01  # the share of rows slower than a p99
Weight = Annotated[float, Field(gt=0, le=100)]
Share = Annotated[float, Field(ge=0, le=1)]


class CanarySettings(BaseModel):
    """What `tierserve canary` steps through and what each step must show to pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: tuple[Weight, ...] = Field(
        (1, 5, 25, 50, 100),
        min_length=1,
        description="the treatment's weight at each step, percent of the eligible users, increasing; passing the "
        "last step promotes the candidate",
    )
    step_s: float = Field(60.0, gt=0, description="seconds each step lasts at least before it may pass")
    max_step_s: float = Field(
        600.0, gt=0, description="seconds a step may wait for min_rows and min_calls; then it fails on traffic"
    )
    poll_s: float = Field(1.0, gt=0, description="seconds between two readings of the server's metrics")
    min_rows: int = Field(
        100,
        ge=1,
        description="rows answered in each arm during a step before latency is judged; the treatment's p99 fails once "
        "more than 1% of its rows are slower than the limit with 95% confidence (at 100 rows: 3 of them)",
    )
    min_calls: int = Field(
        20, ge=1, description="rows sent to the candidate (and counted) during a step before its errors are judged"
    )
    max_error_rate: Share | None = Field(
        0.01, description="share of the rows sent to the candidate that may fail there; none (off): no absolute limit"
    )
    max_error_rate_increase: Share | None = Field(
        0.005,
        description="how far the candidate's share of failed rows may exceed the baseline's; none (off): no limit",
    )
    max_latency_ratio: float | None = Field(
        1.5,
        ge=1,
        description="the treatment arm's p99 latency over the control arm's, and the candidate's typical call "
        "duration (the median of the readings' means) over the baseline's, at most; none (off): latency not judged",
    )
    latency_slack_ms: float = Field(
        5.0, ge=0, description="a latency within this many ms of the baseline's passes whatever the ratio"
    )
    min_feedback: int = Field(100, ge=1, description="fed-back rows in each arm before accuracy is judged")
    max_accuracy_drop: Share | None = Field(
        0.02, description="how far the treatment's accuracy may fall below the control's; none (off): not judged"
    )
    shadow_fraction: Share = Field(
        0.1, description="share of the eligible rows also mirrored to the candidate during the canary (0: none)"
    )
    min_shadow_rows: int = Field(100, ge=1, description="mirrored rows compared before agreement is judged")
    min_shadow_agreement: Share | None = Field(
        0.9,
        description="share of mirrored rows whose candidate label must agree with the answer sent; none (off): not "
        "judged",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CanarySettings:
        if any(later <= earlier for earlier, later in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must increase, got {', '.join(f'{s:g}' for s in self.steps)}")
        if self.steps[0] >= 100:
            raise ValueError("the first step must be below 100%: the baseline arm needs users to compare with")
        if self.max_step_s < self.step_s:
            raise ValueError(f"max_step_s ({self.max_step_s:g}) must be at least step_s ({self.step_s:g})")
        return self


@dataclass(frozen=True)
class Histogram:
    """A latency histogram: rows per bucket (not cumulative) under `bounds_s`, the last count above them all."""

    bounds_s: tuple[float, ...]
    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds_s) + 1:
            raise ValueError(
                f"{len(self.bounds_s)} bounds need {len(self.bounds_s) + 1} counts, got {len(self.counts)}"
            )

    @property
    def total(self) -> float:
        return sum(self.counts)

    def quantile_ms(self, q: float) -> float | None:
        """The q-quantile by linear interpolation in its bucket, as Prometheus's histogram_quantile: the first bucket
        starts at 0, one above the last bound is reported as that bound. None without rows."""
        total = self.total
        if total <= 0 or not self.bounds_s:
            return None
        rank, seen = q * total, 0.0
        for index, count in enumerate(self.counts):
            if count > 0 and seen + count >= rank:
                if index == len(self.bounds_s):
                    break
                lower = 0.0 if index == 0 else self.bounds_s[index - 1]
                return 1000 * (lower + (self.bounds_s[index] - lower) * (rank - seen) / count)
            seen += count
        return 1000 * self.bounds_s[-1]

    def rows_above(self, ms: float) -> float:
        """Rows slower than `ms`, interpolated within its bucket as quantile_ms does, so that the q-quantile lies
        above `ms` exactly when more than (1 - q) of the rows do. Rows above the last bound count when `ms` is
        below it (quantile_ms reports them as that bound)."""
        if not self.bounds_s:
            return 0.0
        at, above, lower = ms / 1000, 0.0, 0.0
        for upper, count in zip(self.bounds_s, self.counts, strict=False):
            if at < lower:
                above += count
            elif at < upper:
                above += count * (upper - at) / (upper - lower)
            lower = upper
        return above + (self.counts[-1] if at < self.bounds_s[-1] else 0.0)


NO_LATENCY = Histogram((), (0.0,))


CALL_READINGS = 3  # readings with calls before the calls' duration is judged (a median of fewer is one reading)


@dataclass(frozen=True)
class ArmFigures:
    """One arm's figures: rows, latency and calls during the step; feedback since the canary started."""

    rows: int = 0  # rows answered in the arm
    latency: Histogram = NO_LATENCY  # the rows' latency from the router taking them to their answer
    calls: int = 0  # rows sent to the arm's model version (by the router, and by the shadow for the candidate)
    failures: int = 0  # of those rows, failed there
    feedback: int = 0  # fed-back rows of the arm
    correct: int = 0  # of those, answered correctly
    # calls to the arm's model version (and its lanes) as the server counts them, and their seconds from arrival to
    # response, between each two readings of the step: (calls, seconds) a reading
    call_readings: tuple[tuple[int, float], ...] = ()

    @property
    def p99_ms(self) -> float | None:
        return self.latency.quantile_ms(0.99)

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.calls if self.calls else None

    @property
    def model_calls(self) -> int:
        """Calls to the arm's model version in the step: its readings' together."""
        return sum(calls for calls, _ in self.call_readings)

    @property
    def mean_call_ms(self) -> float | None:
        seconds = sum(seconds for _, seconds in self.call_readings)
        return 1000 * seconds / self.model_calls if self.model_calls else None

    @property
    def typical_call_ms(self) -> float | None:
        """The median call duration over the step's readings: each reading's mean, weighted by its calls (Triton
        gives only sums). One stalled call moves one reading, not the median, as it moved the step's mean; a
        version slower on every call moves every reading. None until CALL_READINGS readings had calls: the median
        of fewer is one reading's mean."""
        means = sorted((1000 * seconds / calls, calls) for calls, seconds in self.call_readings if calls > 0)
        if len(means) < CALL_READINGS:
            return None
        half, counted = sum(calls for _, calls in means) / 2, 0
        for mean_ms, calls in means:
            counted += calls
            if counted >= half:
                return mean_ms
        return None  # not reached: the last reading's calls make up the whole

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback else None


@dataclass(frozen=True)
class CanaryFigures:
    """What one reading shows about a step of the canary."""

    weight: float  # the treatment's weight at this step, percent
    elapsed_s: float  # time since the step started
    treatment: ArmFigures
    control: ArmFigures
    control_weight: float | None = None  # the step the control's figures come from when not this one (at 100%)
    shadow_agree: int = 0  # mirrored rows (since the canary started) the candidate labelled as the answer sent
    shadow_disagree: int = 0
    candidate_ejected: bool = False  # the router's circuit breaker ejected the candidate


class Decision(str, Enum):
    PASS = "pass"  # the step passed: the next step, or the promotion
    FAIL = "fail"  # a gate failed: traffic goes back to the baseline
    WAIT = "wait"  # more time or data is needed


class Gate(str, Enum):
    ERRORS = "errors"  # the candidate's failed rows (or its ejection by the router's breaker)
    LATENCY = "latency"  # p99 of the treatment arm, and the candidate's call duration, against the baseline's
    ACCURACY = "accuracy"  # from feedback, treatment against control
    SHADOW = "shadow"  # agreement of the mirrored rows with the answers sent
    TRAFFIC = "traffic"  # a step that did not gather enough data in max_step_s


class GateState(str, Enum):
    OK = "ok"
    FAILED = "failed"
    NEEDS_DATA = "needs_data"
    OFF = "off"  # switched off in the settings


REQUIRED = (Gate.ERRORS, Gate.LATENCY)  # a step cannot pass until these could be judged


@dataclass(frozen=True)
class Reading:
    """One gate at one reading: its state, the figure judged and its limit (None: not known yet), for people
    `text`."""

    gate: Gate
    state: GateState
    value: float | None = None
    limit: float | None = None
    text: str = ""

    def __str__(self) -> str:
        return f"{self.gate.value} {self.state.value.replace('_', ' ')}: {self.text}" if self.text else self.gate.value


@dataclass(frozen=True)
class Verdict:
    """The judgement of one reading: the decision, the failed gate when it failed, and every gate's reading."""

    decision: Decision
    readings: tuple[Reading, ...]
    failed: Reading | None = None

    def reading(self, gate: Gate) -> Reading:
        return next(r for r in self.readings if r.gate == gate)

    def __str__(self) -> str:
        return "; ".join(map(str, self.readings))


def wilson(successes: float, trials: float, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default); None without trials. Counts may be fractions
    (rows interpolated within a histogram bucket)."""
    if trials <= 0:
        return None
    p, z2 = successes / trials, z * z
    center = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(center - half, 0.0), min(center + half, 1.0)


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def _errors(f: CanaryFigures, s: CanarySettings) -> Reading:
    t, c = f.treatment, f.control
    if f.candidate_ejected:
        counted = f" ({t.failures}/{t.calls} rows failed there)" if t.calls else ""
        text = f"the router's circuit breaker ejected the candidate{counted}"
        return Reading(Gate.ERRORS, GateState.FAILED, t.error_rate, None, text)
    limits = [s.max_error_rate] if s.max_error_rate is not None else []
    if s.max_error_rate_increase is not None:
        limits.append((c.error_rate or 0.0) + s.max_error_rate_increase)
    if not limits:
        return Reading(Gate.ERRORS, GateState.OFF)
    if t.calls < s.min_calls:
        return Reading(Gate.ERRORS, GateState.NEEDS_DATA, t.error_rate, None, f"{t.calls}/{s.min_calls} rows")
    limit, rate = min(limits), t.failures / t.calls
    low, _ = wilson(t.failures, t.calls) or (0.0, 0.0)
    baseline = f"baseline {_percent(c.error_rate)}" if c.error_rate is not None else "baseline sent no rows"
    text = (
        f"{t.failures}/{t.calls} rows failed on the candidate ({_percent(rate)}, at least {_percent(low)}; "
        f"{baseline}), limit {_percent(limit)}"
    )
    return Reading(Gate.ERRORS, GateState.FAILED if low > limit else GateState.OK, rate, limit, text)


def _latency(f: CanaryFigures, s: CanarySettings) -> Reading:
    """The treatment arm's p99 against the control arm's (required), and the candidate's typical call duration (the
    median of the step's readings, ArmFigures.typical_call_ms) against the baseline's when both were called min_calls
    times: a router execute answers all its rows together, so a slow candidate also slows the control rows that
    shared its executes, which only the call durations tell apart.

    The treatment's p99 is above the limit when more than 1% of its rows are: it fails when the 95% interval of that
    share lies above 1%. Its p99 alone would be decided by its slowest rows, and a step's treatment arm may have
    only min_rows of them (one stall of a busy box rolled back healthy candidates)."""
    if s.max_latency_ratio is None:
        return Reading(Gate.LATENCY, GateState.OFF)
    t, c = f.treatment, f.control

    def limit(baseline: float) -> float:
        return max(s.max_latency_ratio * baseline, baseline + s.latency_slack_ms)  # type: ignore[operator]

    texts, failed, shown = [], None, None
    treated, control = t.p99_ms, c.p99_ms
    p99_known = t.rows >= s.min_rows and c.rows >= s.min_rows and treated is not None and control is not None
    if p99_known:
        where = f" at {f.control_weight:g}%" if f.control_weight is not None else ""
        shown = (treated, limit(control))
        slower, rows = t.latency.rows_above(shown[1]), t.latency.total
        low, _ = wilson(slower, rows) or (0.0, 0.0)
        texts.append(
            f"p99 {treated:.1f} ms vs control{where} {control:.1f} ms, limit {shown[1]:.1f} ms "
            f"({slower:.0f}/{rows:.0f} rows above it, at least {_percent(low)}; over {_percent(P99_TAIL)} fails)"
        )
        failed = shown if low > P99_TAIL else None
    else:
        texts.append(f"rows {t.rows} treatment, {c.rows} control, of {s.min_rows}")
    called, usual = t.typical_call_ms, c.typical_call_ms
    if t.model_calls >= s.min_calls and c.model_calls >= s.min_calls and called is not None and usual is not None:
        calls = (called, limit(usual))
        texts.append(f"calls {called:.1f} ms vs baseline {usual:.1f} ms (medians of readings), limit {calls[1]:.1f} ms")
        failed = failed or (calls if called > calls[1] else None)
    value, bound = failed or shown or (treated, None)
    state = GateState.FAILED if failed else GateState.OK if p99_known else GateState.NEEDS_DATA
    return Reading(Gate.LATENCY, state, value, bound, "; ".join(texts))


def _accuracy(f: CanaryFigures, s: CanarySettings) -> Reading:
    if s.max_accuracy_drop is None:
        return Reading(Gate.ACCURACY, GateState.OFF)
    t, c = f.treatment, f.control
    if t.feedback < s.min_feedback or c.feedback < s.min_feedback or c.accuracy is None:
        text = f"feedback {t.feedback} treatment, {c.feedback} control, of {s.min_feedback}"
        return Reading(Gate.ACCURACY, GateState.NEEDS_DATA, t.accuracy, None, text)
    accuracy, limit = t.correct / t.feedback, c.accuracy - s.max_accuracy_drop
    _, high = wilson(t.correct, t.feedback) or (1.0, 1.0)
    text = f"{_percent(accuracy)} (at most {_percent(high)}) vs control {_percent(c.accuracy)}, limit {_percent(limit)}"
    return Reading(Gate.ACCURACY, GateState.FAILED if high < limit else GateState.OK, accuracy, limit, text)


def _shadow(f: CanaryFigures, s: CanarySettings) -> Reading:
    if s.min_shadow_agreement is None or s.shadow_fraction == 0:
        return Reading(Gate.SHADOW, GateState.OFF)
    compared = f.shadow_agree + f.shadow_disagree
    if compared < s.min_shadow_rows:
        agreement = f.shadow_agree / compared if compared else None
        return Reading(Gate.SHADOW, GateState.NEEDS_DATA, agreement, None, f"{compared}/{s.min_shadow_rows} rows")
    agreement, limit = f.shadow_agree / compared, s.min_shadow_agreement
    _, high = wilson(f.shadow_agree, compared) or (1.0, 1.0)
    text = (
        f"{f.shadow_agree}/{compared} agree ({_percent(agreement)}, at most {_percent(high)}), limit {_percent(limit)}"
    )
    return Reading(Gate.SHADOW, GateState.FAILED if high < limit else GateState.OK, agreement, limit, text)


def judge(figures: CanaryFigures, settings: CanarySettings) -> Verdict:
    """Fail on the first gate that failed; wait while a required gate needs data (failing on traffic past
    max_step_s) or the step is younger than step_s; pass otherwise."""
    readings = tuple(gate(figures, settings) for gate in (_errors, _latency, _accuracy, _shadow))
    if failed := next((r for r in readings if r.state == GateState.FAILED), None):
        return Verdict(Decision.FAIL, readings, failed)
    missing = [r for r in readings if r.gate in REQUIRED and r.state == GateState.NEEDS_DATA]
    if missing and figures.elapsed_s >= settings.max_step_s:
        text = (
            f"after {figures.elapsed_s:.0f} s at {figures.weight:g}%: "
            + "; ".join(f"{r.gate.value} {r.text}" for r in missing)
            + "; lower min_rows or min_calls, or raise max_step_s"
        )
        traffic = Reading(Gate.TRAFFIC, GateState.FAILED, figures.elapsed_s, settings.max_step_s, text)
        return Verdict(Decision.FAIL, (*readings, traffic), traffic)
    if missing or figures.elapsed_s < settings.step_s:
        return Verdict(Decision.WAIT, readings)
    return Verdict(Decision.PASS, readings)
