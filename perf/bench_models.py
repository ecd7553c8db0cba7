"""Baseline: what each served model version costs and how accurate it is, from the same built artifacts.

Usage: .venv/bin/python perf/bench_models.py [--url HOST:PORT]   (~3 min; writes perf/reports/models.json)
       .venv/bin/python perf/bench_models.py --table            (the README tables, from the report)

1. In-process, without Triton: each version's runner (ONNX Runtime on CPU, one thread, as served) on the
   test split: accuracy, accuracy on the demo's perturbed images (`tierserve demo`'s mix, seed 0, its noisy,
   shifted and upscaled images, brought to 8x8 as preprocess does), and µs per image at batch 1 and 64.
2. Through Triton: each version called directly over gRPC with perf_analyzer, one image per request, at
   concurrency 1 and 8. Without --url it starts its own tritonserver on free ports.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import onnxruntime
import perf_analyzer
import report_io
from harness import server_url

from tierserve.manifest import Manifest, version_dir
from tierserve.resize import resize_to_native
from tierserve.runners import load_runner
from tierserve.tools.build_models import MODEL_SPECS, accuracy, build_all, microseconds_per_sample
from tierserve.tools.dataset import DigitsSplit, load_split
from tierserve.tools.demo import Sample, build_workload
from tierserve.tools.paths import DEFAULT_REPOSITORY

REPORT = Path(__file__).parent / "reports" / "models.json"
CONCURRENCIES = [1, 8]
PERTURBED_KINDS = ("noisy", "shifted", "upscaled")
DEMO_SEED, DEMO_DRAWS = 0, 2000  # the demo sends 400; 5x the draws for tighter accuracies
BATCHES = {1: 2000, 64: 200}  # batch size -> timed calls


def perturbed_samples(split: DigitsSplit) -> dict[str, list[Sample]]:
    """Per kind, the demo workload's perturbed samples, at the sizes the demo sends them."""
    samples = build_workload(split, DEMO_DRAWS, DEMO_SEED)
    return {kind: [s for s in samples if s.kind == kind] for kind in PERTURBED_KINDS}


def perturbed_images(split: DigitsSplit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kind, the demo workload's perturbed images at 8x8 (as preprocess resizes them) and their labels."""
    kinds = {}
    for kind, chosen in perturbed_samples(split).items():
        images = np.concatenate([resize_to_native(s.image[None]) for s in chosen])
        kinds[kind] = images, np.array([s.label for s in chosen])
    return kinds


def measure_in_process(split: DigitsSplit, repository: Path = DEFAULT_REPOSITORY) -> list[dict]:
    """Accuracy (held-out and perturbed) and µs per image of every model version's runner."""
    perturbed = perturbed_images(split)
    all_images = np.concatenate([images for images, _ in perturbed.values()])
    all_labels = np.concatenate([labels for _, labels in perturbed.values()])
    rows = []
    for spec in MODEL_SPECS:
        folder = version_dir(repository, spec.name)
        manifest, runner = Manifest.read(folder), load_runner(folder)
        rows.append(
            {
                "model": spec.name,
                "trainer": spec.recipe["trainer"],
                "test_accuracy": manifest.test_accuracy,
                "perturbed_accuracy": accuracy(runner, all_images, all_labels),
                "perturbed_accuracy_by_kind": {
                    kind: accuracy(runner, images, labels) for kind, (images, labels) in perturbed.items()
                },
                "perturbed_images": {kind: len(labels) for kind, (_, labels) in perturbed.items()},
                "ops_per_sample": manifest.ops_per_sample,
                "us_per_image": {
                    str(batch): microseconds_per_sample(runner, split.test.images, batch, repeats)
                    for batch, repeats in BATCHES.items()
                },
            }
        )
    return rows


def measure_served(url: str | None, split: DigitsSplit) -> list[dict]:
    """perf_analyzer rows for every model version, each request one real test image."""
    rows = []
    with server_url(url) as grpc_url:
        for spec in MODEL_SPECS:
            measured = perf_analyzer.run(
                grpc_url, spec.model, split.test.images[:64], CONCURRENCIES, extra_args=("-x", str(spec.version))
            )
            for m in measured:
                rows.append(
                    {
                        "model": spec.name,
                        "concurrency": m.concurrency,
                        "throughput": m.throughput,
                        "p50_ms": m.p50_us / 1000,
                        "p99_ms": m.p99_us / 1000,
                    }
                )
                print(f"{spec.name} c{m.concurrency}: {m.throughput:,.0f}/s", flush=True)
    return rows


def table(report: dict) -> str:
    """The README's tables: the models in-process, then each model served, from the report."""
    kinds = report["perturbed_kinds"]
    lines = [
        "| model:version | trainer | test accuracy | perturbed accuracy "
        f"({', '.join(kinds)}) | ops / image | µs / image, batch 1 | µs / image, batch 64 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["models"]:
        by_kind = " / ".join(f"{row['perturbed_accuracy_by_kind'][kind]:.3f}" for kind in kinds)
        lines.append(
            f"| {row['model']} | {row['trainer']} | {row['test_accuracy']:.4f} | "
            f"{row['perturbed_accuracy']:.4f} ({by_kind}) | {row['ops_per_sample']:,} | "
            f"{row['us_per_image']['1']:.1f} | {row['us_per_image']['64']:.2f} |"
        )
    counts = report["models"][0]["perturbed_images"]
    lines.append(
        f"\nPerturbed: {sum(counts.values())} images ({', '.join(f'{n} {k}' for k, n in counts.items())}) of "
        f"`tierserve demo`'s mix, seed {report['demo_seed']}, {report['demo_draws']:,} draws. ONNX Runtime "
        f"{report['onnxruntime']} on one thread, in-process (no Triton), median per image; "
        + (report_io.measured(report) if "machine" in report else f"{report['processor']}.")
    )
    lines += [
        "",
        "| model | concurrency | inferences/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["served"]:
        lines.append(
            f"| {row['model']} | {row['concurrency']} | {row['throughput']:,.0f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC address of a running server (default: start one)")
    parser.add_argument("--table", action="store_true", help=f"print the README tables from {REPORT}")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args()
    if args.table:
        report = json.loads(args.report.read_text())
    else:
        head = report_io.header()
        build_all(DEFAULT_REPOSITORY, log=lambda line: None)
        split = load_split()
        report = {
            **head,
            "processor": platform.processor() or platform.machine(),
            "onnxruntime": onnxruntime.__version__,
            "demo_seed": DEMO_SEED,
            "demo_draws": DEMO_DRAWS,
            "perturbed_kinds": list(PERTURBED_KINDS),
            "models": measure_in_process(split),
            "served": measure_served(args.url, split),
        }
        print(f"wrote {report_io.write(report, args.report)}")
    print(table(report))


if __name__ == "__main__":
    main()
