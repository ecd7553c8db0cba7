"""`tierserve --version` prints the installed package's version and exits 0, as scripts expect."""

from __future__ import annotations

from importlib import metadata

import pytest

from tierserve.tools.cli import main


def test_version_is_the_installed_packages(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"tierserve {metadata.version('tierserve')}"
