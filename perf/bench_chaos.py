"""P4 resilience: kill -9 a model's Python stub under concurrency-8 traffic per tier, and follow every request.

Usage: .venv/bin/python perf/bench_chaos.py [--model digits_heavy] [--runs 3]   (about 5 min)
       .venv/bin/python perf/bench_chaos.py --table   (the README table, from perf/reports/p4_<model>.json)

A fault is not overload. 8 client threads per tier (critical and standard), each with a TierserveClient of its own,
send one noisy test image per request (sigma 6: most standard rows escalate to the heavy model; sigma 3 did while
digits_light:1 was the first stage, but digits_light:2 answers 73% of those itself), back to back. After a warm-up,
the stub of the shared light model (the cascade's first) or of the heavy one (the model the shipped cascade escalates
to on this server: harness.escalation_target) gets SIGKILL while the clients go on as before. Goals: 0 failed critical
requests, 0 shed standard requests, each router instance's breaker ejects the model within 5 failed calls, traffic is
back on the reloaded model within 10 s, in every run. Each kill is on a fresh server; run 1 kills the light model
first, run 2 the heavy one first, and so on. Writes perf/reports/p4_<model>.json (every run, and medians with min and
max) and perf/reports/p4_timeline_<model>.png (the last run).

Exit status: 1 when a run did not reach the operating point (a client thread died or fell silent, no escalations
before the kill, no traffic, the kill not seen): no report for that model; 2 when a goal was missed (report written).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import report_io
from harness import escalation_target, loaded_models, running_server
from report_io import cell, goal, verdicts

from tierserve.client import Classification, TierserveClient, TierserveError
from tierserve.tools.dataset import load_split
from tierserve.tools.load import LoadThreads
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import shipped_policy
from tierserve.tools.server import TritonServer
from tierserve.tools.workload import noisy

# --model: the model the cascade escalates to. Not digits_light: the router runs it in-process, so routed traffic
# never crosses its stub (a kill there is not a fault routed requests meet; test_chaos.py checks that).
KILLED = ("digits_heavy",)
TIERS, CONCURRENCY, SIGMA = ("critical", "standard"), 8, 6.0
WARM_UP_S, AFTER_KILL_S, BUCKET_S = 6.0, 16.0, 0.25
COMPARE_S = 5.0  # the seconds just before the kill are compared with as many just after it
ESCALATED_AT_LEAST = 0.5  # share of standard rows escalated to the heavy model before the kill: "most"
BACK_AFTER_ROWS = 10  # traffic is back once this many rows in a row that need the model are served by it
FAILED_CALLS_GOAL, BACK_GOAL_S = 5, 10.0
POLL_S = 0.05  # how often BreakerWatch reads the breakers
METRICS = ("throughput", "p50_ms", "p99_ms")  # per tier and phase: answered rows per second, latency
PHASES = {"before_kill": "5 s before the kill", "first_5_s_after_kill": "5 s after", "later": "the rest"}


@dataclass(frozen=True)
class Sent:
    """One request: when it was sent and answered (monotonic clock), by which thread, its answer or error."""

    sent: float
    at: float
    tier: str
    worker: int
    answer: Classification | None
    error: str | None  # "STATUS: message"


class ClosedLoop(LoadThreads):
    """CONCURRENCY threads per tier, each with its own client, one image per request, back to back."""

    JOIN_S = 30.0

    def __init__(self, url: str, images: np.ndarray, tier_key: str | None) -> None:
        super().__init__()
        self.sent: list[Sent] = []
        self.crashed: list[str] = []  # threads that ended on something other than a TierserveError
        self._tier_key = tier_key  # critical traffic needs the server's tier key
        self._threads = [
            threading.Thread(target=self._run, args=(url, images, tier, worker), daemon=True)
            for tier in TIERS
            for worker in range(CONCURRENCY)
        ]

    def _run(self, url: str, images: np.ndarray, tier: str, worker: int) -> None:
        try:
            with TierserveClient(url, tier_key=self._tier_key) as client:
                i = worker * len(images) // CONCURRENCY  # the threads start at different images
                while not self._stop.is_set():
                    sent = time.monotonic()
                    try:
                        (answer,) = client.classify(images[i % len(images)], tier=tier)
                        self.sent.append(Sent(sent, time.monotonic(), tier, worker, answer, None))
                    except TierserveError as error:
                        self.sent.append(Sent(sent, time.monotonic(), tier, worker, None, str(error)))
                    i += 1
        except Exception as error:  # reported as a missed operating point
            self.crashed.append(f"{tier} thread {worker}: {error!r}")


class BreakerWatch:
    """Polls the metrics port for the killed model's breaker state per router instance (0 closed, 1 half-open,
    2 open)."""

    def __init__(self, server: TritonServer, model: str) -> None:
        self._url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
        self._model = model
        self.samples: list[tuple[float, dict[str, float]]] = []  # (time, breaker state per router instance)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                with urllib.request.urlopen(self._url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            states = {}
            for line in text.splitlines():
                if line.startswith("tierserve_breaker_state{") and f'model="{self._model}"' in line:
                    states[re.search(r'instance="([^"]*)"', line).group(1)] = float(line.rsplit(" ", 1)[1])
            self.samples.append((time.monotonic(), states))

    def __enter__(self) -> BreakerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _hops(sent: Sent) -> list[str]:
    return sent.answer.path.split(">") if sent.answer else []


def _touches(sent: Sent, model: str) -> bool:
    return any(hop.split(" ")[0] == model for hop in _hops(sent))


def _served_by(sent: Sent, model: str) -> bool:
    return any(hop in (f"{model} ok", f"{model} low_confidence") for hop in _hops(sent))


def _failed_on(sent: Sent, model: str) -> bool:
    return any(hop in (f"{model} error", f"{model} timeout") for hop in _hops(sent))


def _escalated(sent: Sent, heavy: str) -> bool:
    return _served_by(sent, heavy) and "low_confidence>" in sent.answer.path


def _decision(sent: Sent) -> str:
    """What happened to a request, in the router's words: escalated, kept, skipped, a rule, a failed hop."""
    if sent.error:
        return "shed" if "shed" in sent.error else "failed"
    if not _direct(sent):
        return "answered after a failed or ejected hop"
    if "escalation skipped" in sent.answer.reason:
        return "escalation skipped"
    if "low_confidence>" in sent.answer.path:
        return "escalated"
    return sent.answer.reason.split(" (")[0] if sent.answer.reason.startswith("rule ") else "first answer kept"


def _kind(error: str) -> str:
    """An error message with its numbers blanked, so errors of one kind count together."""
    return re.sub(r"\d+(\.\d+)?", "N", error)[:200]


def _percentile_ms(sent: list[Sent], q: float) -> float | None:
    times = [(s.at - s.sent) * 1000 for s in sent if s.answer]
    return round(float(np.percentile(times, q)), 2) if times else None


def operating_point(load: ClosedLoop, sent: list[Sent], killed: float, heavy: str) -> list[str]:
    """Why this run did not measure what P4 asks for; empty when it did."""
    problems = [f"client thread crashed: {crash}" for crash in load.crashed]
    last_second = {(s.tier, s.worker) for s in sent if killed - 1.0 < s.at <= killed}
    if len(last_second) < CONCURRENCY * len(TIERS):
        problems.append(
            f"only {len(last_second)} of {CONCURRENCY * len(TIERS)} client threads got an answer "
            "in the second before the kill"
        )
    if load.alive() < CONCURRENCY * len(TIERS):
        problems.append(f"only {load.alive()} of {CONCURRENCY * len(TIERS)} client threads ran to the end")
    standard = [s for s in sent if s.tier == "standard" and s.answer and killed - COMPARE_S < s.at <= killed]
    share = sum(_escalated(s, heavy) for s in standard) / max(len(standard), 1)
    if share < ESCALATED_AT_LEAST:
        problems.append(
            f"{share:.0%} of {len(standard)} standard rows escalated to {heavy} before the "
            f"kill, fewer than {ESCALATED_AT_LEAST:.0%}"
        )
    for tier in TIERS:
        if not any(s.tier == tier and s.at > killed for s in sent):
            problems.append(f"no {tier} request after the kill")
    return problems


def summarize(model: str, models: dict[str, str], sent: list[Sent], samples: list, killed: float, end: float) -> dict:
    """The goals' numbers, and what else a reader needs to trust them, of one run that killed `model`; `models`:
    the cascade's heavy model and its critical lane."""
    by_tier = {tier: [s for s in sent if s.tier == tier] for tier in TIERS}
    after = sorted((s for s in sent if s.at > killed), key=lambda s: s.at)
    first_ejected = next((s.at for s in after if f"{model} ejected" in _hops(s)), None)
    # per router instance: when its breaker first opened after the kill
    opened: dict[str, float] = {}
    for at, states in samples:
        for instance, state in states.items():
            if at > killed and state == 2.0:
                opened.setdefault(instance, at)
    instances = sorted({instance for _, states in samples for instance in states})
    needing = [s for s in after if _touches(s, model)]
    back = None
    for i in range(len(needing) - BACK_AFTER_ROWS + 1):
        window = needing[i : i + BACK_AFTER_ROWS]
        if first_ejected and window[0].at > first_ejected and all(_served_by(s, model) for s in window):
            back = window[0].at
            break
    # REASON names why the breaker that ejected the row opened: "3 consecutive failed calls; ejection 1"
    pattern = re.compile(rf"{re.escape(model)} breaker open \((.*?); ejection (\d+)")
    ejections = Counter(
        f"ejection {m.group(2)}: {m.group(1)}"
        for s in after
        if s.answer
        for m in [pattern.search(s.answer.reason)]
        if m
    )
    failed_before = [s for s in after if _failed_on(s, model) and (first_ejected is None or s.sent < first_ejected)]
    # tier -> phase -> requests
    windows = {
        "before_kill": (killed - COMPARE_S, killed),
        "first_5_s_after_kill": (killed, killed + COMPARE_S),
        "later": (killed + COMPARE_S, end),
    }
    phases = {
        tier: {phase: [s for s in by_tier[tier] if low < s.at <= high] for phase, (low, high) in windows.items()}
        for tier in TIERS
    }
    escalating = [s for s in phases["standard"]["before_kill"] if s.answer]
    return {
        "model": model,
        **models,
        "setup": {
            "concurrency_per_tier": CONCURRENCY,
            "noise_sigma": SIGMA,
            "warm_up_s": WARM_UP_S,
            "after_kill_s": round(end - killed, 1),
            "router_instances": instances,
        },
        "requests": {tier: len(rows) for tier, rows in by_tier.items()},
        "failed": {tier: sum(1 for s in rows if s.error) for tier, rows in by_tier.items()},
        "shed_standard": sum(1 for s in by_tier["standard"] if s.error and "shed" in s.error),
        "errors_by_kind": dict(Counter(_kind(s.error) for s in sent if s.error).most_common(10)),
        "standard_escalated_before_kill": round(
            sum(_escalated(s, models["heavy"]) for s in escalating) / max(len(escalating), 1), 3
        ),
        "critical_rows_touching_the_killed_model": sum(1 for s in after if s.tier == "critical" and _touches(s, model)),
        "rows_with_a_failed_hop": {
            tier: {phase: sum(1 for s in rows if s.answer and not _direct(s)) for phase, rows in phases[tier].items()}
            for tier in TIERS
        },
        "decisions": {
            tier: {phase: dict(Counter(map(_decision, rows)).most_common()) for phase, rows in phases[tier].items()}
            for tier in TIERS
        },
        "critical_paths_with_a_failed_hop_after_kill": dict(
            Counter(s.answer.path for s in after if s.tier == "critical" and s.answer and not _direct(s)).most_common(6)
        ),
        "rows_failed_on_model_sent_before_ejection": len(failed_before),
        "rows_failed_on_model_after_kill": sum(1 for s in after if _failed_on(s, model)),
        "ejection_reasons": dict(ejections.most_common(6)),
        "seconds_to_first_ejection": round(first_ejected - killed, 3) if first_ejected else None,
        "seconds_to_breaker_open": {i: round(opened[i] - killed, 3) if i in opened else None for i in instances},
        "seconds_until_traffic_back": round(back - killed, 3) if back else None,
        "latency_ms": {
            tier: {
                phase: {"p50": _percentile_ms(rows, 50), "p99": _percentile_ms(rows, 99)}
                for phase, rows in phases[tier].items()
            }
            for tier in TIERS
        },
        "measurements": [
            {
                "condition": f"{tier}, {PHASES[phase]}",
                "tier": tier,
                "phase": phase,
                "throughput": (
                    sum(1 for s in rows if s.answer) / (windows[phase][1] - windows[phase][0])
                    if windows[phase][1] > windows[phase][0]
                    else None
                ),
                "p50_ms": _percentile_ms(rows, 50),
                "p99_ms": _percentile_ms(rows, 99),
            }
            for tier in TIERS
            for phase, rows in phases[tier].items()
        ],
        "paths_first_3_s_after_kill": dict(
            Counter(s.answer.path for s in after if s.answer and s.at < killed + 3).most_common(8)
        ),
    }


def goal_figures(run: dict) -> dict[str, float | None]:
    """What each goal judges in one run: failed critical requests, shed standard requests, the most failed calls a
    breaker took to eject the model (None when a router instance's breaker never opened), and the seconds until
    traffic was back on the reloaded model (None: never)."""
    # a first ejection after N consecutive failed calls, or N of M failed calls, counts N; a dead stub's own
    # error ("model down") ejects at once, on the failed call that carried it
    counted = [
        int(m.group(1))
        for why in run["ejection_reasons"]
        for m in [re.match(r"ejection 1: (\d+) (consecutive|of)", why)]
        if m
    ]
    every_breaker_opened = None not in run["seconds_to_breaker_open"].values()
    return {
        "failed_critical": run["failed"]["critical"],
        "shed_standard": run["shed_standard"],
        "failed_calls_to_eject": max(counted, default=1) if every_breaker_opened else None,
        "seconds_until_traffic_back": run["seconds_until_traffic_back"],
    }


def goals(runs: list[dict]) -> list[dict]:
    """P4's goals over every run: the counts summed, the others judged by the worst run."""
    figures = [goal_figures(run) for run in runs]

    def total(key: str) -> float:
        return sum(f[key] for f in figures)

    def worst(key: str) -> float | None:
        values = [f[key] for f in figures]
        return None if None in values else max(values)

    return [
        goal("failed critical requests, all runs", total("failed_critical"), "==", 0),
        goal("shed standard requests, all runs", total("shed_standard"), "==", 0),
        goal(
            "failed calls until each breaker ejects the model, worst run",
            worst("failed_calls_to_eject"),
            "<=",
            FAILED_CALLS_GOAL,
        ),
        goal(
            "seconds until traffic is back on the reloaded model, worst run",
            worst("seconds_until_traffic_back"),
            "<=",
            BACK_GOAL_S,
            ".2f",
        ),
    ]


def plot(
    model: str, sent: list[Sent], samples: list, start: float, killed: float, end: float, path: Path, run: str
) -> None:
    """Requests per second per tier and what answered them, around the kill; shaded: a router's breaker open."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.arange(start, end, BUCKET_S)  # whole buckets only
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)

    def rate(rows: list[Sent]) -> np.ndarray:
        return np.histogram([s.at for s in rows], edges)[0] / BUCKET_S

    x = edges[:-1] - killed
    instances = sorted({i for _, states in samples for i in states})
    for ax, tier in zip(axes, TIERS, strict=True):
        rows = [s for s in sent if s.tier == tier]
        for route in sorted({s.answer.route for s in rows if s.answer}):
            mine = [s for s in rows if s.answer and s.answer.route == route and _direct(s)]
            if len(mine) > 10:
                ax.plot(x, rate(mine), label=f"answered by {route}")
        ax.plot(
            x,
            rate([s for s in rows if s.answer and not _direct(s)]),
            label="answered, a hop failed or was ejected on the way",
        )
        ax.plot(x, rate([s for s in rows if s.error and "shed" in s.error]), label="shed", color="red")
        ax.plot(
            x,
            rate([s for s in rows if s.error and "shed" not in s.error]),
            label="failed",
            color="black",
            linestyle=":",
            linewidth=2,
        )
        ax.axvline(0, color="gray", linestyle="--", label=f"kill -9 {model}")
        for instance in instances:
            opened = [at - killed for at, states in samples if states.get(instance) == 2.0]
            label = f"{model} breaker open ({len(instances)} router instances, a shade each)"
            for at in opened:  # one span per sample, as wide as the time between samples
                ax.axvspan(
                    at - POLL_S,
                    at,
                    color="purple",
                    alpha=0.12,
                    linewidth=0,
                    label=label if instance == instances[0] and at == opened[0] else None,
                )
        ax.set_title(f"{tier}: {CONCURRENCY} client threads, one image per request", fontsize=10)
        ax.set_ylabel("requests / s")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xlabel(f"seconds since the kill ({BUCKET_S:g} s buckets)")
    fig.suptitle(f"P4, {run}: kill -9 of {model}'s stub under steady load, noisy images (sigma {SIGMA:g})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _direct(sent: Sent) -> bool:
    return not any(hop.endswith((" error", " timeout", " ejected")) for hop in _hops(sent))


def run(name: str, index: int, after_kill_s: float, reports: Path) -> tuple[dict | None, list[str]]:
    """One run against a fresh server: kill the stub of `name`'s model; the run's figures (None when it did not
    reach the operating point), and why not. Plots the timeline (the last run's stays)."""
    images = noisy(load_split().test.images, sigma=SIGMA, seed=4)
    shipped = shipped_policy(DEFAULT_REPOSITORY)
    with running_server() as server:
        heavy = escalation_target(shipped, loaded_models(server))
        version = report_io.tritonserver_version(server.http_url)
        models = {"heavy": heavy, "critical_lane": shipped.get("lanes", {}).get("critical", {}).get(heavy, heavy)}
        model = shipped["cascade"]["first"] if name == "digits_light" else heavy
        pids = server.stub_pids("/".join(model.split(":")))
        if len(pids) != 1:
            return None, [f"{len(pids)} Python stubs of {model}, not one: nothing to kill"]
        with BreakerWatch(server, model) as watch, ClosedLoop(server.grpc_url, images, server.tier_key) as load:
            start = time.monotonic()
            time.sleep(WARM_UP_S)
            killed = time.monotonic()
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(after_kill_s)
            end = time.monotonic()
            sent = sorted((s for s in load.sent if s.at <= end), key=lambda s: s.at)
            problems = operating_point(load, sent, killed, heavy)
    if not any(_touches(s, model) for s in sent if s.at > killed):
        problems.append(f"no request reached {model} after the kill")
    elif not any(_failed_on(s, model) for s in sent if s.at > killed):
        problems.append(
            f"the kill was never seen: no call to {model} failed after it (does the router serve it itself?)"
        )
    if not any(states for _, states in watch.samples):
        problems.append(f"no breaker state for {model} on the metrics port")
    if problems:
        return None, problems
    plot(model, sent, watch.samples, start, killed, end, reports / f"p4_timeline_{name}.png", f"run {index + 1}")
    return {"run": index + 1, "tritonserver": version, **summarize(model, models, sent, watch.samples, killed, end)}, []


def measure(names: list[str], runs: int, after_kill_s: float, reports: Path) -> dict[str, dict | list[str]]:
    """Every run of every named kill, the kills' order swapped per run; per name its report (written), or the
    reasons its runs missed the operating point (no report)."""
    heads = {
        name: report_io.start(
            f"p4_{name}",
            {
                "runs": runs,
                "killed": name,
                "concurrency_per_tier": CONCURRENCY,
                "tiers": list(TIERS),
                "noise_sigma": SIGMA,
                "warm_up_s": WARM_UP_S,
                "after_kill_s": after_kill_s,
                "order": "a fresh server per kill"
                + (
                    f"; run 1 kills {', then '.join(names)}, each next run the other way round"
                    if len(names) > 1
                    else ""
                ),
            },
        )
        for name in names
    }
    problems: dict[str, list[str]] = {name: [] for name in names}
    for index in range(runs):
        for name in names[:: 1 if index % 2 == 0 else -1]:
            result, missed = run(name, index, after_kill_s, reports)
            problems[name] += [f"run {index + 1}: {why}" for why in missed]
            if result:
                heads[name]["machine"]["tritonserver"] = result.pop("tritonserver")
                heads[name]["runs"].append(result)
                print(f"P4 run {index + 1}, {result['model']} killed: {goal_figures(result)}", flush=True)
            else:
                print(f"P4 run {index + 1}, {name}: operating point not reached: {'; '.join(missed)}", flush=True)
    outcome: dict[str, dict | list[str]] = {}
    for name, report in heads.items():
        if problems[name]:
            outcome[name] = problems[name]
            continue
        summary = {
            "conditions": report_io.conditions(report["runs"], ("condition", "tier", "phase"), METRICS),
            "goals": goals(report["runs"]),
        }
        report_io.finish(report, summary, reports / f"p4_{name}.json")
        outcome[name] = report
    return outcome


def _last_ejection(run: dict) -> float | None:
    """Seconds from the kill until the last router instance's breaker opened; None when one never did."""
    seconds = list(run["seconds_to_breaker_open"].values())
    return None if not seconds or None in seconds else max(seconds)


def _runs_spread(report: dict, figure: Callable[[dict], float | None], fmt: str) -> str:
    """A figure of every run of a report: one value, or the median (min to max), and how many runs never got one."""
    values = [figure(run) for run in report["runs"]]
    found = [v for v in values if v is not None]
    never = f"never in {len(values) - len(found)} of {len(values)} runs" if len(found) < len(values) else ""
    return ", ".join(filter(None, [cell(report_io.spread(found), fmt) if found else "", never]))


def table(reports: list[dict]) -> str:
    """The README's P4 table, from the reports (one per killed model)."""

    def row(measure: str, values: list[str]) -> str:
        return f"| {measure} | {' | '.join(values)} |"

    def totals(*figures: Callable[[dict], int]) -> list[str]:
        return [" / ".join(f"{sum(f(run) for run in r['runs']):,}" for f in figures) for r in reports]

    def spread(figure: Callable[[dict], float | None], fmt: str) -> list[str]:
        return [_runs_spread(r, figure, fmt) for r in reports]

    def escalated(decisions: dict[str, int]) -> float:
        return decisions.get("escalated", 0) / max(sum(decisions.values()), 1)

    first = reports[0]["runs"][0]
    lines = [
        "| measure (sums over the runs, or the median (min to max) of the runs) | "
        + " | ".join(f"kill -9 `{r['runs'][0]['model']}`" for r in reports)
        + " |",
        f"|---|{'---:|' * len(reports)}",
        row("runs", [str(len(r["runs"])) for r in reports]),
        row(
            "critical requests sent / failed",
            totals(lambda run: run["requests"]["critical"], lambda run: run["failed"]["critical"]),
        ),
        row(
            "standard requests sent / failed / shed",
            totals(
                lambda run: run["requests"]["standard"],
                lambda run: run["failed"]["standard"],
                lambda run: run["shed_standard"],
            ),
        ),
        row(
            f"standard rows escalated to `{first['heavy']}` before the kill",
            spread(lambda run: run["standard_escalated_before_kill"], ".0%"),
        ),
        row(
            "critical rows that touched the killed model",
            totals(lambda run: run["critical_rows_touching_the_killed_model"]),
        ),
        row(
            "critical rows answered after a failed hop: 5 s before the kill / 5 s after / the rest of the run",
            totals(*(lambda run, phase=phase: run["rows_with_a_failed_hop"]["critical"][phase] for phase in PHASES)),
        ),
        row(
            f"critical rows escalated to `{first['critical_lane']}`: 5 s before / 5 s after / the rest",
            [
                " / ".join(
                    _runs_spread(r, lambda run, phase=phase: escalated(run["decisions"]["critical"][phase]), ".0%")
                    for phase in PHASES
                )
                for r in reports
            ],
        ),
        row(
            "rows that hit the dead model, sent before its first ejection",
            spread(lambda run: run["rows_failed_on_model_sent_before_ejection"], ",.0f"),
        ),
        row(
            "why the breakers ejected it (rows that read each reason, all runs)",
            [
                "; ".join(
                    f"{why[:70]} ({n:,})"
                    for why, n in sum((Counter(run["ejection_reasons"]) for run in r["runs"]), Counter()).most_common(3)
                )
                for r in reports
            ],
        ),
        row(
            "failed calls until each breaker ejected the model (the most of any breaker)",
            spread(lambda run: goal_figures(run)["failed_calls_to_eject"], ".0f"),
        ),
        row("seconds from the kill to the last router instance's ejection", spread(_last_ejection, ".2f")),
        row(
            "seconds from the kill until traffic is back on the reloaded model",
            spread(lambda run: run["seconds_until_traffic_back"], ".2f"),
        ),
        *(
            row(
                f"{tier} p99 ms: 5 s before the kill / 5 s after",
                [
                    " / ".join(
                        _runs_spread(
                            r, lambda run, tier=tier, phase=phase: run["latency_ms"][tier][phase]["p99"], ".1f"
                        )
                        for phase in list(PHASES)[:2]
                    )
                    for r in reports
                ],
            )
            for tier in TIERS
        ),
    ]
    for r in reports:
        lines.append(
            f"\nKill -9 `{r['runs'][0]['model']}`: " + report_io.provenance(r) + "\n" + verdicts(r["summary"]["goals"])
        )
    lines.append(f"\n{reports[0]['settings']['order'].capitalize()}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_io.add_arguments(parser)
    parser.add_argument("--model", choices=[*KILLED, "both"], default="both", help="whose stub is killed")
    parser.add_argument(
        "--after-kill-s", type=float, default=AFTER_KILL_S, help=f"load after the kill (default {AFTER_KILL_S:g} s)"
    )
    args = parser.parse_args()
    names = list(KILLED) if args.model == "both" else [args.model]
    if args.table:
        reports = {path: report_io.read(path) for path in (args.reports / f"p4_{name}.json" for name in names)}
        if old := [str(path) for path, report in reports.items() if not report_io.repeated_runs(report)]:
            sys.exit(f"{', '.join(old)}: a report from before repeated runs; measure again")
        print(table(list(reports.values())))
        return
    outcome = measure(names, args.runs, args.after_kill_s, args.reports)
    written = [report for report in outcome.values() if isinstance(report, dict)]
    for name, problems in outcome.items():
        if isinstance(problems, list):
            print(f"P4 {name}: operating point not reached, no report:\n  " + "\n  ".join(problems), file=sys.stderr)
    if written:
        print("\n" + table(written))
    if len(written) < len(names):
        sys.exit(1)
    sys.exit(0 if all(report_io.met(g) for r in written for g in r["summary"]["goals"]) else 2)


if __name__ == "__main__":
    main()
