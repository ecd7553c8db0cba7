"""Servers for benchmarks: the built repository, or a copy of it with another routing policy; what a server runs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tierserve.tools.build_models import build_all
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import policy_variant, shipped_policy
from tierserve.tools.server import Ports, TritonServer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/<pid>/stat's CPU times


def _cpu_s(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat(5)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` (every thread) has used so far; OSError once it is gone."""
    return _cpu_s(Path(f"/proc/{pid}/stat"))


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Per live thread of process `pid`: its OS name and the user + system CPU seconds it has used so far (a thread
    that ends while this reads is left out); OSError once the process is gone."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            threads[int(task.name)] = ((task / "comm").read_text().strip(), _cpu_s(task / "stat"))
    return threads


@contextlib.contextmanager
def running_server(repository: Path = DEFAULT_REPOSITORY) -> Iterator[TritonServer]:
    """A ready tritonserver on free ports serving `repository` (models built first); log in a temp dir."""
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    with (
        tempfile.TemporaryDirectory() as tmp,
        (Path(tmp) / "tritonserver.log").open("wb") as log,
        TritonServer(repository, Ports.free(), Path(tmp), output=log) as server,
    ):
        server.wait_ready()
        yield server


SHED_STANDARD_AT_MS = 60_000  # bench_policy: a standard request is never shed


def bench_policy(**replaced: Any) -> dict[str, Any]:
    """The shipped policy with standard requests never shed, and the top-level keys in `replaced` replaced:
    perf_analyzer stops at the first error, and on this shared 2-core machine other people's work stalls the router
    long enough to shed some."""
    policy = shipped_policy(DEFAULT_REPOSITORY)
    shedding = {**policy["load_shedding"], "shed_standard_at_ms": SHED_STANDARD_AT_MS}
    return {**policy, "load_shedding": shedding, **replaced}


@contextlib.contextmanager
def policy_repository(policy: dict[str, Any]) -> Iterator[Path]:
    """A repository linking every built model, with the router's policy replaced."""
    with tempfile.TemporaryDirectory() as tmp:
        yield policy_variant(DEFAULT_REPOSITORY, Path(tmp), policy)


def loaded_models(server: TritonServer) -> set[str]:
    """The model:version names `server` has READY."""
    return {f"{m['name']}:{m['version']}" for m in server.models() if m.get("state") == "READY" and "version" in m}


def escalation_target(policy: dict[str, Any], loaded: set[str]) -> str:
    """The model the policy's cascade escalates to on a server with `loaded` models: cascade.escalate_to, or, when
    that is one of optional_models and not loaded, the first of its fallbacks that is (as the router does)."""
    target = policy["cascade"]["escalate_to"]
    if target not in policy.get("optional_models", []) or target in loaded:
        return target
    for model in policy.get("fallbacks", {}).get(target, []):
        if model in loaded:
            return model
    raise RuntimeError(
        f"cascade.escalate_to {target} is not loaded and none of its fallbacks is: loaded {sorted(loaded)}"
    )


@contextlib.contextmanager
def server_url(url: str | None) -> Iterator[str]:
    """The given gRPC address, or that of a fresh server on the built repository."""
    if url:
        yield url
        return
    with running_server() as server:
        yield server.grpc_url
