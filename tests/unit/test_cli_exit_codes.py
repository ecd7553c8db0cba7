"""`tierserve` exits with a status a script can rely on (tierserve.tools.exit_codes) and reports an expected failure in
one line on stderr without a traceback; no server runs here: every command is pointed at a port nothing listens on."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from rich.console import Console
from tritonclient.utils import InferenceServerException

from tierserve.client import TierserveError
from tierserve.tools.cli import main
from tierserve.tools.exit_codes import MEANINGS, ExitCode, failure
from tierserve.tools.lifecycle import Problem, Refused
from tierserve.tools.paths import ADMIN_KEY_ENV, AUDIT_ENV, PROJECT_ROOT
from tierserve.tools.progress import progress_bar
from tierserve.tools.server import Ports


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A server address nothing listens on; an admin key, audit log and state store of the test's own."""
    monkeypatch.setenv(ADMIN_KEY_ENV, "test-admin-key")
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("TIERSERVE_STATE", str(tmp_path / "state.db"))
    return f"127.0.0.1:{Ports.free().http}"


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.startswith("tierserve: ") and err.count("\n") == 1, err
    return err


def test_the_process_exits_with_server_unreachable_in_one_line(nowhere: str):
    run = subprocess.run(
        [sys.executable, "-m", "tierserve.tools.cli", "fault", "digits_light", "--off", "--url", nowhere],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode == ExitCode.UNREACHABLE == 3
    assert f"cannot reach the server at {nowhere}" in _one_line(run.stderr)
    assert run.stdout == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["fault", "digits_light", "--hard-failure"],
        ["promote", "digits_heavy:2"],
        ["model", "unload", "digits_missing"],
        ["canary", "digits_heavy:2"],
        ["demo", "--count", "3"],
        ["demo", "--count", "3", "--protocol", "http"],
    ],
    ids=" ".join,
)
def test_a_command_against_no_server_exits_unreachable(nowhere: str, capsys: pytest.CaptureFixture, argv: list[str]):
    assert main([*argv, "--url", nowhere, *(["--tier-key-file", "/nonexistent"] if argv[0] == "demo" else [])]) == 3
    out, err = capsys.readouterr()
    assert nowhere in _one_line(err) and out == ""


def test_models_lists_the_disk_and_exits_with_why_the_server_was_not_asked(
    nowhere: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
):
    assert main(["models", "--url", nowhere]) == ExitCode.UNREACHABLE
    out, err = capsys.readouterr()
    assert out.startswith("source: the repository on disk") and "digits_heavy:3" in out
    assert "listed the repository on disk instead" in _one_line(err)
    monkeypatch.delenv(ADMIN_KEY_ENV)
    monkeypatch.setattr("tierserve.tools.paths.ADMIN_KEY_FILE", tmp_path / "no_admin_key")
    assert main(["models", "--url", nowhere]) == ExitCode.UNAUTHORIZED
    assert "no admin key" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("url", ["http://localhost:8000", "localhost", "localhost:http", "localhost:70000"])
def test_a_url_that_is_not_host_port_is_a_usage_error(url: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exited:
        main(["fault", "digits_light", "--url", url])
    assert exited.value.code == ExitCode.USAGE
    assert "host:port without a scheme" in capsys.readouterr().err


def test_a_tier_key_file_that_holds_no_single_key_is_refused_in_a_line(
    nowhere: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    keys = tmp_path / "tier_keys.json"  # the keys file given where the key itself is wanted
    keys.write_text('{"on_missing": "refuse", "keys": []}')
    assert main(["demo", "--count", "3", "--url", nowhere, "--tier-key-file", str(keys)]) == ExitCode.FAILED
    assert "expected one tier key" in _one_line(capsys.readouterr().err)


def test_ctrl_c_exits_130_and_an_unexpected_error_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tierserve.tools.cli.build_all", interrupted)
    assert main(["build"]) == ExitCode.INTERRUPTED == 130
    assert _one_line(capsys.readouterr().err) == "tierserve: interrupted\n"

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("tierserve.tools.cli.build_all", broken)
    with pytest.raises(ZeroDivisionError):
        main(["build"])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InferenceServerException("Request for unknown model: 'x' is not found", status="404"), ExitCode.NOT_FOUND),
        (InferenceServerException("unknown", status="StatusCode.NOT_FOUND"), ExitCode.NOT_FOUND),
        (InferenceServerException("This API is restricted, expecting header 'k'", status="403"), ExitCode.UNAUTHORIZED),
        (  # Triton 2.51 refuses a restricted gRPC call as UNAVAILABLE
            InferenceServerException(
                "This protocol is restricted, expecting header 'k'", status="StatusCode.UNAVAILABLE"
            ),
            ExitCode.UNAUTHORIZED,
        ),
        (InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE"), ExitCode.UNREACHABLE),
        (InferenceServerException("bad shape", status="400"), ExitCode.FAILED),
        (InferenceServerException("no status"), ExitCode.FAILED),
        (TierserveError(grpc.StatusCode.PERMISSION_DENIED, "no"), ExitCode.UNAUTHORIZED),
        (TierserveError(503, "cannot reach"), ExitCode.UNREACHABLE),
        (TierserveError(grpc.StatusCode.INVALID_ARGUMENT, "bad tier"), ExitCode.FAILED),
        (Refused(Problem.UNKNOWN_VERSION, "digits_heavy:9 does not exist"), ExitCode.NOT_FOUND),
        (Refused(Problem.IN_USE, "still used"), ExitCode.FAILED),
        (ConnectionRefusedError(111, "Connection refused"), ExitCode.UNREACHABLE),
    ],
    ids=repr,
)
def test_each_expected_failure_has_its_exit_code(error: BaseException, code: ExitCode):
    assert failure(error, "host:1").code == code


def test_a_message_is_one_line_and_names_the_server_it_could_not_reach():
    assert (
        failure(ConnectionRefusedError(111, "refused"), "h:1").message
        == "cannot reach the server at h:1: [Errno 111] refused"
    )
    assert failure(Refused(Problem.IN_USE, "used by:\n  policy\n  lane")).message == (
        "refused, nothing changed: used by:; policy; lane"
    )


def test_help_and_readme_list_every_exit_code(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    readme = (PROJECT_ROOT / "README.md").read_text()
    for code, meaning in MEANINGS.items():
        assert f" {code.value} {meaning} " in " ".join(shown.split()) + " ", shown
        assert f"| {code.value} | `{code.name}` | {meaning} |" in readme
    assert set(MEANINGS) == set(ExitCode)


def test_progress_is_drawn_on_a_terminal_only():
    terminal, piped = io.StringIO(), io.StringIO()
    with progress_bar("models", Console(file=terminal, force_terminal=True, width=80)) as progress:
        progress(3, 6)
    with progress_bar("models", Console(file=piped, force_terminal=False, width=80)) as progress:
        progress(3, 6)
    assert "3/6" in terminal.getvalue()
    assert piped.getvalue() == ""
