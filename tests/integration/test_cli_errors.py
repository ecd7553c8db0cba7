"""`tierserve` against the session's server: a wrong admin key, an unknown model or experiment and the wrong port each
exit with their own status (tierserve.tools.exit_codes) and one line on stderr, no traceback, and change nothing."""

from __future__ import annotations

import pytest

from tierserve.tools.cli import main
from tierserve.tools.exit_codes import ExitCode
from tierserve.tools.paths import ADMIN_KEY_ENV
from tierserve.tools.server import TritonServer


@pytest.fixture
def cli(triton: TritonServer, capsys: pytest.CaptureFixture):
    """`tierserve ARGS --url <the server's HTTP port> --state <its state>`: (exit status, stdout, the one stderr
    line)."""

    def run(*args: str, url: str | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        where = ["--state", triton.state] if args[0] not in ("fault",) else []
        status = main([*args, "--url", url or triton.http_url, *where])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and err.startswith("tierserve: ") and err.count("\n") == 1, err
        return status, out, err

    return run


def test_a_wrong_admin_key_exits_unauthorized_and_changes_nothing(
    triton: TritonServer, cli, monkeypatch: pytest.MonkeyPatch
):
    before = triton.models()
    monkeypatch.setenv(ADMIN_KEY_ENV, "not-the-servers-key")
    status, _, err = cli("fault", "digits_rules", "--hard-failure")
    assert status == ExitCode.UNAUTHORIZED and "refused the admin key" in err
    status, _, err = cli("model", "unload", "digits_static_light")
    assert status == ExitCode.UNAUTHORIZED and "refused the admin key" in err
    status, out, err = cli("models")
    assert status == ExitCode.UNAUTHORIZED and "listed the repository on disk instead" in err
    assert out.startswith("source: the repository on disk")
    assert triton.models() == before


def test_an_unknown_model_or_experiment_exits_not_found(triton: TritonServer, cli, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ADMIN_KEY_ENV, triton.admin_key)
    status, _, err = cli("fault", "digits_nonesuch", "--off")  # the server's own 404
    assert status == ExitCode.NOT_FOUND and "unknown model: 'digits_nonesuch'" in err
    status, _, err = cli("model", "load", "digits_nonesuch")
    assert status == ExitCode.NOT_FOUND and "no model 'digits_nonesuch'" in err
    status, _, err = cli("experiment", "stop", "no_such_experiment")
    assert status == ExitCode.NOT_FOUND and "no experiment 'no_such_experiment' is running" in err


def test_the_grpc_port_given_for_the_http_one_exits_unreachable(
    triton: TritonServer, cli, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(ADMIN_KEY_ENV, triton.admin_key)
    status, _, err = cli("fault", "digits_rules", "--off", url=triton.grpc_url)
    assert status == ExitCode.UNREACHABLE and "is that the server's HTTP port?" in err
