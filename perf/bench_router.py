"""P1 routing overhead and P2 cascade efficiency of the `digits` router, measured with perf_analyzer.

Usage: .venv/bin/python perf/bench_router.py [--runs 3] [--window-ms 3000] [--only p1|p2]   (about 6 min)
       .venv/bin/python perf/bench_router.py --table   (the README tables, from perf/reports/p1.json and p2.json)

Every perf_analyzer measurement: one real test image per request over gRPC (the first 64 of the held-out split), the
first 3 windows of --window-ms whatever their spread. Conditions alternate within each run, so that a drift of the
machine's speed (other people's work on it) weighs on all alike; ratios are taken within a run, and the report gives
the median of the runs with min and max.

P1 (perf/reports/p1.json), one server: `digits` routed to the light model (the tight_deadline rule, deadline_ms=15),
   the static ensemble digits_static_light (preprocess -> digits_light) and digits_light called directly, each at
   concurrency 1 and 8; run 1 in the order static, routed, direct, run 2 routed, direct, static, and so on. Goals:
   routed throughput >= 1.0x static at c1 and at c8; routed p50 minus direct p50 <= 0.3 ms at c1.
P2 (perf/reports/p2.json), two servers at once: the shipped policy and always-heavy, the same router sending every
   row to the model the shipped cascade escalates to on this server (cascade.escalate_to, or, when that is an optional
   model the server lacks, its first fallback the server has). Per run, cascade first then always-heavy, the next run
   the other way round: accuracy through the server on the held-out test split and on the demo's perturbed images
   (noisy, shifted, upscaled, at the sizes the demo sends: bench_models.perturbed_samples), the share of rows the
   heavy model answered, then throughput at concurrency 8, standard tier, with Triton's counts around it (requests per
   router execution, calls to the heavy model per router execution, heavy rows per request). Goals: cascade
   throughput >= 2.5x always-heavy's, at >= 99.5% of its accuracy on both image sets.

Exit status 1, without a report or table, when the operating point was not reached (a perf_analyzer run failed,
the routed path was not answered by the light model, always-heavy answered rows from another model); 2 when a goal
is missed (report and table written).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import perf_analyzer
import report_io
import tritonclient.grpc as grpcclient
from bench_models import perturbed_samples
from harness import bench_policy, escalation_target, loaded_models, policy_repository, running_server
from report_io import cell, goal, verdicts

from tierserve.client import Classification, TierserveClient
from tierserve.manifest import Manifest, version_dir
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import shipped_policy
from tierserve.tools.server import TritonServer

IMAGES, CONCURRENCIES, P2_CONCURRENCY, TIER, BATCH = 64, [1, 8], 8, "standard", 64
PATHS = {  # P1: key -> (what the table calls it, model, perf_analyzer arguments)
    "direct": ("digits_light direct", "digits_light", ()),
    "static": ("static ensemble preprocess → digits_light", "digits_static_light", ()),
    "routed": (
        "`digits` router → digits_light (rule tight_deadline)",
        "digits",
        ("--request-parameter", "deadline_ms:15:int"),
    ),
}
P1_ORDER = ("static", "routed", "direct")  # run k starts k places further along
ROUTED_TO = "digits_light:2"  # where the tight_deadline rule sends the routed path
POLICIES = {"cascade": "cascade (shipped policy)", "heavy": "always heavy (through the same router)"}
ROUTER = "router:1"  # the model the `digits` ensemble runs, whose executions batch requests
METRICS = ("throughput", "p50_ms", "p90_ms", "p99_ms")
ACCURACY_METRICS = ("test_accuracy", "perturbed_accuracy", "test_heavy_share", "perturbed_heavy_share")
CALL_METRICS = ("router_requests_per_execution", "heavy_calls_per_router_execution", "heavy_rows_per_request")
THROUGHPUT_GOAL, P50_ADDED_GOAL_MS, CASCADE_GOAL, ACCURACY_GOAL = 1.0, 0.3, 2.5, 0.995
ALWAYS = 0.99  # always-heavy must answer at least this share of the test split from the heavy model


class NotMeasured(RuntimeError):
    """The operating point was not reached: no report."""


@functools.cache
def _images() -> np.ndarray:
    """What perf_analyzer sends: the first IMAGES test images, one per request."""
    return load_split().test.images[:IMAGES]


def _measure(url: str, model: str, concurrencies: list[int], window_ms: int, extra: Sequence[str]) -> list[dict]:
    """perf_analyzer's figures at each concurrency, with the load average before."""
    load = report_io.load_average()[0]
    try:
        measured = perf_analyzer.run(
            url,
            model,
            _images(),
            concurrencies,
            measurement_ms=window_ms,
            stability_percentage=perf_analyzer.ANY_SPREAD,
            extra_args=tuple(extra),
        )
    except subprocess.CalledProcessError as error:
        raise NotMeasured(f"perf_analyzer on {model} exited {error.returncode} (a request failed?)") from None
    return [
        {
            "concurrency": m.concurrency,
            "throughput": m.throughput,
            "p50_ms": m.p50_us / 1000,
            "p90_ms": m.p90_us / 1000,
            "p99_ms": m.p99_us / 1000,
            "load_average_1m_before": load,
        }
        for m in measured
    ]


def routing_overhead(runs: int, window_ms: int, reports: Path) -> dict:
    """P1: the three paths at each concurrency, in a rotated order per run, on one server."""
    report = report_io.start(
        "p1",
        {
            "runs": runs,
            "concurrencies": CONCURRENCIES,
            "window_ms": window_ms,
            "stability_percentage": perf_analyzer.ANY_SPREAD,
            "images": f"the first {IMAGES} test images, one per request, gRPC",
            "paths": {
                key: {"name": name, "model": model, "arguments": list(extra)}
                for key, (name, model, extra) in PATHS.items()
            },
            "order": "run k: " + ", ".join(P1_ORDER) + " rotated k places",
            "load_shedding": bench_policy()["load_shedding"],
        },
    )
    with policy_repository(bench_policy()) as repository, running_server(repository) as server:
        report["machine"]["tritonserver"] = report_io.tritonserver_version(server.http_url)
        with TierserveClient(server.grpc_url) as client:
            (answer,) = client.classify(_images()[0], deadline_ms=15)
        if answer.route != ROUTED_TO:
            raise NotMeasured(f"digits with deadline_ms=15 answered from {answer.route}, not {ROUTED_TO}")
        for key in P1_ORDER:  # warm-up, not recorded: a fresh server's first executes are slow
            _measure(server.grpc_url, PATHS[key][1], [8], max(window_ms // 3, 200), PATHS[key][2])
        for index in range(runs):
            order = P1_ORDER[index % 3 :] + P1_ORDER[: index % 3]
            measurements = []
            for key in order:
                _, model, extra = PATHS[key]
                for m in _measure(server.grpc_url, model, CONCURRENCIES, window_ms, extra):
                    measurements.append({"condition": f"{key} c{m['concurrency']}", "path": key, **m})
                    print(f"  P1 run {index + 1} {key} c{m['concurrency']}: {m['throughput']:,.0f}/s", flush=True)
            at = {(m["path"], m["concurrency"]): m for m in measurements}
            report["runs"].append(
                {
                    "run": index + 1,
                    "order": list(order),
                    "measurements": measurements,
                    "ratios": {
                        **{
                            f"routed_over_static_throughput_c{c}": at["routed", c]["throughput"]
                            / at["static", c]["throughput"]
                            for c in CONCURRENCIES
                        },
                        **{
                            f"routed_minus_direct_p50_ms_c{c}": at["routed", c]["p50_ms"] - at["direct", c]["p50_ms"]
                            for c in CONCURRENCIES
                        },
                    },
                }
            )
    found = report_io.ratios(report["runs"])
    goals = [
        *(
            goal(
                f"routed / static throughput at c{c}",
                found[f"routed_over_static_throughput_c{c}"],
                ">=",
                THROUGHPUT_GOAL,
                ".2f",
            )
            for c in CONCURRENCIES
        ),
        goal(
            "routed p50 minus direct p50 at c1, ms",
            found["routed_minus_direct_p50_ms_c1"],
            "<=",
            P50_ADDED_GOAL_MS,
            ".3f",
        ),
    ]
    summary = {
        "conditions": report_io.conditions(report["runs"], ("condition", "path", "concurrency"), METRICS),
        "ratios": found,
        "goals": goals,
    }
    report_io.finish(report, summary, reports / "p1.json")
    return report


def _windows(settings: dict) -> str:
    """How each throughput figure was taken, as the tables say it."""
    shed_at = settings["load_shedding"]["shed_standard_at_ms"]
    return (
        f"perf_analyzer's first 3 windows of {settings['window_ms']:,} ms, standard requests never shed "
        f"(shed_standard_at_ms {shed_at:,}: perf_analyzer stops at the first error)"
    )


def p1_table(report: dict) -> str:
    """The README's P1 table, from the report."""
    s, paths = report["summary"], report["settings"]["paths"]
    lines = [
        "| path (P1) | concurrency | inferences/s, median (min to max) | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in PATHS:  # cheapest first
        for c in (c for c in s["conditions"] if c["path"] == key):
            lines.append(
                f"| {paths[key]['name']} | {c['concurrency']} | {cell(c['throughput'], ',.0f')} | "
                f"{cell(c['p50_ms'], '.3f')} | {cell(c['p99_ms'], '.3f')} |"
            )
    r = s["ratios"]
    throughput = ", ".join(
        f"c{c} {cell(r[f'routed_over_static_throughput_c{c}'], '.2f')}" for c in report["settings"]["concurrencies"]
    )
    added = ", ".join(
        f"c{c} {cell(r[f'routed_minus_direct_p50_ms_c{c}'], '+.3f')} ms" for c in report["settings"]["concurrencies"]
    )
    lines += [
        "",
        f"Per run, routed / static throughput: {throughput}; routed p50 added over the direct call: {added}.",
        verdicts(s["goals"]),
        f"Each figure: {_windows(report['settings'])}; {report['settings']['order']}. " + report_io.provenance(report),
    ]
    return "\n".join(lines)


def _classified(url: str, images: Sequence[np.ndarray]) -> list[Classification]:
    """Every image's answer, in order; images of one size go together, BATCH per request, standard tier."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    answers: list[Classification | None] = [None] * len(images)
    with TierserveClient(url) as client:
        for indices in by_shape.values():
            for start in range(0, len(indices), BATCH):
                chunk = indices[start : start + BATCH]
                for i, answer in zip(
                    chunk, client.classify(np.stack([images[i] for i in chunk]), tier=TIER), strict=True
                ):
                    answers[i] = answer
    return answers  # type: ignore[return-value]


def _accuracy(url: str, images: Sequence[np.ndarray], labels: Sequence[int], heavy: str) -> tuple[float, float]:
    """Accuracy through the server, and the share of rows the heavy model answered."""
    answers = _classified(url, images)
    right = [a.label == y for a, y in zip(answers, labels, strict=True)]
    return float(np.mean(right)), float(np.mean([a.route == heavy for a in answers]))


def _counts(client: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    """Triton's counts for `model` ("name:version"): requests answered, rows in them, executions."""
    name, version = model.split(":")
    (stats,) = client.get_inference_statistics(name, version, as_json=True)["model_stats"]
    return {
        "requests": int(stats["inference_stats"]["success"].get("count", 0)),
        "rows": int(stats.get("inference_count", 0)),
        "executions": int(stats.get("execution_count", 0)),
    }


def _calls(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], heavy: str) -> dict[str, float]:
    """From Triton's counts around a measurement: how many requests a router execution takes (dynamic batching), how
    many calls to the heavy model it makes (one per execute that escalates any row), and heavy rows per request."""
    router, called = ({k: after[m][k] - before[m][k] for k in after[m]} for m in (ROUTER, heavy))
    return {
        "router_requests_per_execution": router["requests"] / max(router["executions"], 1),
        "heavy_calls_per_router_execution": called["requests"] / max(router["executions"], 1),
        "heavy_rows_per_request": called["rows"] / max(router["requests"], 1),
    }


def _policy_run(server: TritonServer, policy: str, window_ms: int, images: dict, heavy: str) -> dict:
    """One policy's accuracy (test split, perturbed images, and per perturbed kind) and throughput at P2_CONCURRENCY."""
    test_accuracy, test_heavy = _accuracy(server.grpc_url, *images["test"], heavy)
    perturbed = {kind: _accuracy(server.grpc_url, *pair, heavy) for kind, pair in images["kinds"].items()}
    all_accuracy, all_heavy = _accuracy(server.grpc_url, *images["perturbed"], heavy)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        before = {model: _counts(client, model) for model in (ROUTER, heavy)}
        (m,) = _measure(
            server.grpc_url, "digits", [P2_CONCURRENCY], window_ms, ("--request-parameter", f"tier:{TIER}:string")
        )
        calls = _calls(before, {model: _counts(client, model) for model in (ROUTER, heavy)}, heavy)
    return {
        **calls,
        "condition": policy,
        "test_accuracy": test_accuracy,
        "test_heavy_share": test_heavy,
        "perturbed_accuracy": all_accuracy,
        "perturbed_heavy_share": all_heavy,
        "perturbed_accuracy_by_kind": {kind: accuracy for kind, (accuracy, _) in perturbed.items()},
        **m,
    }


def cascade_efficiency(runs: int, window_ms: int, reports: Path) -> dict:
    """P2: the shipped cascade and always-heavy on two servers at once, alternating which goes first."""
    split = load_split()
    kinds = perturbed_samples(split)
    samples = [s for chosen in kinds.values() for s in chosen]
    images = {
        "test": (list(split.test.images), [int(y) for y in split.test.labels]),
        "perturbed": ([s.image for s in samples], [s.label for s in samples]),
        "kinds": {kind: ([s.image for s in chosen], [s.label for s in chosen]) for kind, chosen in kinds.items()},
    }
    shipped = shipped_policy(DEFAULT_REPOSITORY)
    with contextlib.ExitStack() as stack:
        servers = {
            "cascade": stack.enter_context(running_server(stack.enter_context(policy_repository(bench_policy()))))
        }
        heavy = escalation_target(shipped, loaded_models(servers["cascade"]))
        always_heavy = {
            **shipped["cascade"],
            "first": heavy,
            "escalate_to": heavy,
            "escalate_when": "threshold",
            "thresholds": dict.fromkeys(shipped["cascade"]["thresholds"], 0.0),
        }
        heavy_policy = stack.enter_context(policy_repository(bench_policy(cascade=always_heavy)))
        servers["heavy"] = stack.enter_context(running_server(heavy_policy))
        report = report_io.start(
            "p2",
            {
                "runs": runs,
                "concurrency": P2_CONCURRENCY,
                "tier": TIER,
                "window_ms": window_ms,
                "stability_percentage": perf_analyzer.ANY_SPREAD,
                "images": f"throughput: the first {IMAGES} test images, one per request, gRPC; accuracy: the whole "
                f"test split and the demo's perturbed images, {BATCH} per request",
                "perturbed_images": {kind: len(chosen) for kind, chosen in kinds.items()},
                "shipped_cascade": shipped["cascade"],
                "heavy": heavy,
                "always_heavy_cascade": always_heavy,
                "policies": POLICIES,
                "order": "run 1 cascade, heavy; run 2 heavy, cascade; and so on, both servers running",
                "load_shedding": bench_policy()["load_shedding"],
                "model_ops_per_image": {
                    model: _ops(model)
                    for model in (shipped["cascade"]["first"], shipped["cascade"]["escalate_to"], heavy)
                },
            },
        )
        report["machine"]["tritonserver"] = report_io.tritonserver_version(servers["cascade"].http_url)
        for server in servers.values():  # warm-up, not recorded
            _measure(server.grpc_url, "digits", [P2_CONCURRENCY], max(window_ms // 3, 200), ())
        for index in range(runs):
            order = list(POLICIES)[:: 1 if index % 2 == 0 else -1]
            measurements = [_policy_run(servers[policy], policy, window_ms, images, heavy) for policy in order]
            if (share := measurements[order.index("heavy")]["test_heavy_share"]) < ALWAYS:
                raise NotMeasured(f"always-heavy answered {share:.1%} of the test split from {heavy}, not every row")
            for m in measurements:
                print(
                    f"  P2 run {index + 1} {m['condition']}: {m['throughput']:,.0f}/s, test accuracy "
                    f"{m['test_accuracy']:.4f}, perturbed {m['perturbed_accuracy']:.4f}",
                    flush=True,
                )
            by = {m["condition"]: m for m in measurements}
            cascade, heavy_run = by["cascade"], by["heavy"]
            ratios = {
                f"cascade_over_heavy_{metric}": cascade[metric] / heavy_run[metric]
                for metric in ("throughput", "test_accuracy", "perturbed_accuracy")
            }
            report["runs"].append({"run": index + 1, "order": order, "measurements": measurements, "ratios": ratios})
    found = report_io.ratios(report["runs"])
    summary = {
        "conditions": report_io.conditions(report["runs"], ("condition",), METRICS + ACCURACY_METRICS + CALL_METRICS),
        "ratios": found,
        "goals": [
            goal(
                "cascade / always-heavy throughput", found["cascade_over_heavy_throughput"], ">=", CASCADE_GOAL, ".2f"
            ),
            goal(
                "cascade / always-heavy accuracy, test split",
                found["cascade_over_heavy_test_accuracy"],
                ">=",
                ACCURACY_GOAL,
                ".4f",
            ),
            goal(
                "cascade / always-heavy accuracy, perturbed images",
                found["cascade_over_heavy_perturbed_accuracy"],
                ">=",
                ACCURACY_GOAL,
                ".4f",
            ),
        ],
    }
    report_io.finish(report, summary, reports / "p2.json")
    return report


def _ops(model: str) -> int | None:
    """Multiply-adds per image from the model's manifest; None for a model not built here (a GPU variant)."""
    folder = version_dir(DEFAULT_REPOSITORY, model)
    return Manifest.read(folder).ops_per_sample if (folder / "manifest.json").is_file() else None


def p2_table(report: dict) -> str:
    """The README's P2 table, from the report."""
    settings, s = report["settings"], report["summary"]
    heavy, kinds = settings["heavy"], settings["perturbed_images"]
    lines = [
        f"| policy (P2, concurrency {settings['concurrency']}, {settings['tier']} tier) | test accuracy "
        f"| perturbed accuracy ({', '.join(kinds)}) | answered by `{heavy}`: test / perturbed "
        "| inferences/s, median (min to max) | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in s["conditions"]:
        lines.append(
            f"| {settings['policies'][c['condition']]} | {cell(c['test_accuracy'], '.4f')} | "
            f"{cell(c['perturbed_accuracy'], '.4f')} | {c['test_heavy_share']['median']:.1%} / "
            f"{c['perturbed_heavy_share']['median']:.1%} | {cell(c['throughput'], ',.0f')} | "
            f"{cell(c['p50_ms'], '.3f')} | {cell(c['p99_ms'], '.3f')} |"
        )
    r, ops = s["ratios"], settings["model_ops_per_image"]
    first, escalate_to = settings["shipped_cascade"]["first"], settings["shipped_cascade"]["escalate_to"]
    cascade = next(c for c in s["conditions"] if c["condition"] == "cascade")
    share = cascade["test_heavy_share"]["median"]
    compute = ""
    if ops.get(first) and ops.get(heavy):
        saved = ops[heavy] / (ops[first] + share * ops[heavy])
        compute = (
            f" Model compute per test image: {saved:.2f}x less with the cascade ({ops[first]:,} + {share:.1%} x "
            f"{ops[heavy]:,} vs {ops[heavy]:,} multiply-adds)."
        )
    calls = ""
    if "heavy_calls_per_router_execution" in cascade:  # reports before these counts lack them
        by = {c["condition"]: c for c in s["conditions"]}
        calls = (
            f" Triton's counts during the throughput windows: a router execution took "
            f"{cell(cascade['router_requests_per_execution'], '.1f')} requests (dynamic batching) and made "
            + " and ".join(
                f"{cell(by[name]['heavy_calls_per_router_execution'], '.2f')} calls to `{heavy}` with {label}"
                for name, label in (("cascade", "the cascade"), ("heavy", "always-heavy"))
            )
            + f"; rows sent there per request: {cell(by['cascade']['heavy_rows_per_request'], '.2f')} and "
            f"{cell(by['heavy']['heavy_rows_per_request'], '.2f')}."
        )
    lines += [
        "",
        f"Per run, cascade / always-heavy: throughput {cell(r['cascade_over_heavy_throughput'], '.2f')}, "
        f"accuracy on the test split {cell(r['cascade_over_heavy_test_accuracy'], '.4f')}, on the perturbed "
        f"images {cell(r['cascade_over_heavy_perturbed_accuracy'], '.4f')}.{compute}{calls}",
        verdicts(s["goals"]),
        f"The shipped cascade escalates to `{escalate_to}`"
        + (f"; this server lacks it, so to its fallback `{heavy}`" if heavy != escalate_to else "")
        + f", and always-heavy sends every row there. Perturbed: {sum(kinds.values())} images of `tierserve demo`'s "
        "mix "
        f"({', '.join(f'{n} {k}' for k, n in kinds.items())}) at the sizes the demo sends. Throughput: "
        f"{_windows(settings)}; {settings['order']}. " + report_io.provenance(report),
    ]
    return "\n".join(lines)


BENCHMARKS = {"p1": (routing_overhead, p1_table), "p2": (cascade_efficiency, p2_table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_io.add_arguments(parser)
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's measurement window")
    parser.add_argument("--only", choices=list(BENCHMARKS), help="one of them (default: both)")
    args = parser.parse_args()
    status = 0
    for name in [args.only] if args.only else list(BENCHMARKS):
        measure, table = BENCHMARKS[name]
        if args.table:
            print(table(report_io.read(args.reports / f"{name}.json")) + "\n")
            continue
        try:
            report = measure(args.runs, args.window_ms, args.reports)
        except NotMeasured as error:
            print(f"{name}: operating point not reached, no report: {error}", file=sys.stderr)
            sys.exit(1)
        print(f"{name}: wrote {args.reports / f'{name}.json'}\n\n{table(report)}\n", flush=True)
        if not all(report_io.met(g) for g in report["summary"]["goals"]):
            status = 2
    sys.exit(status)


if __name__ == "__main__":
    main()
