"""`tierserve experiment report NAME`: per arm, users, rows, accuracy from feedback and latency; whether an arm
beats the control, and how likely each arm is the best; for a shadow experiment, how often the candidate agreed.

The counts are tierserve.experiment_stats'; this module only turns them into text and an optional PNG. Which arm
is the control comes from the experiments the routers serve (a split's unchanged arm, a canary's second arm, a
bandit's first); for an experiment no longer served, the first arm by name stands in, and the text says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter, ValidationError
from scipy.stats import norm

from tierserve.canary_gates import wilson
from tierserve.experiment_spec import ExperimentsFile, ExperimentSpec, Name
from tierserve.experiment_stats import (
    LATENCY_BUCKETS_MS,
    ArmReport,
    ExperimentReport,
    ExperimentStats,
    TimePoint,
)
from tierserve.experimenter import EXPERIMENTS_KEY
from tierserve.state_store import StateStore

Z_95 = float(norm.ppf(0.975))  # two-sided 95%
ALPHA = 0.05
MIN_FEEDBACK = 30  # per arm, below which the normal approximation of the z-test is not trusted
DRAWS = 20_000  # Monte Carlo draws per arm for the probability of being best
SEED = 0  # fixed: the same counts always print the same probabilities


def two_proportion_z(successes_a: int, trials_a: int, successes_b: int, trials_b: int) -> tuple[float, float]:
    """(z, two-sided p-value) of the pooled two-proportion z-test of b's proportion against a's. Both proportions
    0 or both 1 leave nothing to test: (0, 1)."""
    pooled = (successes_a + successes_b) / (trials_a + trials_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / trials_a + 1 / trials_b))
    if se == 0:
        return 0.0, 1.0
    z = (successes_b / trials_b - successes_a / trials_a) / se
    return z, float(2 * norm.sf(abs(z)))


def probability_best(correct_wrong: Sequence[tuple[int, int]], draws: int = DRAWS, seed: int = SEED) -> list[float]:
    """Per arm, the probability that its accuracy is the highest under Beta(1 + correct, 1 + wrong) posteriors:
    the share of Monte Carlo draws in which the arm's draw is the largest (what a Thompson-sampling bandit reads)."""
    rng = np.random.default_rng(seed)
    samples = np.stack([rng.beta(1 + correct, 1 + wrong, draws) for correct, wrong in correct_wrong])
    return (np.bincount(samples.argmax(axis=0), minlength=len(correct_wrong)) / draws).tolist()


def _served(store: StateStore, name: str) -> ExperimentSpec | None:
    """The experiment as the routers serve it (None once stopped, or never served)."""
    stored = store.get(EXPERIMENTS_KEY)
    if stored is None:
        return None
    served = ExperimentsFile.model_validate(json.loads(stored))
    return next((spec for spec in served.experiments if spec.name == name), None)


def _control(spec: ExperimentSpec) -> str:
    """The arm the others are compared with: a split's unchanged arm, a canary's second, a bandit's first."""
    if spec.kind == "canary":
        return spec.arms[1].name
    if spec.kind == "split":
        return next(arm.name for arm in spec.arms if arm.is_control)
    return spec.arms[0].name


def _no_counts(arm: str) -> ArmReport:
    return ArmReport(arm, 0, 0, 0, 0, (0,) * (len(LATENCY_BUCKETS_MS) + 1), None, None, ())


def _ordered(counted: ExperimentReport, spec: ExperimentSpec | None) -> tuple[list[ArmReport], str]:
    """The arms with the control first (declared arms without counts included, as zeros), and a note on where the
    control came from."""
    arms = {arm.arm: arm for arm in counted.arms}
    if spec is None or not spec.arms:
        ordered = [arms[name] for name in sorted(arms)]
        return ordered, "not served now, so its kind is unknown; control: the first arm by name"
    control = _control(spec)
    declared = [arm.name for arm in spec.arms]
    names = [control, *(n for n in declared if n != control), *sorted(set(arms) - set(declared))]
    return [arms.get(name) or _no_counts(name) for name in names], f"{spec.kind}; control: {control}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(successes: int, trials: int) -> str:
    interval = wilson(successes, trials)
    if interval is None:
        return "-"
    return f"{successes / trials:.3f} ({interval[0]:.3f}-{interval[1]:.3f})"


def _arm_table(arms: Sequence[ArmReport]) -> list[str]:
    rows = [("arm", "users", "rows", "feedback", "accuracy (95% CI)", "p50 ms", "p99 ms")]
    rows += [
        (arm.arm, arm.users, arm.rows, arm.feedback, _rate(arm.correct, arm.feedback), _ms(arm.p50_ms), _ms(arm.p99_ms))
        for arm in arms
    ]
    width = max(len(row[0]) for row in rows)
    return [
        f"  {a:<{width}}  {u:>7}  {r:>9}  {f:>8}  {acc:<21}  {p50:>6}  {p99:>6}" for a, u, r, f, acc, p50, p99 in rows
    ]


def _significance(arms: Sequence[ArmReport]) -> list[str]:
    control, lines = arms[0], [f"significance (pooled two-proportion z-test on accuracy, vs {arms[0].arm}):"]
    for arm in arms[1:]:
        if min(arm.feedback, control.feedback) < MIN_FEEDBACK:
            counts = f"{arm.feedback} vs {control.feedback}; {MIN_FEEDBACK} per arm needed"
            lines.append(f"  {arm.arm}: not enough feedback ({counts})")
            continue
        z, p = two_proportion_z(control.correct, control.feedback, arm.correct, arm.feedback)
        difference = 100 * (arm.correct / arm.feedback - control.correct / control.feedback)
        verdict = "significant" if p < ALPHA else "not significant"
        shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
        lines.append(f"  {arm.arm}: {difference:+.1f} points, z = {z:.2f}, {shown}: {verdict} at {ALPHA:g}")
    return lines


def _best(arms: Sequence[ArmReport]) -> list[str]:
    chances = probability_best([(arm.correct, arm.feedback - arm.correct) for arm in arms])
    width = max(len(arm.arm) for arm in arms)
    lines = [f"probability of being the best arm (Beta(1 + correct, 1 + wrong) posteriors, {DRAWS:,} draws):"]
    lines += [f"  {arm.arm:<{width}}  {chance:.3f}" for arm, chance in zip(arms, chances, strict=True)]
    return lines


def _shadow(counted: ExperimentReport) -> list[str]:
    outcomes = {outcome: counted.shadow.get(outcome, 0) for outcome in ("agree", "disagree", "error", "dropped")}
    compared = outcomes["agree"] + outcomes["disagree"]
    return [
        f"rows mirrored: {sum(outcomes.values())} (sent {sum(outcomes.values()) - outcomes['dropped']})",
        f"agreement: {_rate(outcomes['agree'], compared)} of {compared} answered "
        f"(agree {outcomes['agree']}, disagree {outcomes['disagree']})",
        f"errors: {outcomes['error']}",
        f"dropped: {outcomes['dropped']}",
        f"shadow latency: p50 {_ms(counted.shadow_p50_ms)} ms, p99 {_ms(counted.shadow_p99_ms)} ms",
    ]


def render(counted: ExperimentReport, spec: ExperimentSpec | None) -> str:
    """The report's text; `spec` is the experiment as served (None: not served now)."""
    if not counted.arms and not counted.shadow:
        return f"no counts for experiment {counted.experiment!r}: no row was answered in it and no feedback taken"
    lines = []
    if counted.arms:
        arms, note = _ordered(counted, spec)
        lines += [f"experiment {counted.experiment} ({note})", *_arm_table(arms), ""]
        lines += [*_significance(arms), "", *_best(arms)]
    if counted.shadow:
        lines += [*([""] if lines else []), f"experiment {counted.experiment} (shadow)", *_shadow(counted)]
    return "\n".join(lines)


def _times(points: Sequence[TimePoint]) -> list[datetime]:
    return [datetime.fromtimestamp(point.start, timezone.utc) for point in points]


def plot(arms: Sequence[ArmReport], title: str, path: Path) -> None:
    """Two panels over time: accuracy per arm per time bucket (95% band where it has feedback), and p50 latency."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy, latency = figure.subplots(2, 1, sharex=True)
    for index, arm in enumerate(arms):
        style = {"color": f"C{index}", "marker": ".", "label": arm.arm}  # one colour per arm in both panels
        if judged := [point for point in arm.timeline if point.feedback > 0]:
            low, high = zip(*(wilson(point.correct, point.feedback) for point in judged), strict=True)
            accuracy.plot(_times(judged), [point.correct / point.feedback for point in judged], **style)
            accuracy.fill_between(_times(judged), low, high, color=style["color"], alpha=0.2)
        if timed := [point for point in arm.timeline if point.p50_ms is not None]:
            latency.plot(_times(timed), [point.p50_ms for point in timed], **style)
    accuracy.set(title=title, ylabel="accuracy from feedback (95% band)")
    latency.set(ylabel="p50 latency (ms)", xlabel="time bucket start (UTC)")
    locator = AutoDateLocator()
    latency.xaxis.set_major_locator(locator)
    latency.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    for panel in (accuracy, latency):
        panel.grid(alpha=0.3)
        if panel.has_data():
            panel.legend()
    figure.savefig(path, dpi=100)


def report(store: StateStore, name: str, png: Path | None) -> str:
    """The text `tierserve experiment report NAME` prints; with `png`, also the plot of its arms over time."""
    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError as error:
        return f"no counts for experiment {name!r}: not an experiment name ({error.errors()[0]['msg']})"
    counted = ExperimentStats(store).report(name)
    spec = _served(store, name)
    text = render(counted, spec)
    if png is not None:
        if not any(arm.timeline for arm in counted.arms):
            return f"{text}\nno plot: experiment {name!r} has no arm with rows over time"
        try:
            plot(_ordered(counted, spec)[0], f"experiment {name}", png)
        except ImportError:
            return f"{text}\nno plot: matplotlib is not installed (pip install matplotlib)"
        text += f"\nplot: {png}"
    return text
