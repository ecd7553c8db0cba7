"""Experiments against a real server: what a 100% shadow costs in throughput, and what per-user adaptation buys.

Usage: .venv/bin/python perf/bench_experiments.py [shadow|adaptation]   (both when none is named; ~3 min for both)
       .venv/bin/python perf/bench_experiments.py --table [shadow|adaptation]   (README tables, from the reports)

Shadow cost (perf/reports/shadow_cost.json): one server; perf_analyzer at concurrency 8 through `digits` over gRPC,
one real test image per request, standard tier, a user_id set (a shadow's unit is the user). The two conditions
alternate PAIRS times: no experiment, then `shadow_v1` mirroring every row to digits_heavy:1; the router is
reloaded (experiment applied or removed) before every run, the first run of each condition included. Per
condition: median throughput and p50/p99 over the runs, with min and max; per shadow run, from the state store,
how many of the rows `digits` served were mirrored and how many of those were sent to the candidate (the rest
dropped under load or lost). Goal: shadow throughput at least 0.90x none's (ratio of the medians). Operating
point: every perf_analyzer run settles, and the shadow is a 100% shadow: at least 95% of the rows served were
sent to the candidate in every shadow run.

Per-user adaptation (perf/reports/adaptation.json and adaptation.png): first, on the learning half of the test split
(its even rows) under candidate transforms, direct calls to the cascade's first model (policy.yaml cascade.first)
and to HEAVY, the model its escalations reach on a CPU host, and calls to `digits` with no user (the global policy,
TIER); the transform where the global policy falls furthest short of HEAVY's accuracy, among those HEAVY still gets
at least 90% right, makes the "hard" users' images: per-user adaptation can only raise a user's accuracy where the
global policy leaves some to gain. Of the other candidates, the one the first model gets right least often while
still more often than the policy's adaptation.relax_above makes the "moderate" users' images: the users a relaxation
puts most at risk. A population of GROUP_USERS hard, moderate and clean users, standard tier, CLIENT_THREADS
client threads (adaptation is off under load). Learning: each user sends LEARN_REQUESTS images (the even rows of the
test split) and feeds the true label back for every answer. Evaluation: each user sends EVAL_REQUESTS other images
(the odd rows), once under their own user_id (adapted) and once under a fresh user_id with no feedback (the global
policy answers it): the same images, request by request. Per group: accuracy with a 95% Wilson interval and the
share of rows that called digits_heavy. Goal: the hard users' accuracy is higher adapted than global, the moderate
and clean users' at least KEEPS of global's, at an overall share of heavy calls no higher than global's; the report
also gives the share of hard users' rows up to which the heavy share stays no higher, the others mixed as here.
Operating point: no request fails, every evaluated cascade row of a user whose record
adapts says "per-user" in REASON (adaptation was not skipped under load), and no global row does.

Exit status 1 when an operating point is not reached or a goal is missed: the report is written, the reason goes
to stderr, and no table is printed. `--table` prints a report's table with its verdict either way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import perf_analyzer
import tritonclient.grpc as grpcclient
from harness import running_server
from report_io import machine, spread, spread_text

from tierserve.client import Classification, TierserveClient, TierserveError
from tierserve.experiment_spec import parse_experiments
from tierserve.experiment_stats import ExperimentStats, ShadowOutcome
from tierserve.policy import Policy
from tierserve.request_ids import user_key
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.state_store import open_store, shared_secret
from tierserve.tools.dataset import load_split, shifted_copies
from tierserve.tools.experiment_admin import serve_experiments
from tierserve.tools.experiment_report import wilson
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.server import TritonServer
from tierserve.tools.workload import noisy
from tierserve.user_adaptation import Adjustment, UserStates, adapted_cascade

REPORTS = Path(__file__).parent / "reports"
SHADOW_REPORT = REPORTS / "shadow_cost.json"
ADAPTATION_REPORT = REPORTS / "adaptation.json"
ADAPTATION_PLOT = REPORTS / "adaptation.png"

# shadow cost
SHADOW = {"name": "shadow_v1", "kind": "shadow", "shadow": {"candidate": "digits_heavy:1", "fraction": 1.0}}
PAIRS, CONCURRENCY, MEASUREMENT_MS = 4, 8, 3000  # perf_analyzer settles on 3 stable windows: ~10 s a run
SHADOW_USER = "bench-user"
SETTLE_S = 1.0  # after a router reload, before traffic
RATIO_GOAL = 0.90
SENT_AT_LEAST = 0.95  # share of served rows sent to the candidate for the shadow to count as a 100% shadow

# per-user adaptation
TIER = "standard"
GROUP_USERS = {"hard": 20, "moderate": 20, "clean": 40}
KEEPS = 0.995  # the moderate and clean users' accuracy adapted, at least this share of global's
LEARN_REQUESTS = 40  # >= 32: a user the first model always gets right can pass relax_above 0.97 ((n+1)/(n+2))
EVAL_REQUESTS = 50
CLIENT_THREADS = 2
HEAVY = "digits_heavy:3"  # where the cascade's escalations go on a host without the TensorRT variant
HEAVY_MOSTLY_RIGHT = 0.90  # a hard transform must leave HEAVY at least this accurate
SKIPPED_AT_MOST = 0.01  # share of an adapted user's cascade rows answered without "per-user"
GROUPS = (*GROUP_USERS, "all")
GLOBAL = "global policy"  # a user whose record changes nothing (or who has none)
ADJUSTMENTS = (*(adjustment.value for adjustment in Adjustment), GLOBAL)
CONDITIONS = ("adapted", "global")


def _one_pixel_shift(direction: int) -> Callable[[np.ndarray], np.ndarray]:
    """shifted_copies' copy `direction` (1 right, 2 left, 3 down, 4 up) of every image."""
    return lambda images: shifted_copies(images).reshape(5, *images.shape)[direction]


def _blurred(images: np.ndarray) -> np.ndarray:
    """Half of each pixel kept, the other half spread evenly over its four neighbours (zero beyond the edge)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return (0.5 * images + 0.125 * neighbours).astype(np.float32)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "shifted one pixel right": _one_pixel_shift(1),
    "shifted one pixel left": _one_pixel_shift(2),
    "shifted one pixel down": _one_pixel_shift(3),
    "shifted one pixel up": _one_pixel_shift(4),
    "blurred (half of each pixel to its 4 neighbours)": _blurred,
    "Gaussian noise, sigma 3": lambda images: noisy(images, sigma=3.0, seed=11),
    "Gaussian noise, sigma 4": lambda images: noisy(images, sigma=4.0, seed=11),
}


def _apply(server: TritonServer, policy: Policy, *experiments: dict) -> None:
    serve_experiments(server.http_url, server.admin_key, parse_experiments({"experiments": list(experiments)}, policy))


def _model_counts(server: TritonServer) -> dict[str, int]:
    """Triton's own counters since the server started: rows `digits` (the router) answered, its executions, and
    the calls and rows digits_heavy:1 (the shadow candidate) took."""
    counts = {}
    for key, path in (("digits", ROUTER_MODEL), ("candidate", "digits_heavy/versions/1")):
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{path}/stats", timeout=5) as response:
            for stats in json.load(response)["model_stats"]:
                counts[f"{key}_rows"] = counts.get(f"{key}_rows", 0) + int(stats["inference_count"])
                counts[f"{key}_executions"] = counts.get(f"{key}_executions", 0) + int(stats["execution_count"])
                calls = int(stats["inference_stats"]["success"]["count"])
                counts[f"{key}_calls"] = counts.get(f"{key}_calls", 0) + calls
    return counts


def _shadow_counts(server: TritonServer) -> dict[str, int]:
    store = open_store(server.state)
    try:
        return dict(ExperimentStats(store).report(SHADOW["name"]).shadow)
    finally:
        store.close()


def measure_shadow() -> dict:
    """PAIRS alternations of none and a 100% shadow on one server; each run's throughput, latency and rows."""
    policy = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
    images = load_split().test.images[:64]
    extra = ("--request-parameter", f"tier:{TIER}:string", "--request-parameter", f"user_id:{SHADOW_USER}:string")
    runs, pairs, problems = [], [], []  # pairs: shadow / none throughput of each pair where both settled
    with running_server() as server:
        facts = machine(server.http_url)

        def run(condition: str, warm_up: bool = False) -> dict | None:
            _apply(server, policy, *([SHADOW] if condition == "shadow" else []))
            time.sleep(SETTLE_S)
            counts, before = _shadow_counts(server), _model_counts(server)
            try:
                (m,) = perf_analyzer.run(
                    server.grpc_url, "digits", images, [CONCURRENCY], measurement_ms=MEASUREMENT_MS, extra_args=extra
                )
            except subprocess.CalledProcessError as error:
                if not warm_up:
                    problems.append(f"{condition}: perf_analyzer did not settle at concurrency {CONCURRENCY} ({error})")
                return None
            calls = {key: value - before[key] for key, value in _model_counts(server).items()}
            _apply(server, policy)  # the removed router flushes what it counted when it finalizes
            time.sleep(SETTLE_S)
            after = _shadow_counts(server)
            outcomes = {o.value: after.get(o.value, 0) - counts.get(o.value, 0) for o in ShadowOutcome}
            return {
                "condition": condition,
                "throughput": m.throughput,
                "p50_ms": m.p50_us / 1000,
                "p99_ms": m.p99_us / 1000,
                "rows_served": calls["digits_rows"],
                "router_executions": calls["digits_executions"],
                "candidate_calls": calls["candidate_calls"],
                "candidate_rows": calls["candidate_rows"],
                "shadow_outcomes": outcomes,
            }

        run("none", warm_up=True)
        for _ in range(PAIRS):
            pair = [run(condition) for condition in ("none", "shadow")]
            runs += [result for result in pair if result]
            if all(pair):
                pairs.append(pair[1]["throughput"] / pair[0]["throughput"])
            for result in filter(None, pair):
                print(
                    f"  {result['condition']}: {result['throughput']:,.0f}/s, p99 {result['p99_ms']:.2f} ms", flush=True
                )
    by_condition = {c: [r for r in runs if r["condition"] == c] for c in ("none", "shadow")}
    summary = {}
    for condition, rows in by_condition.items():
        if not rows:
            problems.append(f"no {condition} run settled")
            continue
        summary[condition] = {
            "runs": len(rows),
            "throughput": spread([r["throughput"] for r in rows]),
            "p50_ms": spread([r["p50_ms"] for r in rows]),
            "p99_ms": spread([r["p99_ms"] for r in rows]),
            **{key: sum(r[key] for r in rows) for key in ("rows_served", "router_executions", "candidate_calls")},
        }
    for r in by_condition["shadow"]:
        outcomes, served = r["shadow_outcomes"], max(r["rows_served"], 1)
        mirrored = sum(outcomes.values())
        sent = mirrored - outcomes[ShadowOutcome.DROPPED.value]
        r["mirrored_share"], r["sent_share"] = mirrored / served, sent / served
        if r["sent_share"] < SENT_AT_LEAST:
            problems.append(
                f"not a 100% shadow: a shadow run sent {sent:,} of {r['rows_served']:,} rows served to the candidate "
                f"({r['sent_share']:.1%}; {mirrored / served:.1%} mirrored, "
                f"{outcomes[ShadowOutcome.DROPPED.value]:,} dropped), fewer than {SENT_AT_LEAST:.0%}"
            )
    if by_condition["shadow"]:
        totals = {o.value: sum(r["shadow_outcomes"][o.value] for r in by_condition["shadow"]) for o in ShadowOutcome}
        summary["shadow"]["outcomes"] = totals
        served = max(summary["shadow"]["rows_served"], 1)
        summary["shadow"]["mirrored_share"] = sum(totals.values()) / served
        summary["shadow"]["sent_share"] = (sum(totals.values()) - totals[ShadowOutcome.DROPPED.value]) / served
        calls = max(summary["shadow"]["candidate_calls"], 1)
        summary["shadow"]["rows_per_candidate_call"] = sum(r["candidate_rows"] for r in by_condition["shadow"]) / calls
        summary["shadow"]["router_executions_per_candidate_call"] = summary["shadow"]["router_executions"] / calls
    ratio = (
        summary["shadow"]["throughput"]["median"] / summary["none"]["throughput"]["median"]
        if len(summary) == 2
        else None
    )
    return {
        "machine": facts,
        "run": {
            "pairs": PAIRS,
            "concurrency": CONCURRENCY,
            "measurement_ms": MEASUREMENT_MS,
            "tier": TIER,
            "user_id": SHADOW_USER,
            "images": "the first 64 test images, one per request, gRPC",
            "experiment": SHADOW,
            "order": "none, shadow, repeated; the router reloaded before every run",
        },
        "runs": runs,
        "summary": summary,
        "throughput_ratio": ratio,
        "pair_ratios": spread(pairs) if pairs else None,
        "goal": f"throughput with a 100% shadow >= {RATIO_GOAL:.2f}x without",
        "problems": problems,
        "goal_met": not problems and ratio is not None and ratio >= RATIO_GOAL,
    }


def shadow_table(report: dict) -> str:
    """The README's shadow-cost table, from the report."""
    s = report["summary"]

    lines = [
        f"| condition (concurrency {report['run']['concurrency']}, {report['run']['tier']} tier) | runs "
        "| inferences/s, median (min to max) | p50 ms | p99 ms | rows served | mirrored | sent to the candidate "
        "| agree / disagree / error / dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for condition, name in (("none", "no experiment"), ("shadow", "`shadow_v1`: 100% to `digits_heavy:1`")):
        if condition not in s:
            continue
        c = s[condition]
        cells = [name, str(c["runs"]), spread_text(c["throughput"], ",.0f"), spread_text(c["p50_ms"], ".2f")]
        cells += [spread_text(c["p99_ms"], ".2f"), f"{c['rows_served']:,}"]
        if outcomes := c.get("outcomes"):
            cells += [f"{c['mirrored_share']:.1%}", f"{c['sent_share']:.1%}"]
            cells.append(" / ".join(f"{outcomes[o.value]:,}" for o in ShadowOutcome))
        else:
            cells += ["", "", ""]
        lines.append(f"| {' | '.join(cells)} |")
    ratio, pairs = report["throughput_ratio"], report["pair_ratios"]
    verdict = "**met**" if report["goal_met"] else "**not met**"
    lines.append(
        f"\nShadow vs none throughput: {ratio:.3f}x (ratio of medians; per pair {spread_text(pairs, '.3f')}). "
        f"Goal {report['goal']}: {verdict}."
        if ratio is not None
        else f"\nGoal {report['goal']}: {verdict}."
    )
    if "rows_per_candidate_call" in s.get("shadow", {}):
        shadow, none = s["shadow"], s["none"]
        lines.append(
            f"The shadow sent {shadow['candidate_calls']:,} calls to `digits_heavy:1`, "
            f"{shadow['rows_per_candidate_call']:.1f} rows per call, "
            f"one per {shadow['router_executions_per_candidate_call']:.1f} router executions "
            f"({shadow['rows_served'] / max(shadow['router_executions'], 1):.1f} rows per execution; without the "
            f"shadow {none['rows_served'] / max(none['router_executions'], 1):.1f})."
        )
    if report["problems"]:
        lines.append("Not measured as asked: " + "; ".join(report["problems"]))
    m = report["machine"]
    lines.append(
        f"{m['cpus']} CPUs ({m['processor']}), tritonserver {m['tritonserver']}, Python {m['python']}; perf_analyzer "
        f"and the server share the CPUs."
    )
    return "\n".join(lines)


# per-user adaptation


@dataclass(frozen=True)
class User:
    name: str
    group: str  # hard | moderate | clean
    learn: np.ndarray  # [LEARN_REQUESTS] rows of the test split
    evaluate: np.ndarray  # [EVAL_REQUESTS] rows of the test split


@dataclass(frozen=True)
class Row:
    """One evaluated request: whose, under which condition, and what answered it."""

    user: str
    group: str
    condition: str
    correct: bool
    heavy: bool  # a digits_heavy model was called for it
    cascade: bool  # the cascade answered it (not a rule)
    per_user: bool  # REASON says per-user adaptation applied


def _direct_accuracy(url: str, model: str, version: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of one model called directly (no router), in batches of 64."""
    client = grpcclient.InferenceServerClient(url)
    try:
        predicted = []
        for start in range(0, len(images), 64):
            batch = np.ascontiguousarray(images[start : start + 64], dtype=np.float32)
            pixels = grpcclient.InferInput("PIXELS", list(batch.shape), "FP32")
            pixels.set_data_from_numpy(batch)
            result = client.infer(model, [pixels], model_version=version)
            predicted.append(result.as_numpy("PROBS").argmax(axis=1))
    finally:
        client.close()
    return float(np.mean(np.concatenate(predicted) == labels))


def _global_policy(client: TierserveClient, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Accuracy of `digits` for a request with no user (the global policy) at TIER, and the share of rows that
    called a digits_heavy model, in batches of 32."""
    answers = [
        answer
        for start in range(0, len(images), 32)
        for answer in client.classify(images[start : start + 32], tier=TIER)
    ]
    correct = [answer.label == int(label) for answer, label in zip(answers, labels, strict=True)]
    return float(np.mean(correct)), float(np.mean([_heavy(answer) for answer in answers]))


def choose_transform(
    url: str, client: TierserveClient, first: str, images: np.ndarray, labels: np.ndarray
) -> tuple[list[dict], str | None]:
    """Every candidate's direct accuracy of `first` (model:version) and HEAVY, and the global policy's through
    `digits`; the one where the global policy falls furthest short of HEAVY, among those where HEAVY stays right."""
    measured = []
    for name, transform in {"none (clean)": lambda x: x, **TRANSFORMS}.items():
        transformed = transform(images)
        light = _direct_accuracy(url, *first.split(":"), transformed, labels)
        heavy = _direct_accuracy(url, *HEAVY.split(":"), transformed, labels)
        policy, escalated = _global_policy(client, transformed, labels)
        measured.append(
            {
                "transform": name,
                "light": light,
                "heavy": heavy,
                "global_policy": policy,
                "global_heavy_share": escalated,
                "room": heavy - policy,
            }
        )
    fit = [m for m in measured[1:] if m["heavy"] >= HEAVY_MOSTLY_RIGHT]
    return measured, max(fit, key=lambda m: m["room"])["transform"] if fit else None


def population(test_size: int) -> list[User]:
    """Each group's users, each with their own seeded draw of learning (even) and evaluation (odd) rows."""
    learn_rows, eval_rows = np.arange(0, test_size, 2), np.arange(1, test_size, 2)
    users = []
    for group, count in GROUP_USERS.items():
        for _ in range(count):
            rng = np.random.default_rng(1000 + len(users))
            users.append(
                User(
                    f"{group}-{len(users):02d}",
                    group,
                    rng.choice(learn_rows, LEARN_REQUESTS, replace=False),
                    rng.choice(eval_rows, EVAL_REQUESTS, replace=False),
                )
            )
    return users


def choose_moderate(transforms: list[dict], hard: str, relax_above: float) -> str | None:
    """Of the candidates but `hard`, the one the first model gets right least often while more often than
    `relax_above`: the images of users a relaxation puts most at risk."""
    fit = [t for t in transforms[1:] if t["transform"] != hard and t["light"] > relax_above]
    return min(fit, key=lambda t: t["light"])["transform"] if fit else None


def _heavy(answer: Classification) -> bool:
    return any(hop.split(" ")[0].startswith("digits_heavy") for hop in answer.path.split(">"))


def _learn(client: TierserveClient, user: User, images: np.ndarray, labels: np.ndarray) -> None:
    for row in user.learn:
        (answer,) = client.classify(images[row], tier=TIER, user_id=user.name)
        client.feedback(answer.request_id, int(labels[row]))


def _evaluate(client: TierserveClient, user: User, images: np.ndarray, labels: np.ndarray) -> list[Row]:
    """Each evaluation image under the user's own id, then under a fresh id that never gave feedback."""
    rows = []
    for row in user.evaluate:
        for condition, user_id in (("adapted", user.name), ("global", f"fresh-{user.name}")):
            (answer,) = client.classify(images[row], tier=TIER, user_id=user_id)
            rows.append(
                Row(
                    user.name,
                    user.group,
                    condition,
                    answer.label == int(labels[row]),
                    _heavy(answer),
                    answer.reason.startswith("cascade"),
                    "per-user" in answer.reason,
                )
            )
    return rows


def _verdicts(server: TritonServer, policy: Policy, users: list[User]) -> dict[str, dict]:
    """Each user's record in the state store and what it makes of their rows, as the router decides it."""
    store = open_store(server.state)
    try:
        secret = shared_secret(store)
        keys = {user.name: user_key(secret, user.name) for user in users}
        records = UserStates(store, policy.adaptation.max_users).get(keys.values())
    finally:
        store.close()
    verdicts = {}
    for user in users:
        record = records.get(keys[user.name])
        adapted = adapted_cascade(
            policy.adaptation, policy.cascade.thresholds[TIER], policy.cascade.escalate_when, record
        )
        verdicts[user.name] = {
            "first_model_right": record.right if record else 0,
            "feedback": record.feedback if record else 0,
            "adaptation": GLOBAL if adapted is None else adapted.adjustment.value,
        }
    return verdicts


def _in_threads(work: Callable[[User], list[Row] | None], users: list[User]) -> list[list[Row] | None]:
    """`work` for every user, CLIENT_THREADS users at a time."""
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        return list(pool.map(work, users))


def _group_results(rows: list[Row]) -> dict:
    results = {}
    for condition in CONDITIONS:
        results[condition] = {}
        for group in GROUPS:
            mine = [r for r in rows if r.condition == condition and group in (r.group, "all")]
            correct, heavy = sum(r.correct for r in mine), sum(r.heavy for r in mine)
            results[condition][group] = {
                "rows": len(mine),
                "correct": correct,
                "accuracy": correct / len(mine),
                "accuracy_95": wilson(correct, len(mine)),
                "heavy_calls": heavy,
                "heavy_share": heavy / len(mine),
            }
    return results


def _break_even(results: dict) -> float | None:
    """The share of rows from hard users at which adaptation leaves the overall heavy share as it is, the other
    groups mixed as here (None unless adaptation adds heavy calls for hard users and saves some elsewhere)."""
    adapted, global_ = results["adapted"], results["global"]
    hard = adapted["hard"]["heavy_share"] - global_["hard"]["heavy_share"]
    others = [group for group in GROUP_USERS if group != "hard"]
    rows = sum(adapted[group]["rows"] for group in others)
    saved = sum(adapted[group]["heavy_calls"] - global_[group]["heavy_calls"] for group in others) / rows
    return -saved / (hard - saved) if hard > 0 > saved else None


def measure_adaptation() -> dict:
    """Pick the hard transform, teach the population, evaluate adapted vs global on the same images."""
    policy = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
    split = load_split()
    images, labels = split.test.images, split.test.labels
    problems = [] if policy.adaptation.enabled else ["adaptation is disabled in the shipped policy.yaml"]
    users = population(len(images))
    errors: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()
    with running_server() as server:
        facts = machine(server.http_url)
        with TierserveClient(server.grpc_url) as client:
            learn_half = slice(0, len(images), 2)  # the rows users learn from; they evaluate on the other half
            transforms, chosen = choose_transform(
                server.grpc_url, client, policy.cascade.first, images[learn_half], labels[learn_half]
            )
            moderate = choose_moderate(transforms, chosen, policy.adaptation.relax_above) if chosen else None
            if chosen is None or moderate is None:
                return {
                    "machine": facts,
                    "transforms": transforms,
                    "problems": ["no transform fits"],
                    "goal_met": False,
                }
            sent = {"hard": TRANSFORMS[chosen](images), "moderate": TRANSFORMS[moderate](images), "clean": images}

            def guarded(step: Callable, user: User) -> list[Row] | None:
                try:
                    return step(client, user, sent[user.group], labels)
                except TierserveError as error:
                    with lock:
                        errors.append(f"{user.name}: {error}")
                    return None

            _in_threads(lambda user: guarded(_learn, user), users)
            time.sleep(1.5)  # routers read a user's record at most once a second
            verdicts = _verdicts(server, policy, users)
            evaluated = _in_threads(lambda user: guarded(_evaluate, user), users)
    rows = [row for rows in evaluated if rows for row in rows]
    problems += [f"a request failed: {error}" for error in errors[:5]]
    adapting = {name for name, v in verdicts.items() if v["adaptation"] != GLOBAL}
    judged = [r for r in rows if r.condition == "adapted" and r.cascade and r.user in adapting]
    skipped = sum(not r.per_user for r in judged)
    if not judged:
        problems.append("no user's feedback adapted their cascade: nothing to compare")
    elif skipped > SKIPPED_AT_MOST * len(judged):
        problems.append(
            f"adaptation skipped (under load?) on {skipped} of {len(judged)} cascade rows of adapted users, "
            f"more than {SKIPPED_AT_MOST:.0%}"
        )
    if leaked := sum(r.per_user for r in rows if r.condition == "global"):
        problems.append(f"{leaked} rows of fresh users without feedback were adapted")
    results = _group_results(rows) if rows else {}
    learned = {
        group: {
            kind: sum(1 for u in users if u.group == group and verdicts[u.name]["adaptation"] == kind)
            for kind in ADJUSTMENTS
        }
        for group in GROUP_USERS
    }
    for group in GROUP_USERS:
        mine = [verdicts[u.name] for u in users if u.group == group]
        learned[group]["first_model_accuracy_on_feedback"] = sum(v["first_model_right"] for v in mine) / max(
            sum(v["feedback"] for v in mine), 1
        )
    raised = bool(results) and results["adapted"]["hard"]["accuracy"] > results["global"]["hard"]["accuracy"]
    kept = bool(results) and all(
        results["adapted"][group]["accuracy"] >= KEEPS * results["global"][group]["accuracy"]
        for group in ("moderate", "clean")
    )
    cheaper = bool(results) and results["adapted"]["all"]["heavy_share"] <= results["global"]["all"]["heavy_share"]
    return {
        "machine": facts,
        "population": {
            "users": GROUP_USERS,
            "learn_requests_per_user": LEARN_REQUESTS,
            "eval_requests_per_user": EVAL_REQUESTS,
            "tier": TIER,
            "client_threads": CLIENT_THREADS,
            "images": "test split: even rows to choose the transform and learn, odd rows to evaluate, one image "
            "per request, gRPC",
        },
        "adaptation_settings": {
            key: getattr(policy.adaptation, key)
            for key in (
                "min_feedback",
                "escalate_all_below",
                "stricter_below",
                "stricter_threshold",
                "relax_above",
                "relaxed_threshold",
            )
        },
        "global_threshold": policy.cascade.thresholds[TIER],
        "first_model": policy.cascade.first,
        "heavy_model": HEAVY,
        "transforms": transforms,
        "chosen_transform": chosen,
        "moderate_transform": moderate,
        "learned": learned,
        "users": verdicts,
        "results": results,
        "seconds": round(time.monotonic() - started, 1),
        "break_even_hard_share": _break_even(results) if results else None,
        "goal": (
            f"hard users' accuracy higher adapted than global, the moderate and clean users' at least {KEEPS:.1%} "
            "of global's, at an overall heavy-call share no higher"
        ),
        "goals": {"hard accuracy raised": raised, "others' accuracy kept": kept, "heavy share not higher": cheaper},
        "problems": problems,
        "goal_met": not problems and raised and kept and cheaper,
    }


def adaptation_table(report: dict) -> str:
    """The README's adaptation table, from the report."""
    if not report.get("results"):
        return "no results: " + "; ".join(report["problems"])
    res, learned = report["results"], report["learned"]
    population = report["population"]
    users = {**population["users"], "all": sum(population["users"].values())}

    def accuracy(group: dict) -> str:
        low, high = group["accuracy_95"]
        return f"{group['accuracy']:.3f} ({low:.3f}-{high:.3f})"

    lines = [
        "| users | rows | accuracy adapted (95% CI) | accuracy global (95% CI) | heavy calls adapted "
        "| heavy calls global |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for group in GROUPS:
        a, g = res["adapted"][group], res["global"][group]
        lines.append(
            f"| {group} ({users[group]}) | {a['rows']:,} | {accuracy(a)} | {accuracy(g)} | {a['heavy_share']:.1%} "
            f"| {g['heavy_share']:.1%} |"
        )
    by_name = {t["transform"]: t for t in report["transforms"]}
    first, heavy = report["first_model"], report["heavy_model"]
    images = "; ".join(
        f"{group} {t['transform']} {t['light']:.3f} / {t['heavy']:.3f} / {t['global_policy']:.3f}"
        for group, t in (
            ("hard", by_name[report["chosen_transform"]]),
            ("moderate", by_name[report["moderate_transform"]]),
            ("clean", by_name["none (clean)"]),
        )
    )
    lines.append(
        f"\nUsers' images, with the accuracy of {first} / {heavy} / the global policy on the learning half of the test "
        f"split: {images}. "
        f"After {population['learn_requests_per_user']} fed-back requests each ({population['tier']} tier): "
        + "; ".join(
            f"{group} users: {learned[group][Adjustment.ESCALATE_ALL.value]} escalate every row, "
            f"{learned[group][Adjustment.STRICTER.value]} stricter, {learned[group][Adjustment.RELAXED.value]} "
            f"relaxed, {learned[group][GLOBAL]} unchanged (first model right on "
            f"{learned[group]['first_model_accuracy_on_feedback']:.1%} of their feedback)"
            for group in population["users"]
        )
        + "."
    )
    lines.append(
        f"Candidates, accuracy of {first} / {heavy} / the global policy (heavy calls): "
        + "; ".join(
            f"{t['transform']} {t['light']:.3f} / {t['heavy']:.3f} / {t['global_policy']:.3f} "
            f"({t['global_heavy_share']:.0%})"
            for t in report["transforms"][1:]
        )
        + f" (hard: where the global policy falls furthest short of {heavy}, which gets at least "
        f"{HEAVY_MOSTLY_RIGHT:.0%} right; moderate: of the others, the one {first} gets right least often while more "
        f"often than relax_above, {report['adaptation_settings']['relax_above']:g})."
    )
    if (share := report.get("break_even_hard_share")) is not None:
        lines.append(
            f"Heavy calls: adaptation adds some for hard users and saves some for the others; with the others mixed as "
            f"here, the overall share of heavy calls stays at or below global's while hard users send up to "
            f"{share:.0%} of the rows (here {users['hard'] / users['all']:.0%})."
        )
    verdicts = ", ".join(f"{goal}: {'**met**' if met else '**not met**'}" for goal, met in report["goals"].items())
    lines.append(f"Goal ({report['goal']}): {verdicts}.")
    if report["problems"]:
        lines.append("Not measured as asked: " + "; ".join(report["problems"]))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Accuracy with 95% intervals and the share of heavy calls per group, adapted vs global."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    x, width = np.arange(len(GROUPS)), 0.38
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for offset, condition, color in ((-width / 2, "adapted", "tab:blue"), (width / 2, "global", "tab:gray")):
        groups = [res[condition][g] for g in GROUPS]
        accuracy = np.array([g["accuracy"] for g in groups])
        low = accuracy - np.array([g["accuracy_95"][0] for g in groups])
        high = np.array([g["accuracy_95"][1] for g in groups]) - accuracy
        name = "per-user adaptation" if condition == "adapted" else "global policy (users without feedback)"
        left.bar(x + offset, accuracy, width, yerr=[low, high], capsize=4, color=color, label=name)
        right.bar(x + offset, [g["heavy_share"] for g in groups], width, color=color, label=name)
    left.set_ylim(0.5, 1.0)
    left.set_ylabel("accuracy (95% Wilson interval)")
    right.set_ylabel("share of rows that called digits_heavy")
    for ax in (left, right):
        ax.set_xticks(x, [f"{g}\nusers" for g in GROUPS])
        ax.legend(fontsize=8, loc="lower left" if ax is left else "upper right")
    right.set_ylim(0, 1.25)
    fig.suptitle(
        f"Per-user adaptation, {report['population']['tier']} tier: hard users' images {report['chosen_transform']}, "
        f"moderate users' {report['moderate_transform'].split(' (')[0]}",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


BENCHMARKS = {
    "shadow": (SHADOW_REPORT, measure_shadow, shadow_table),
    "adaptation": (ADAPTATION_REPORT, measure_adaptation, adaptation_table),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", choices=list(BENCHMARKS), help="one of them (default: both)")
    parser.add_argument("--table", action="store_true", help="print the README table from the report file")
    args = parser.parse_args()
    names = [args.benchmark] if args.benchmark else list(BENCHMARKS)
    status = 0
    for name in names:
        path, measure, table = BENCHMARKS[name]
        if args.table:
            print(table(json.loads(path.read_text())) + "\n")
            continue
        print(f"{name}: measuring ...", flush=True)
        report = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        if name == "adaptation" and report.get("results"):
            plot(report, ADAPTATION_PLOT)
        print(f"{name}: wrote {path}")
        if report["goal_met"]:
            print(table(report) + "\n")
            continue
        status = 1
        why = report["problems"] or [f"goal missed: {report['goal']}"]
        print(f"{name}: no table, " + "; ".join(why), file=sys.stderr)
        print(
            json.dumps(
                {k: report[k] for k in ("summary", "throughput_ratio", "results", "goals") if k in report}, indent=1
            )
        )
    sys.exit(status)


if __name__ == "__main__":
    main()
