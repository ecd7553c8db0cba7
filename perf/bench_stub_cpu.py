"""Where a request's CPU goes: per process of the server (tritonserver and each model's Python stubs), the CPU time
that one one-image request costs on each of P1's paths. It explains P1's latencies: a request is served by
tritonserver and one or more Python stubs, and on 2 cores their CPU per request bounds the throughput.

Usage: .venv/bin/python perf/bench_stub_cpu.py [--runs 3] [--requests 2000]   (about 2 min)
       .venv/bin/python perf/bench_stub_cpu.py --table   (the README table, from perf/reports/stub_cpu.json)

One server (P1's policy). Per run and path, in P1's rotated order: --requests one-image requests over gRPC, one at a
time (the first 64 test images in turn, as perf_analyzer sends them), after 100 not counted. The CPU time (user +
system, all threads) of tritonserver and of every stub process is read from /proc before and after, and divided by
the number of requests; the figure is the median of the runs with min and max. The router stubs' CPU is also split
by thread (the router names its threads for the OS): its executes, Triton's messages on the stub's main thread, and
its background threads. The client runs in this process and is not counted. Exit status 1, without a report, when
the routed path was not answered by the light model.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import report_io
import tritonclient.grpc as grpcclient
from bench_router import P1_ORDER, PATHS, ROUTED_TO, _images
from harness import CLOCK_TICKS, bench_policy, policy_repository, process_cpu_s, running_server, thread_cpu_s
from report_io import cell

from tierserve.client import TierserveClient
from tierserve.thread_names import ROUTER_EXECUTE
from tierserve.tools.server import TritonServer

REPORT = "stub_cpu.json"
WARM_UP = 100
SERVER, OTHERS = "tritonserver", "others"
# process groups, in the table's order: tritonserver's own threads, the stubs of the models P1's paths run on, and
# every other stub summed (idle on these paths: lanes, heavy models, feedback)
GROUPS = {
    SERVER: "tritonserver",
    "router": "`router` stubs",
    "preprocess": "`preprocess` stubs",
    "digits_light": "`digits_light` stubs",
    OTHERS: "other stubs",
}
# the router stubs' threads, by what they do (the router names its threads for the OS: tierserve.thread_names)
ROUTER_THREADS = {
    "execute": "executes (the event loop thread)",
    "main": "Triton's messages (the main thread)",
    "background": "background threads",
}
METRICS = (
    "wall_us_per_request",
    "server_cpu_us_per_request",
    *(f"cpu_us_{group}" for group in GROUPS),
    *(f"cpu_us_router_{kind}" for kind in ROUTER_THREADS),
)


def _processes(server: TritonServer) -> dict[int, str]:
    """The server's processes by PID: tritonserver itself, and each Python stub under its model's name."""
    assert server.pid is not None, "a running server"
    return {
        server.pid: SERVER,
        **{stub.pid: stub.model if stub.model in GROUPS else OTHERS for stub in server.stubs()},
    }


def _cpu_by_group(processes: dict[int, str]) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for pid, group in processes.items():
        with contextlib.suppress(OSError):  # a process that is gone adds nothing
            totals[group] += process_cpu_s(pid)
    return totals


def _router_threads(pids: list[int]) -> dict[int, tuple[str, float]]:
    """Per thread of the router stubs `pids`: what it does (a ROUTER_THREADS key) and its CPU seconds so far."""
    threads = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # a stub that is gone adds nothing
            for tid, (name, seconds) in thread_cpu_s(pid).items():
                kind = "main" if tid == pid else "execute" if name == ROUTER_EXECUTE else "background"
                threads[tid] = (kind, seconds)
    return threads


def _send(client: grpcclient.InferenceServerClient, model: str, parameters: dict, count: int) -> None:
    images = _images()
    for i in range(count):
        tensor = grpcclient.InferInput("PIXELS", [1, *images.shape[1:]], "FP32")
        tensor.set_data_from_numpy(images[i % len(images)][None])
        client.infer(model, [tensor], parameters=parameters)


def _parameters(key: str) -> dict:
    """The request parameters of P1's path `key` (perf_analyzer's --request-parameter name:value:type)."""
    extra, parameters = PATHS[key][2], {}
    for flag, spec in zip(extra[::2], extra[1::2], strict=True):
        assert flag == "--request-parameter", flag
        name, value, kind = spec.split(":")
        parameters[name] = int(value) if kind == "int" else value
    return parameters


def _measure(server: TritonServer, key: str, requests: int) -> dict:
    """CPU µs per request of each process group on path `key`, and the wall time per request."""
    model, parameters = PATHS[key][1], _parameters(key)
    processes = _processes(server)
    routers = [pid for pid, group in processes.items() if group == "router"]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        _send(client, model, parameters, WARM_UP)
        before, threads_before, started = _cpu_by_group(processes), _router_threads(routers), time.monotonic()
        _send(client, model, parameters, requests)
        wall, after, threads_after = time.monotonic() - started, _cpu_by_group(processes), _router_threads(routers)
    cpu_us = {group: (after[group] - before[group]) / requests * 1e6 for group in after}
    by_thread = dict.fromkeys(ROUTER_THREADS, 0.0)
    for tid, (kind, seconds) in threads_after.items():  # a thread that ended meanwhile is left out
        by_thread[kind] += (seconds - threads_before.get(tid, (kind, 0.0))[1]) / requests * 1e6
    return {
        "condition": key,
        "wall_us_per_request": wall / requests * 1e6,
        "server_cpu_us_per_request": sum(cpu_us.values()),
        **{f"cpu_us_{group}": cpu_us.get(group, 0.0) for group in GROUPS},
        **{f"cpu_us_router_{kind}": us for kind, us in by_thread.items()},
        "load_average_1m_before": report_io.load_average()[0],
    }


def measure(runs: int, requests: int, reports: Path) -> dict:
    report = report_io.start(
        "stub_cpu",
        {
            "runs": runs,
            "requests": requests,
            "warm_up": WARM_UP,
            "paths": {key: {"name": name, "model": model} for key, (name, model, _) in PATHS.items()},
            "parameters": {key: _parameters(key) for key in PATHS},
            "images": "the first 64 test images in turn, one per request, gRPC, one request at a time",
            "order": "run k: " + ", ".join(P1_ORDER) + " rotated k places",
            "clock_ticks_per_s": CLOCK_TICKS,
        },
    )
    with policy_repository(bench_policy()) as repository, running_server(repository) as server:
        report["machine"]["tritonserver"] = report_io.tritonserver_version(server.http_url)
        with TierserveClient(server.grpc_url) as client:
            (answer,) = client.classify(_images()[0], **_parameters("routed"))
        if answer.route != ROUTED_TO:
            print(f"the routed path answered from {answer.route}, not {ROUTED_TO}: no report", file=sys.stderr)
            sys.exit(1)
        for index in range(runs):
            order = P1_ORDER[index % 3 :] + P1_ORDER[: index % 3]
            measurements = [_measure(server, key, requests) for key in order]
            for m in measurements:
                print(
                    f"  run {index + 1} {m['condition']}: {m['server_cpu_us_per_request']:,.0f} µs CPU, "
                    f"{m['wall_us_per_request']:,.0f} µs wall per request",
                    flush=True,
                )
            by = {m["condition"]: m for m in measurements}
            report["runs"].append(
                {
                    "run": index + 1,
                    "order": list(order),
                    "measurements": measurements,
                    "ratios": _ratios(by),
                }
            )
    report_io.finish(
        report,
        {
            "conditions": report_io.conditions(report["runs"], ("condition",), METRICS),
            "ratios": report_io.ratios(report["runs"]),
        },
        reports / REPORT,
    )
    return report


def _ratios(by: dict[str, dict]) -> dict[str, float]:
    """Within one run: the routed path's CPU over the static ensemble's, for the whole server and for the Python
    stubs alone (the router's against preprocess and digits_light together)."""
    static, routed = by["static"], by["routed"]
    return {
        "routed_over_static_server_cpu": routed["server_cpu_us_per_request"] / static["server_cpu_us_per_request"],
        "routed_over_static_stub_cpu": routed["cpu_us_router"]
        / (static["cpu_us_preprocess"] + static["cpu_us_digits_light"]),
    }


def table(report: dict) -> str:
    """The README table, from the report: P1's paths in their order, each process group's CPU per request."""
    settings, s = report["settings"], report["summary"]
    lines = [
        "| path | wall µs / request | CPU µs / request, all processes | " + " | ".join(GROUPS.values()) + " |",
        "|---|---:|---:|" + "---:|" * len(GROUPS),
    ]
    conditions = sorted(s["conditions"], key=lambda c: list(PATHS).index(c["condition"]))
    for c in conditions:
        cpu = [c[f"cpu_us_{group}"] for group in GROUPS]
        lines.append(
            f"| {settings['paths'][c['condition']]['name']} | {cell(c['wall_us_per_request'], ',.0f')} | "
            f"{cell(c['server_cpu_us_per_request'], ',.0f')} | "
            + " | ".join(cell(us, ",.0f") if us["max"] > 0 else "0" for us in cpu)
            + " |"
        )
    if all(f"cpu_us_router_{kind}" in c for c in conditions for kind in ROUTER_THREADS):  # reports since 2026-11-23
        lines += [
            "",
            "| path | `router` stubs: CPU µs / request | " + " | ".join(ROUTER_THREADS.values()) + " |",
            "|---|---:|" + "---:|" * len(ROUTER_THREADS),
        ]
        for c in conditions:
            lines.append(
                f"| {settings['paths'][c['condition']]['name']} | {cell(c['cpu_us_router'], ',.0f')} | "
                + " | ".join(cell(c[f"cpu_us_router_{kind}"], ",.0f") for kind in ROUTER_THREADS)
                + " |"
            )
    lines += [
        "",
        f"Per run, routed / static CPU: {cell(s['ratios']['routed_over_static_server_cpu'], '.2f')} for the whole "
        f"server, {cell(s['ratios']['routed_over_static_stub_cpu'], '.2f')} for the Python stubs alone. "
        f"Each figure: {settings['requests']:,} one-image requests over gRPC, one at a time, after "
        f"{settings['warm_up']} not counted; CPU from /proc (clock ticks of 1/{settings['clock_ticks_per_s']} s), "
        f"median of the runs (min to max); {settings['order']}. " + report_io.provenance(report),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report_io.add_arguments(parser)
    parser.add_argument("--requests", type=int, default=2000, help="requests per path and run (default 2000)")
    args = parser.parse_args()
    if args.table:
        print(table(report_io.read(args.reports / REPORT)))
        return
    report = measure(args.runs, args.requests, args.reports)
    print(f"wrote {args.reports / REPORT}\n\n{table(report)}")


if __name__ == "__main__":
    main()
