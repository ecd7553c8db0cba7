"""`tierserve perf` runs perf_analyzer out of the box against the session's server: the held-out test images the
build wrote, a tier and request parameters over gRPC, HTTP, no LD_LIBRARY_PATH set by hand; the server counts what it
sent. A model it cannot load-test is a one-line error. What perf_analyzer cannot send is refused before any request:
tests/unit/test_perf_command.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tierserve.tools.perf_analyzer import read_report
from tierserve.tools.server import TritonServer

from .prometheus import metric_values

TIERSERVE = Path(sys.executable).parent / "tierserve"


def _perf(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if name != "LD_LIBRARY_PATH"}
    return subprocess.run(
        [str(TIERSERVE), "perf", *args], capture_output=True, text=True, env=environment, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("protocol", "model", "options", "metric", "labels"),
    [
        pytest.param(
            "grpc",
            "digits",
            ["--tier", "best_effort", "--parameter", "deadline_ms=400", "--parameter", "region=eu"],
            "tierserve_rows_total",
            {"tier": "best_effort"},
            id="grpc-digits-best_effort",
        ),
        pytest.param("http", "digits", [], "tierserve_rows_total", {"tier": "standard"}, id="http-digits"),
        pytest.param(
            "http",
            "digits",
            ["--tier", "best_effort", "--parameter", "deadline_ms=400"],
            "tierserve_rows_total",
            {"tier": "best_effort"},
            id="http-digits-best_effort",
        ),
        pytest.param(
            "http",
            "digits",
            ["--tier", "critical"],
            "tierserve_rows_total",
            {"tier": "critical"},
            id="http-digits-critical",
        ),
        pytest.param(
            "grpc", "digits_heavy", [], "nv_inference_count", {"model": "digits_heavy"}, id="grpc-digits_heavy"
        ),
    ],
)
def test_perf_measures_and_the_server_counts_what_it_sent(
    triton: TritonServer,
    tmp_path: Path,
    protocol: str,
    model: str,
    options: list[str],
    metric: str,
    labels: dict[str, str],
):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    before = sum(metric_values(triton, metric, **labels))
    report = tmp_path / "report.csv"
    key_file = tmp_path / "tier_key"  # sent over HTTP (the session server's key for critical)
    key_file.write_text(triton.tier_key)
    common = ("--protocol", protocol, "--url", url, "--seconds", "1.5", "--csv", str(report))
    run = _perf(model, *common, "--tier-key-file", str(key_file), *options)
    after = sum(metric_values(triton, metric, **labels))

    assert run.returncode == 0, run.stdout + run.stderr
    (measured,) = read_report(report)
    assert measured.concurrency == 1 and measured.throughput > 0
    # the held-out test images, not perf_analyzer's random data
    assert "Successfully read data for 1 stream/streams with 360 step/steps" in run.stdout
    sent = sum(int(count) for count in re.findall(r"Request count: (\d+)", run.stdout))
    assert sent > 0
    assert after - before >= sent  # every request perf_analyzer counted reached the server, with these labels


@pytest.mark.parametrize(
    ("model", "says"),
    [("no_such_model", "unknown model: 'no_such_model'"), ("feedback", "pass --input-data FILE")],
)
def test_a_model_perf_cannot_load_test_is_a_one_line_error(triton: TritonServer, model: str, says: str):
    run = _perf(model, "--url", triton.grpc_url)
    assert run.returncode not in (0, 2)  # not measured, and no usage error either
    assert run.stderr.startswith("tierserve: ") and says in run.stderr and run.stderr.count("\n") == 1
    assert run.stdout == ""


def test_a_request_the_server_refuses_fails_the_run_with_its_reason(triton: TritonServer):
    run = _perf("digits", "--url", triton.grpc_url, "--seconds", "0.5", "--parameter", "colour=red")
    assert run.returncode != 0
    assert "unknown parameter 'colour'" in run.stderr
