"""Run perf_analyzer (shipped in the tritonclient wheel) against a server and read its CSV report."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --stability-percentage that takes perf_analyzer's first 3 windows whatever their spread: on a shared machine they
# seldom agree within 20% for long; repeated runs (alternated between the conditions) and their medians stand in
ANY_SPREAD = 999


@dataclass(frozen=True)
class Measurement:
    """One concurrency level of a perf_analyzer run: throughput and client-side latency percentiles."""

    concurrency: int
    throughput: float  # inferences per second
    p50_us: float
    p90_us: float
    p99_us: float


def _environment() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on CPU; the nvidia-cuda-runtime-cu12 wheel provides it."""
    import nvidia.cuda_runtime

    lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def write_input_data(images: np.ndarray, path: Path) -> Path:
    """A perf_analyzer --input-data file cycling through real images (one per request)."""
    entries = [{"PIXELS": {"content": image.ravel().tolist(), "shape": list(image.shape)}} for image in images]
    path.write_text(json.dumps({"data": entries}))
    return path


def run(
    url: str,
    model: str,
    images: np.ndarray,
    concurrencies: list[int],
    *,
    measurement_ms: int = 3000,
    stability_percentage: int = 20,
    extra_args: tuple[str, ...] = (),
) -> list[Measurement]:
    """Measure `model` over gRPC at each concurrency once 3 windows agree within `stability_percentage`; one
    request = one image."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    with tempfile.TemporaryDirectory() as tmp:
        data = write_input_data(images, Path(tmp) / "input.json")
        report = Path(tmp) / "report.csv"
        command = [
            str(binary),
            "-m",
            model,
            "-u",
            url,
            "-i",
            "grpc",
            "--input-data",
            str(data),
            "--concurrency-range",
            f"{concurrencies[0]}:{concurrencies[-1]}:{_step(concurrencies)}",
            "--measurement-interval",
            str(measurement_ms),
            "--stability-percentage",
            str(stability_percentage),
            "--percentile",
            "99",
            "-f",
            str(report),
            *extra_args,
        ]
        subprocess.run(command, check=True, env=_environment(), stdout=subprocess.DEVNULL)
        with report.open() as file:
            rows = list(csv.DictReader(file))
    return [
        Measurement(
            int(r["Concurrency"]),
            float(r["Inferences/Second"]),
            float(r["p50 latency"]),
            float(r["p90 latency"]),
            float(r["p99 latency"]),
        )
        for r in rows
    ]


def _step(concurrencies: list[int]) -> int:
    """perf_analyzer takes start:end:step, so the levels must be evenly spaced."""
    steps = {b - a for a, b in itertools.pairwise(concurrencies)} or {1}
    if len(steps) != 1:
        raise ValueError(f"concurrencies must be evenly spaced, got {concurrencies}")
    return steps.pop()
