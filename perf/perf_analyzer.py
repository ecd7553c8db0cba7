"""Run perf_analyzer against a server for the benchmarks and read its CSV report; the binary, its environment, the
input-data format and the report come from tierserve.tools.perf_analyzer (what `tierserve perf` uses too)."""

from __future__ import annotations

import itertools
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tierserve.tools.perf_analyzer import (
    ANY_SPREAD,
    Measurement,
    binary,
    environment,
    read_report,
    write_input_data,
)

__all__ = ["ANY_SPREAD", "Measurement", "run"]


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
    with tempfile.TemporaryDirectory() as tmp:
        data = write_input_data(images, Path(tmp) / "input.json")
        report = Path(tmp) / "report.csv"
        command = [
            str(binary()),
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
        subprocess.run(command, check=True, env=environment(), stdout=subprocess.DEVNULL)
        return read_report(report)


def _step(concurrencies: list[int]) -> int:
    """perf_analyzer takes start:end:step, so the levels must be evenly spaced."""
    steps = {b - a for a, b in itertools.pairwise(concurrencies)} or {1}
    if len(steps) != 1:
        raise ValueError(f"concurrencies must be evenly spaced, got {concurrencies}")
    return steps.pop()
