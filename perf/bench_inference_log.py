"""Inference log cost per record, in-process: what the router pays on its hot path, and what the writer thread pays.

Usage: .venv/bin/python perf/bench_inference_log.py            (measures; writes perf/reports/inference_log.json)
       .venv/bin/python perf/bench_inference_log.py --table    (a README table, from the report)

For 8x8 and 64x64 images, median of RUNS runs over ROWS records each:
- hot path: `inference_record` (building a row's record from the router's values, pixels copied) and
  `InferenceLog.offer` (one call per batch of BATCH rows, as the router offers an execute's rows);
- writer thread: `ParquetSink.write_inferences` (Arrow table, zstd Parquet, fsync, rename) per flush of FLUSH rows,
  the bytes per record on disk, and rolling FLUSH-row parts up into one file;
- Kafka: `encode_record` per record (the JSON the kafka sink produces).
Router throughput with the log on and off is measured against a real server, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import report_io
from report_io import spread

from tierserve.assignment import Assignment
from tierserve.experimenter import RowPlan
from tierserve.inference_log import (
    INFERENCES,
    InferenceLog,
    InferenceLogSettings,
    InferenceRecord,
    ParquetSink,
    encode_record,
    hops,
    inference_record,
    live_files,
)
from tierserve.routing import Answer, Variant
from tierserve.signature import RequestContext, Signature

REPORT = Path(__file__).parent / "reports" / "inference_log.json"
ROWS, RUNS, BATCH, FLUSH = 4096, 5, 16, 1024
SHAPES = ((8, 8), (64, 64))


def router_values(count: int, shape: tuple[int, int]) -> list[dict]:
    """What the router holds per answered row: a row in two experiments, a cascade that escalated."""
    rng = np.random.default_rng(0)
    arms = (
        Assignment("heavy_versions", "v1", "split", None, "split"),  # type: ignore[arg-type]
        Assignment("shadow_v1", "mirrored", "shadow", None, "shadow"),  # type: ignore[arg-type]
    )
    variant = Variant({"digits_heavy:2": "digits_heavy:1"}, None, None, ("split",))
    rows = []
    for i in range(count):
        probs = rng.dirichlet(np.ones(10)).astype(np.float32)
        rows.append(
            {
                "answered_at": time.time(),
                "request_id": f"AVu9{i:096d}",  # as long as a REQUEST_ID with a user and two arms
                "plan": RowPlan(int(rng.integers(2**63)), f"{i:016x}", arms, variant),
                "context": RequestContext("standard", f"user-{i}", None, {"region": "eu", "account_age_days": 45}),
                "signature": Signature(*shape, 0.0, 0.0, 0.45, 0.62, "standard", f"user-{i}", None),
                "pixels": rng.uniform(0, 16, shape).astype(np.float32),
                "answer": Answer(
                    probs,
                    float(probs.max()),
                    "digits_heavy:1",
                    "cascade; digits_light:1 confidence 0.80 < 0.9 (standard threshold); escalated to digits_heavy:1; "
                    "cues: size=8x8 missing=0.00 out_of_range=0.00 sparsity=0.45 ood=0.62 tier=standard deadline=none",
                    hops("digits_light:1 low_confidence>digits_heavy:1 ok"),
                    "direct",
                    3,
                ),
                "latency_s": 0.004,
            }
        )
    return rows


def median_us_per_record(work: Callable[[], object], records: int) -> dict[str, float]:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1e6 / records)
    return spread(times)


def measure_shape(shape: tuple[int, int], scratch: Path) -> dict:
    values = router_values(ROWS, shape)
    records: list[InferenceRecord] = [inference_record(**v) for v in values]
    build = median_us_per_record(lambda: [inference_record(**v) for v in values], ROWS)

    class Idle:  # a sink that takes nothing: offer alone is measured
        lost = 0

        def write_inferences(self, records: object) -> None: ...

        def write_feedback(self, records: object) -> None: ...

        def maintain(self) -> None: ...

        def close(self) -> None: ...

    def offer() -> None:
        log = InferenceLog(InferenceLogSettings(queue_capacity=ROWS, flush_interval_s=60), Idle())
        for start in range(0, ROWS, BATCH):
            log.offer(records[start : start + BATCH])
        log.close()

    offered = median_us_per_record(offer, ROWS)
    settings = InferenceLogSettings(enabled=True, directory=scratch, rotate_bytes=2**40, rotate_age_s=1e9)
    directories = iter(range(10**6))

    def write() -> ParquetSink:
        sink = ParquetSink(scratch / f"{shape[0]}x{shape[1]}-{next(directories)}", settings)
        for start in range(0, ROWS, FLUSH):
            sink.write_inferences(records[start : start + FLUSH])
        return sink

    written = median_us_per_record(write, ROWS)
    sinks = [write() for _ in range(RUNS)]
    part_bytes = sum(p.stat().st_size for p in live_files(sinks[0].folders[INFERENCES]))
    rolled = iter(sinks)
    rolled_up = median_us_per_record(lambda: next(rolled).close(), ROWS)
    file_bytes = sum(p.stat().st_size for p in live_files(sinks[0].folders[INFERENCES]))
    encoded = median_us_per_record(lambda: [encode_record(r) for r in records], ROWS)
    return {
        "shape": list(shape),
        "hot_path_us_per_record": {"inference_record": build, "offer": offered},
        "writer_us_per_record": {"write_parquet": written, "roll_up": rolled_up},
        "bytes_per_record": {"parts": part_bytes / ROWS, "rolled_up": file_bytes / ROWS},
        "kafka_encode_us_per_record": encoded,
        "kafka_bytes_per_record": statistics.mean(len(encode_record(r)) for r in records[:256]),
    }


def measure() -> dict:
    head = report_io.header()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        results = [measure_shape(shape, Path(scratch)) for shape in SHAPES]
    return {
        **head,
        "rows": ROWS,
        "runs": RUNS,
        "offer_batch": BATCH,
        "flush_rows": FLUSH,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1m_before": load_before,  # other work on the machine makes every figure larger
        "results": results,
    }


def table(report: dict) -> str:
    """A README table of medians, from the report."""
    lines = [
        "| image | record + offer µs (hot path) | Parquet write µs | roll-up µs | bytes on disk "
        "| Kafka JSON µs, bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        hot, writer = r["hot_path_us_per_record"], r["writer_us_per_record"]
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} "
            f"| {hot['inference_record']['median']:.1f} + {hot['offer']['median']:.2f} "
            f"| {writer['write_parquet']['median']:.1f} | {writer['roll_up']['median']:.1f} "
            f"| {r['bytes_per_record']['rolled_up']:.0f} "
            f"| {r['kafka_encode_us_per_record']['median']:.1f}, {r['kafka_bytes_per_record']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the README table from the report")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(REPORT.read_text())))
        return 0
    report = measure()
    report_io.write(report, REPORT)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
