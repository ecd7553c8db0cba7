"""`tierserve canary MODEL:CANDIDATE`: a metric-gated canary of a model version against the version routed to now.

Checks first and changes nothing when it refuses (CanaryRefused, naming the problem). Then loads the candidate
when the server does not serve it, and runs an experiment of kind canary whose treatment arm calls the candidate
instead of the baseline, its weight raised step by step (`CanarySettings.steps`), plus a shadow experiment that
mirrors a share of the rows to the candidate. At every reading of the server's own metrics (Prometheus text from
the metrics port) the step's figures per arm are judged by tierserve.canary_gates: all gates pass, the next step;
the last step passed, the canary experiments stop and the candidate is promoted (Lifecycle.promote). A gate fails,
Ctrl-C, the server is lost or anything else goes wrong: the canary experiments stop at once, traffic is back on the
baseline, and the candidate is left loaded. Every step and the outcome go to the audit trail, refusals included.

What is read, per arm: rows and their latency histogram from the routers' tierserve_experiment_rows_total and
tierserve_experiment_latency_seconds, fed-back rows from tierserve_feedback_total, and the calls to the arm's model
version (and its lanes in the tiers a canary takes) with their duration from Triton's nv_inference_request_success,
_failure and _duration_us; the rows the routers sent to those versions and how they fared
(tierserve_model_rows_total: Triton 2.51 counts a Python model's error responses as successes, so its own failure
count says nothing); for the candidate also the rows its shadow sent it and how they fared
(tierserve_shadow_rows_total: agree, disagree, error) and its circuit breakers (tierserve_breaker_state). Counters
are taken as increases since the step (or the canary) started, across resets.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import time
import typing
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from tritonclient.utils import InferenceServerException

from tierserve.canary_gates import (
    NO_LATENCY,
    ArmFigures,
    CanaryFigures,
    CanarySettings,
    Decision,
    GateState,
    Histogram,
    Verdict,
    judge,
)
from tierserve.experiment_spec import (
    Eligibility,
    ExperimentsFile,
    ExperimentSpecError,
    experiments_json,
    parse_experiments,
)
from tierserve.experimenter import EXPERIMENTS_KEY
from tierserve.policy import Policy
from tierserve.promotions import ModelVersion, UseKind, model_of, version_uses
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.routing import HopOutcome
from tierserve.tools.audit import Action, Outcome, audited, record
from tierserve.tools.experiment_admin import apply
from tierserve.tools.lifecycle import Failed, Lifecycle, Problem, Refused, repository_versions
from tierserve.tools.model_control import AdminKeyRefused

TREATMENT, CONTROL = "candidate", "baseline"  # the canary's arms
DEFAULT_METRICS_URL = "http://localhost:8002/metrics"
STOP_RETRY_S = 30.0  # how long a lost server is asked again to stop the canary (a supervised one restarts)

ROWS = "tierserve_experiment_rows_total"
LATENCY_BUCKETS = "tierserve_experiment_latency_seconds_bucket"
FEEDBACK = "tierserve_feedback_total"
SHADOW_ROWS = "tierserve_shadow_rows_total"
MODEL_ROWS = "tierserve_model_rows_total"
SENT_OUTCOMES = tuple(outcome.value for outcome in HopOutcome if outcome.called)  # how a row sent to a version ends
BREAKER = "tierserve_breaker_state"
CALLS = ("nv_inference_request_success", "nv_inference_request_failure")
CALL_DURATION = "nv_inference_request_duration_us"
COUNTERS = (ROWS, LATENCY_BUCKETS, FEEDBACK, SHADOW_ROWS, *CALLS, CALL_DURATION)

Series = tuple[str, tuple[tuple[str, str], ...]]  # a metric's name and its labels, sorted


class CanaryProblem(str, Enum):
    """Why a canary was refused, beyond the problems of tierserve.tools.lifecycle.Problem."""

    SETTINGS = "settings"  # a step, interval or gate setting is invalid
    NOT_ALLOWED = "not_allowed"  # the policy does not let an experiment call the candidate
    EXPERIMENTS = "experiments"  # the canary's experiments would not be served beside the running ones


class CanaryRefused(Refused):
    """A canary refused before it changed anything; `problem` is a lifecycle Problem or a CanaryProblem."""

    def __init__(self, problem: Problem | CanaryProblem, message: str, uses: tuple = ()) -> None:
        super().__init__(problem, message, uses)  # type: ignore[arg-type]


class CanaryOutcome(str, Enum):
    PROMOTED = "promoted"  # every step passed and the candidate is routed to
    ROLLED_BACK = "rolled_back"  # a gate failed
    INTERRUPTED = "interrupted"  # Ctrl-C
    SERVER_LOST = "server_lost"  # the server's metrics or API could not be reached
    FAILED = "failed"  # the server did not take a step, the promotion failed, or an unexpected error


@dataclass(frozen=True)
class CanaryPlan:
    """What a canary compares, as checked: the candidate, the baseline the policy routes to, the experiments' names,
    the model versions the router calls for each (itself and its lanes in the tiers a canary takes), and the policy
    the routers served when it was checked."""

    candidate: ModelVersion
    baseline: ModelVersion
    experiment: str
    shadow: str
    candidate_models: tuple[str, ...]
    baseline_models: tuple[str, ...]
    policy: Policy


@dataclass(frozen=True)
class CanaryResult:
    """How a canary ended: the outcome, the weight last served, the steps passed, the last verdict, and for people
    the message the audit trail got."""

    outcome: CanaryOutcome
    plan: CanaryPlan
    weight: float
    passed: tuple[float, ...]
    verdict: Verdict | None
    message: str

    @property
    def promoted(self) -> bool:
        return self.outcome == CanaryOutcome.PROMOTED


# -- the server's metrics ---------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?[0-9]+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_metrics(text: str, names: Collection[str]) -> dict[Series, float]:
    """The samples of the metrics `names` in Prometheus text exposition format; NaN samples are left out."""
    samples: dict[Series, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in names:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        if math.isnan(value):
            continue
        labels = (
            (name, re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group(0)], raw))
            for name, raw in _LABEL.findall(match.group(2) or "")
        )
        samples[match.group(1), tuple(sorted(labels))] = value
    return samples


class Increases:
    """How much each counter grew since the first reading, as Prometheus's increase(): a counter that went down was
    reset (its model reloaded) and grew from 0; a series first seen after the first reading grew from 0."""

    def __init__(self) -> None:
        self._last: dict[Series, float] = {}
        self._read = False
        self.total: dict[Series, float] = {}

    def add(self, samples: Mapping[Series, float]) -> None:
        for series, value in samples.items():
            last = self._last.get(series)
            grown = (value if self._read else 0.0) if last is None else (value - last if value >= last else value)
            self._last[series] = value
            self.total[series] = self.total.get(series, 0.0) + grown
        self._read = True

    def since(self, mark: Mapping[Series, float]) -> dict[Series, float]:
        """The increases since `mark` (an earlier copy of `total`)."""
        return {series: value - mark.get(series, 0.0) for series, value in self.total.items()}


def _matching(values: Mapping[Series, float], name: str, labels: Mapping[str, str]) -> Iterator[tuple[dict, float]]:
    for (series_name, series_labels), value in values.items():
        found = dict(series_labels)
        if series_name == name and all(found.get(k) == v for k, v in labels.items()):
            yield found, value


def _sum(values: Mapping[Series, float], name: str, **labels: str) -> float:
    return sum(value for _, value in _matching(values, name, labels))


def _histogram(values: Mapping[Series, float], name: str, **labels: str) -> Histogram:
    """A histogram's buckets summed over its series (router instances), cumulative `le` counts made per bucket."""
    by_bound: dict[float, float] = {}
    for found, value in _matching(values, name, labels):
        bound = float(found.get("le", "nan"))
        if not math.isnan(bound):
            by_bound[bound] = by_bound.get(bound, 0.0) + value
    bounds = sorted(by_bound)
    if not bounds or not math.isinf(bounds[-1]):
        return NO_LATENCY
    cumulative = [max(by_bound[b], 0.0) for b in bounds]
    counts = [max(now - before, 0.0) for before, now in zip([0.0, *cumulative], cumulative, strict=False)]
    return Histogram(tuple(bounds[:-1]), tuple(counts))


def model_calls(values: Mapping[Series, float], models: Collection[str]) -> tuple[int, float]:
    """Calls to the model versions `models` and their total duration in seconds, as Triton counts them."""
    calls = seconds = 0.0
    for name in models:
        model, version = name.rsplit(":", 1)
        calls += sum(_sum(values, counter, model=model, version=version) for counter in CALLS)
        seconds += _sum(values, CALL_DURATION, model=model, version=version) / 1e6
    return round(calls), seconds


def arm_figures(
    step: Mapping[Series, float],
    canary: Mapping[Series, float],
    experiment: str,
    arm: str,
    models: Collection[str],
    shadow: str | None = None,
    call_readings: Sequence[tuple[int, float]] = (),
) -> ArmFigures:
    """One arm's figures: rows, latency and the calls to its `models` from the step's increases, feedback from the
    canary's. The rows the router sent to `models` and those that failed there (an error: a timeout is the latency
    gate's) are counted from the step, all traffic's (the candidate serves only the treatment), plus with `shadow`
    (the experiment mirroring rows to the arm's model version) the rows it sent there and those that failed.
    `call_readings`: the calls to `models` and their seconds between each two of the step's readings (model_calls
    of each reading's increases), which make up the step's."""
    sent = round(sum(_sum(step, MODEL_ROWS, model=m, outcome=o) for m in models for o in SENT_OUTCOMES))
    failed = round(sum(_sum(step, MODEL_ROWS, model=model, outcome=HopOutcome.ERROR.value) for model in models))
    if shadow is not None:
        outcomes = ("agree", "disagree", "error")
        sent += round(sum(_sum(step, SHADOW_ROWS, experiment=shadow, outcome=outcome) for outcome in outcomes))
        failed += round(_sum(step, SHADOW_ROWS, experiment=shadow, outcome="error"))
    return ArmFigures(
        rows=round(_sum(step, ROWS, experiment=experiment, arm=arm)),
        latency=_histogram(step, LATENCY_BUCKETS, experiment=experiment, arm=arm),
        calls=sent,
        failures=failed,
        call_readings=tuple(call_readings),
        feedback=round(_sum(canary, FEEDBACK, experiment=experiment, arm=arm)),
        correct=round(_sum(canary, FEEDBACK, experiment=experiment, arm=arm, correct="true")),
    )


def ejected(samples: Mapping[Series, float], models: Collection[str]) -> bool:
    """Whether a router instance's circuit breaker is open or half-open for one of `models` now."""
    return any(value > 0 for model in models for _, value in _matching(samples, BREAKER, {"model": model}))


def read_metrics(url: str, timeout_s: float = 5.0) -> str:
    """The server's metrics page; OSError when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


# -- checks -----------------------------------------------------------------------------------------------------------


def experiment_names(candidate: ModelVersion) -> tuple[str, str]:
    """The canary experiment's name (also its salt: which users it takes) and its shadow's, for a candidate."""
    model = re.sub(r"[^a-z0-9_]", "_", candidate.model.lower())
    suffix = f"_{candidate.version}"
    name = "canary_" + model[: 33 - len("canary_") - len(suffix)] + suffix  # room for "_shadow" within 40
    return name, f"{name}_shadow"


def canary_experiments(plan: CanaryPlan, weight: float, shadow_fraction: float) -> list[dict[str, Any]]:
    """The experiments a canary serves at `weight` percent: the canary, and its shadow when it mirrors rows."""
    experiments: list[dict[str, Any]] = [
        {
            "name": plan.experiment,
            "kind": "canary",
            "layer": plan.experiment,
            "arms": [
                {"name": TREATMENT, "weight": float(weight), "models": {str(plan.baseline): str(plan.candidate)}},
                {"name": CONTROL, "weight": float(100 - weight)},
            ],
        }
    ]
    if shadow_fraction > 0:
        experiments.append(
            {
                "name": plan.shadow,
                "kind": "shadow",
                "layer": plan.shadow,
                "shadow": {"candidate": str(plan.candidate), "fraction": float(shadow_fraction)},
            }
        )
    return experiments


def _called(policy: Policy, name: str) -> tuple[str, ...]:
    """The model versions the router calls for `name` in the tiers a canary takes: itself and its lanes there."""
    return tuple(dict.fromkeys([name, *(policy.lane(name, tier) for tier in Eligibility().tiers)]))


def plan_canary(target: str, lifecycle: Lifecycle, settings: CanarySettings) -> CanaryPlan:
    """Check a canary of `target` (MODEL:VERSION) on the server `lifecycle` talks to; CanaryRefused naming the
    problem when it cannot run (nothing is changed here)."""
    try:  # what a promotion at the end would refuse, refused now
        promotions, baseline, candidate = lifecycle.check_promote(target)
    except Refused as error:
        raise CanaryRefused(error.problem, str(error), error.uses) from None
    repository, policy = lifecycle.repository, lifecycle.policy(promotions)
    _check_lanes(policy, repository, baseline, candidate)
    if str(candidate) not in policy.experiment_models:
        raise CanaryRefused(
            CanaryProblem.NOT_ALLOWED,
            f"{candidate} is not listed under experiment_models in {ROUTER_MODEL}/{POLICY_FILE} "
            f"({', '.join(policy.experiment_models) or 'none'}): the router calls only the models it was loaded "
            f"with; add it there and reload the router first",
        )
    experiment, shadow = experiment_names(candidate)
    running = lifecycle.experiments()
    uses = [
        use
        for name in (str(baseline), str(candidate))
        for use in version_uses(policy, running, name)
        if use.kind in (UseKind.EXPERIMENT_ARM, UseKind.SHADOW) and use.where not in (experiment, shadow)
    ]
    if uses:
        raise CanaryRefused(
            Problem.IN_USE,
            f"a running experiment already changes {baseline} or {candidate}: {'; '.join(map(str, uses))}; stop it "
            "first (`tierserve experiment stop NAME`)",
            tuple(uses),
        )
    if any(e.name in (experiment, shadow) for e in running.experiments):
        raise CanaryRefused(
            Problem.ALREADY,
            f"a canary of {candidate} is running already (experiment {experiment}); "
            f"`tierserve experiment stop {experiment}` ends it",
        )
    plan = CanaryPlan(
        candidate, baseline, experiment, shadow, _called(policy, str(candidate)), _called(policy, str(baseline)), policy
    )
    try:  # what the first step will serve, validated as the router will
        _experiments(running, plan, settings.steps[0], settings.shadow_fraction, policy)
    except ExperimentSpecError as error:
        raise CanaryRefused(CanaryProblem.EXPERIMENTS, f"the canary's experiments would be refused: {error}") from None
    lifecycle.control.ready_versions(candidate.model)  # the admin key works, before anything changes
    return plan


def _check_lanes(policy: Policy, repository: Path, baseline: ModelVersion, candidate: ModelVersion) -> None:
    """The promotion at the end moves the baseline's lanes to the candidate's version: each must exist."""
    for tier, by_model in policy.lanes.items():
        if str(baseline) in by_model:
            lane = model_of(by_model[str(baseline)])
            if candidate.version not in repository_versions(repository, lane):
                raise CanaryRefused(
                    Problem.UNKNOWN_VERSION,
                    f"{candidate}'s {tier} lane {lane}:{candidate.version} does not exist, and the promotion would "
                    f"need it: a lane serves its model's version from a folder "
                    f"{repository / lane / str(candidate.version)} with a model.py of its own",
                )


def _experiments(
    running: ExperimentsFile, plan: CanaryPlan, weight: float | None, shadow_fraction: float, policy: Policy
) -> ExperimentsFile:
    """The running experiments with the canary's at `weight` (None: without them), validated against `policy`."""
    others = [e.model_dump(mode="json") for e in running.experiments if e.name not in (plan.experiment, plan.shadow)]
    ours = canary_experiments(plan, weight, shadow_fraction) if weight is not None else []
    return parse_experiments({"experiments": others + ours}, policy)


# -- the run ----------------------------------------------------------------------------------------------------------


class _ServerLost(Exception):
    """The server's metrics could not be read."""


_STATE_STYLES = {
    GateState.OK: "green",
    GateState.FAILED: "bold red",
    GateState.NEEDS_DATA: "yellow",
    GateState.OFF: "dim",
}


class _Display:
    """A progress bar over the steps and a line per gate with its current figures."""

    def __init__(self, console: Console, plan: CanaryPlan, steps: tuple[float, ...]) -> None:
        self.console = console
        self.steps = steps
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[step]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task(f"canary {plan.candidate} vs {plan.baseline}", total=len(steps), step="")
        self.gates = Text()
        self.live = Live(Group(self.progress, self.gates), console=console, refresh_per_second=4, transient=False)

    def show(self, index: int, elapsed_s: float, step_s: float, verdict: Verdict | None) -> None:
        weight = self.steps[index]
        self.progress.update(
            self.task,
            completed=index + min(elapsed_s / step_s, 0.99),
            step=f"step {index + 1}/{len(self.steps)}: {weight:g}%",
        )
        if verdict is not None:
            self.gates.plain = ""
            for reading in verdict.readings:
                self.gates.append(f"  {reading.gate.value:<9}", style="bold")
                self.gates.append(f"{reading.state.value.replace('_', ' '):<11}", style=_STATE_STYLES[reading.state])
                self.gates.append(f"{reading.text}\n")

    def done(self, steps_passed: int) -> None:
        self.progress.update(self.task, completed=steps_passed)


class _Canary:
    def __init__(
        self,
        plan: CanaryPlan,
        lifecycle: Lifecycle,
        settings: CanarySettings,
        metrics: Callable[[], str],
        console: Console,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.plan = plan
        self.lifecycle = lifecycle
        self.settings = settings
        self.metrics = metrics
        self.console = console
        self.clock = clock
        self.sleep = sleep
        self.policy = plan.policy
        self.increases = Increases()
        self.weight = 0.0  # the treatment's weight the routers serve
        self.passed: list[float] = []
        self.verdict: Verdict | None = None
        self.reference: tuple[float, ArmFigures] | None = None  # the last passed step's control, for 100%

    def run(self) -> CanaryResult:
        display = _Display(self.console, self.plan, self.settings.steps)
        try:
            self._load_candidate()
            self._read()  # counters grow from here
            with display.live:
                for index, weight in enumerate(self.settings.steps):
                    self._serve(weight)
                    verdict = self._step(index, weight, display)
                    if verdict.decision == Decision.FAIL:
                        display.done(len(self.passed))
                        assert verdict.failed is not None
                        why = f"gate {verdict.failed.gate.value} failed at {weight:g}%: {verdict.failed.text}"
                        return self._stop(CanaryOutcome.ROLLED_BACK, why)
                    self.passed.append(weight)
                display.done(len(self.passed))
            return self._promote()
        except KeyboardInterrupt:
            return self._stop(CanaryOutcome.INTERRUPTED, f"Ctrl-C at {self.weight:g}%")
        except (_ServerLost, OSError) as error:
            return self._stop(CanaryOutcome.SERVER_LOST, f"the server was lost at {self.weight:g}%: {error}")
        except (InferenceServerException, Failed, Refused, ExperimentSpecError) as error:
            why = error.message() if isinstance(error, InferenceServerException) else str(error)
            return self._stop(CanaryOutcome.FAILED, f"the server did not take a step at {self.weight:g}%: {why}")
        except BaseException as error:
            self._stop(CanaryOutcome.FAILED, f"stopped at {self.weight:g}% by an error: {error!r}")
            raise

    def _load_candidate(self) -> None:
        candidate = self.plan.candidate
        if candidate.version in self.lifecycle.control.ready_versions(candidate.model):
            return
        with audited(Action.LOAD, str(candidate), (Refused,)) as step:
            self.lifecycle.load(str(candidate), step)

    def _read(self) -> dict[Series, float]:
        try:
            text = self.metrics()
        except OSError as error:
            raise _ServerLost(f"its metrics could not be read ({error})") from None
        samples = parse_metrics(text, (*COUNTERS, BREAKER))
        self.increases.add({series: value for series, value in samples.items() if series[0] != BREAKER})
        return samples

    def _serve(self, weight: float | None) -> None:
        """Reload the routers with the running experiments and the canary's at `weight` (None: without them), and
        record the step."""
        before = self.weight
        spec = _experiments(self.lifecycle.experiments(), self.plan, weight, self.settings.shadow_fraction, self.policy)
        apply(self.lifecycle.control, spec)
        self.weight = weight or 0.0
        if weight is not None:
            passed = f"; {before:g}% passed: {self.verdict}" if self.verdict is not None else ""
            message = (
                f"{weight:g}% of the eligible users get {self.plan.candidate} instead of {self.plan.baseline} "
                f"(experiment {self.plan.experiment}){passed}"
            )
            record(Action.CANARY_STEP, str(self.plan.candidate), f"{before:g}%", f"{weight:g}%", Outcome.OK, message)
            self.console.print(f"canary {self.plan.candidate}: {message}")

    def _step(self, index: int, weight: float, display: _Display) -> Verdict:
        """Read and judge until the step passes or fails."""
        started = self.clock()
        self._read()
        step_mark = dict(self.increases.total)
        # per arm, the calls to its model versions and their seconds between each two readings (taken once a reading)
        call_readings: dict[str, list[tuple[int, float]]] = {CONTROL: [], TREATMENT: []}
        display.show(index, 0.0, self.settings.step_s, None)
        while True:
            self.sleep(self.settings.poll_s)
            before = dict(self.increases.total)
            samples = self._read()
            reading = self.increases.since(before)
            call_readings[CONTROL].append(model_calls(reading, self.plan.baseline_models))
            call_readings[TREATMENT].append(model_calls(reading, self.plan.candidate_models))
            elapsed = self.clock() - started
            figures = self._figures(weight, elapsed, self.increases.since(step_mark), samples, call_readings)
            self.verdict = verdict = judge(figures, self.settings)
            display.show(index, elapsed, self.settings.step_s, verdict)
            if verdict.decision == Decision.PASS and figures.control_weight is None:
                self.reference = (weight, figures.control)
            if verdict.decision != Decision.WAIT:
                return verdict

    def _figures(
        self,
        weight: float,
        elapsed_s: float,
        step: Mapping[Series, float],
        samples: Mapping[Series, float],
        call_readings: Mapping[str, Sequence[tuple[int, float]]],
    ) -> CanaryFigures:
        plan, canary = self.plan, self.increases.total
        control = arm_figures(
            step, canary, plan.experiment, CONTROL, plan.baseline_models, call_readings=call_readings[CONTROL]
        )
        control_weight = None
        if weight >= 100 and self.reference is not None:
            control_weight, control = self.reference  # no user is in the control arm any more
        return CanaryFigures(
            weight=weight,
            elapsed_s=elapsed_s,
            treatment=arm_figures(
                step,
                canary,
                plan.experiment,
                TREATMENT,
                plan.candidate_models,
                plan.shadow if self.settings.shadow_fraction > 0 else None,
                call_readings[TREATMENT],
            ),
            control=control,
            control_weight=control_weight,
            shadow_agree=round(_sum(canary, SHADOW_ROWS, experiment=plan.shadow, outcome="agree")),
            shadow_disagree=round(_sum(canary, SHADOW_ROWS, experiment=plan.shadow, outcome="disagree")),
            candidate_ejected=ejected(samples, plan.candidate_models),
        )

    def _promote(self) -> CanaryResult:
        plan, weight = self.plan, self.weight
        steps = ", ".join(f"{w:g}" for w in self.passed)
        # the canary's arm names the baseline, which the promoted policy no longer routes to: it stops first
        self._serve(None)
        try:
            with audited(Action.PROMOTE, str(plan.candidate), (Refused,)) as step:
                self.lifecycle.promote(str(plan.candidate), step)
        except (Refused, Failed, InferenceServerException) as error:
            why = error.message() if isinstance(error, InferenceServerException) else str(error)
            message = (
                f"every gate passed at {steps}% but the promotion failed: {why}; traffic is on {plan.baseline}, "
                f"{plan.candidate} left loaded"
            )
            return self._end(CanaryOutcome.FAILED, weight, message)
        message = f"every gate passed at {steps}%: {self.verdict}; promoted: {step.message}"
        return self._end(CanaryOutcome.PROMOTED, weight, message, after="promoted")

    def _stop(self, outcome: CanaryOutcome, why: str) -> CanaryResult:
        """Stop the canary's experiments (traffic back on the baseline). A lost server is asked again for a while,
        and the canary is dropped from the state store first, so that a server restarting meanwhile serves the
        baseline."""
        weight, plan = self.weight, self.plan
        if weight == 0:
            return self._end(outcome, weight, f"{why}; nothing was served yet, {plan.candidate} left loaded")
        lost = outcome == CanaryOutcome.SERVER_LOST
        stored = self._drop_from_store() if lost else None
        deadline = self.clock() + (STOP_RETRY_S if lost else 0.0)
        while True:
            try:
                self._serve(None)
                back = f"traffic back on {plan.baseline}"
                break
            except KeyboardInterrupt:
                continue  # a second Ctrl-C: traffic must still go back
            except Exception as error:
                if self.clock() < deadline:
                    self.sleep(1.0)
                    continue
                refused = error.message() if isinstance(error, InferenceServerException) else str(error)
                back = (
                    f"the server did not stop the canary ({refused}); {stored or self._drop_from_store()}; run "
                    f"`tierserve experiment stop {plan.experiment}` once it answers"
                )
                break
        return self._end(outcome, weight, f"{why}; {back}; {plan.candidate} left loaded", after="0%")

    def _drop_from_store(self) -> str:
        """Write the experiments the routers serve, less the canary's, to the state store (what a restarted server
        serves); what was done, as text."""
        try:
            spec = _experiments(self.lifecycle.experiments(), self.plan, None, 0.0, self.policy)
            self.lifecycle.store.set(EXPERIMENTS_KEY, experiments_json(spec).encode())
        except Exception as error:
            return f"the canary could not be removed from the state store either ({error})"
        return "the canary was removed from the state store, so a restarted server serves the baseline"

    def _end(self, outcome: CanaryOutcome, weight: float, message: str, after: str = "0%") -> CanaryResult:
        ok = outcome == CanaryOutcome.PROMOTED
        record(
            Action.CANARY_STEP,
            str(self.plan.candidate),
            f"{weight:g}%",
            after,
            Outcome.OK if ok else Outcome.FAILED,
            f"{outcome.value}: {message}",
        )
        self.console.print(f"canary {self.plan.candidate}: {outcome.value}: {message}", style=None if ok else "bold")
        return CanaryResult(outcome, self.plan, weight, tuple(self.passed), self.verdict, message)


def run_canary(
    target: str,
    lifecycle: Lifecycle,
    metrics_url: str = DEFAULT_METRICS_URL,
    settings: CanarySettings | None = None,
    *,
    console: Console | None = None,
    metrics: Callable[[], str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> CanaryResult:
    """Run a canary of `target` (MODEL:VERSION) on the server `lifecycle` talks to, reading its metrics at
    `metrics_url` (or from `metrics`). Raises CanaryRefused (or AdminKeyRefused) when it refuses, having changed
    nothing; otherwise returns how it ended (a KeyboardInterrupt ends it too: INTERRUPTED). Every step, the
    refusal and the outcome are in the audit trail."""
    settings = settings or CanarySettings()
    with contextlib.ExitStack() as lease:
        try:
            # the whole canary is one change: no other operator change runs between its steps
            lease.enter_context(lifecycle.exclusive(f"canary {target}"))
            plan = plan_canary(target, lifecycle, settings)
        except (Refused, AdminKeyRefused) as error:
            record(Action.CANARY_STEP, target, outcome=Outcome.REFUSED, message=str(error))
            raise
        except Exception as error:
            record(Action.CANARY_STEP, target, outcome=Outcome.FAILED, message=f"the checks could not be made: {error}")
            raise
        canary = _Canary(
            plan,
            lifecycle,
            settings,
            metrics or (lambda: read_metrics(metrics_url)),
            console or Console(),
            clock,
            sleep,
        )
        return canary.run()


# -- the command line -------------------------------------------------------------------------------------------------


def _option_type(name: str, annotation: Any) -> Callable[[str], Any]:
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    optional = type(None) in typing.get_args(annotation)
    number = int if int in kinds else float

    def parse(text: str) -> Any:
        if name == "steps":
            return tuple(float(part) for part in text.split(","))
        if optional and text.lower() == "off":
            return None
        return number(text)

    return parse


def add_canary_options(parser: argparse.ArgumentParser) -> None:
    """One option per CanarySettings field (--steps 1,5,25,50,100, --step-s 60, --max-error-rate 0.01 or off, ...),
    its help the field's description and default, plus --metrics-url."""
    for name, info in CanarySettings.model_fields.items():
        default = info.default
        shown = ",".join(f"{w:g}" for w in default) if name == "steps" else ("off" if default is None else default)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_option_type(name, info.annotation),
            default=argparse.SUPPRESS,
            help=f"{info.description} (default {shown})".replace("%", "%%"),  # argparse formats help with %
        )
    parser.add_argument(
        "--metrics-url", default=DEFAULT_METRICS_URL, help=f"the server's metrics page (default {DEFAULT_METRICS_URL})"
    )


def canary_settings(options: Mapping[str, Any]) -> CanarySettings:
    """The settings from parsed options (those given; the others keep their defaults); CanaryRefused naming the
    option when a value is invalid."""
    given = {name: options[name] for name in CanarySettings.model_fields if name in options}
    try:
        return CanarySettings(**given)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = first["loc"][0] if first["loc"] else ""
        option = f"--{str(where).replace('_', '-')}: " if where else ""
        message = first["msg"].removeprefix("Value error, ")  # a check across settings names them itself
        raise CanaryRefused(CanaryProblem.SETTINGS, f"{option}{message}") from None
