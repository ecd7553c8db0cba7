"""perf_analyzer as shipped in the tritonclient wheel: where it is, the environment it needs, the real images it
sends (input-data files written by `tierserve build`) and its CSV report."""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.workload import upscaled

# Input-data files in the model repository's top folder (Triton reads only its folders): the held-out test images
INPUT_DATA_8X8 = "perf_input_8x8.json"  # as they are, for models taking PIXELS [8, 8] (and digits)
INPUT_DATA_SIZES = "perf_input_sizes.json"  # in turn 8x8, 16x16 and 32x32, for models taking PIXELS of any size
UPSCALE_FACTORS = (1, 2, 4)
# A --stability-percentage that takes perf_analyzer's first 3 windows whatever their spread: on a shared machine they
# seldom agree within 20% for long. A run then lasts its 3 windows; benchmarks repeat runs and take the medians.
ANY_SPREAD = 999


class PerfAnalyzerMissing(FileNotFoundError):
    """The perf_analyzer binary is not beside this Python."""


@dataclass(frozen=True)
class Measurement:
    """One concurrency level of a perf_analyzer run: throughput and client-side latency percentiles."""

    concurrency: int
    throughput: float  # inferences per second
    p50_us: float
    p90_us: float
    p99_us: float


def binary() -> Path:
    """The perf_analyzer the tritonclient wheel installed beside this Python; PerfAnalyzerMissing if there is none."""
    path = Path(sys.executable).parent / "perf_analyzer"
    if not path.is_file():
        raise PerfAnalyzerMissing(f"no perf_analyzer at {path}: run tools/bootstrap.sh (tritonclient[all] has it)")
    return path


def environment() -> dict[str, str]:
    """This process's environment, plus what perf_analyzer needs: it links libcudart.so.12 even on CPU, and the
    nvidia-cuda-runtime-cu12 wheel provides it."""
    import nvidia.cuda_runtime

    lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def read_report(path: Path) -> list[Measurement]:
    """The rows of a perf_analyzer CSV report (`-f`), one per concurrency level."""
    with path.open() as file:
        return [
            Measurement(
                int(row["Concurrency"]),
                float(row["Inferences/Second"]),
                float(row["p50 latency"]),
                float(row["p90 latency"]),
                float(row["p99 latency"]),
            )
            for row in csv.DictReader(file)
        ]


def input_data(images: Iterable[np.ndarray]) -> str:
    """A perf_analyzer --input-data document cycling through `images` (each [H, W], one per request) as PIXELS."""
    entries = [{"PIXELS": {"content": image.ravel().tolist(), "shape": list(image.shape)}} for image in images]
    return json.dumps({"data": entries})


def write_input_data(images: Iterable[np.ndarray], path: Path) -> Path:
    path.write_text(input_data(images))
    return path


def write_input_data_files(repository: Path, split: DigitsSplit) -> list[Path]:
    """Write the repository's input-data files from the held-out test images, those that differ from what is there
    (atomically); return the paths written."""
    test = split.test.images
    sizes = (upscaled(image[None], UPSCALE_FACTORS[i % len(UPSCALE_FACTORS)])[0] for i, image in enumerate(test))
    written = []
    for name, images in ((INPUT_DATA_8X8, test), (INPUT_DATA_SIZES, sizes)):
        path, text = repository / name, input_data(images)
        if path.is_file() and path.read_text() == text:
            continue
        with tempfile.NamedTemporaryFile("w", dir=repository, suffix=".partial", delete=False) as staged:
            staged.write(text)  # a name of its own: builds running side by side never mix their writes
        Path(staged.name).chmod(0o644)  # as the other artifacts, not a temporary file's 600
        Path(staged.name).replace(path)
        written.append(path)
    return written
