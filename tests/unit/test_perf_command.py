"""`tierserve perf` without a server: the perf_analyzer command it builds, what it refuses before asking the server,
the input data it picks, and the input-data files the build writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierserve.tools.cli import main
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.perf_analyzer import INPUT_DATA_8X8, INPUT_DATA_SIZES, write_input_data_files
from tierserve.tools.perf_command import PerfError, PerfRun, default_input_data, perf_analyzer_command, run_perf

UNREACHABLE = "127.0.0.1:1"  # nothing listens: a refusal here came before any request


def _options(command: list[str], option: str) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command) if word == option]


def test_the_command_sends_the_images_parameters_and_measures_for_the_seconds_asked():
    run = PerfRun(
        "digits",
        tier="best_effort",
        parameters={"deadline_ms": "50", "region": "eu"},
        concurrency="1:4:1",
        seconds=6,
        csv=Path("out.csv"),
        extra=("--percentile", "99", "--stability-percentage", "10"),
    )
    command = perf_analyzer_command(run, Path("images.json"))
    assert command[0].endswith("perf_analyzer")
    assert _options(command, "-m") == ["digits"] and _options(command, "-u") == ["localhost:8001"]
    assert _options(command, "-i") == ["grpc"] and _options(command, "--input-data") == ["images.json"]
    assert _options(command, "--request-parameter") == [
        "tier:best_effort:string",
        "deadline_ms:50:string",
        "region:eu:string",
    ]
    assert _options(command, "--concurrency-range") == ["1:4:1"]
    assert _options(command, "--measurement-interval") == ["2000"]  # 3 windows make the 6 s
    assert _options(command, "-f") == ["out.csv"]
    assert command[-4:] == ["--percentile", "99", "--stability-percentage", "10"]  # last: they override


def test_http_sends_parameters_and_the_tier_key_as_headers_and_defaults_to_port_8000():
    run = PerfRun("digits", protocol="http", tier="critical", parameters={"deadline_ms": "50"}, tier_key="Key-1")
    command = perf_analyzer_command(run, Path("images.json"))
    assert _options(command, "-u") == ["localhost:8000"] and "--request-parameter" not in command
    assert _options(command, "-H") == [
        "tierserve-param-tier:critical",
        "tierserve-param-deadline-ms:50",
        "tierserve-tier-key:Key-1",
    ]


@pytest.mark.parametrize(
    ("run", "says"),
    [
        (PerfRun("digits", url=UNREACHABLE, tier="critical"), "cannot send over gRPC"),
        (PerfRun("digits", protocol="http", url=UNREACHABLE, tier="critical"), "--tier-key-file names no file"),
    ],
)
def test_what_perf_analyzer_cannot_send_is_refused_before_the_server_is_asked(run: PerfRun, says: str):
    with pytest.raises(PerfError, match=says):
        run_perf(run)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("user_id=Alice", "lowercases"),
        ("region:x=eu", "splits them on ':'"),
        ("tier=best_effort", "--tier"),
        ("deadline_ms", "NAME=VALUE"),
    ],
)
def test_a_parameter_perf_analyzer_would_mangle_is_a_usage_error(
    option: str, says: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_status:
        main(["perf", "digits", "--parameter", option])
    assert exit_status.value.code == 2
    assert says in capsys.readouterr().err


def test_the_cli_prints_a_refusal_in_one_line(capsys: pytest.CaptureFixture[str]):
    assert main(["perf", "digits", "--url", UNREACHABLE, "--tier", "critical"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tierserve: tier 'critical' needs a tier key") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("shape", "file"), [([-1, 8, 8], INPUT_DATA_8X8), ([-1, -1, -1], INPUT_DATA_SIZES), ([-1, 16], None)]
)
def test_the_input_data_fits_the_model_input(tmp_path: Path, shape: list[int], file: str | None):
    for name in (INPUT_DATA_8X8, INPUT_DATA_SIZES):
        (tmp_path / name).write_text("{}")
    run = PerfRun("m", model_repository=tmp_path)
    inputs = [{"name": "PIXELS", "datatype": "FP32", "shape": shape}]
    if file is None:
        with pytest.raises(PerfError, match="pass --input-data FILE"):
            default_input_data(run, inputs)
    else:
        assert default_input_data(run, inputs) == tmp_path / file


def test_the_build_writes_the_test_images_once(tmp_path: Path, split: DigitsSplit):
    assert write_input_data_files(tmp_path, split) == [tmp_path / INPUT_DATA_8X8, tmp_path / INPUT_DATA_SIZES]
    assert write_input_data_files(tmp_path, split) == []  # current: nothing rewritten
    native = json.loads((tmp_path / INPUT_DATA_8X8).read_text())["data"]
    sizes = json.loads((tmp_path / INPUT_DATA_SIZES).read_text())["data"]
    assert len(native) == len(sizes) == len(split.test.images)
    assert native[0]["PIXELS"] == {"content": split.test.images[0].ravel().tolist(), "shape": [8, 8]}
    assert [entry["PIXELS"]["shape"] for entry in sizes[:4]] == [[8, 8], [16, 16], [32, 32], [8, 8]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [INPUT_DATA_8X8, INPUT_DATA_SIZES]  # no staged leftovers
