"""Fixtures shared by unit and integration tests: the built model repository and a real tritonserver."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierserve.tools.build_models import build_all
from tierserve.tools.dataset import DigitsSplit, load_split
from tierserve.tools.paths import AUDIT_ENV, DEFAULT_REPOSITORY
from tierserve.tools.server import Ports, ServerError, TritonServer
from tierserve.tools.supervisor import Supervisor


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration talks to a real server: `-m "not integration"` skips it."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True, scope="session")
def _audit_log_of_its_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Operator commands the tests run are audited into a file of the session's, not the project's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(AUDIT_ENV, str(tmp_path_factory.mktemp("audit") / "audit.jsonl"))
        yield


@pytest.fixture(scope="session")
def split() -> DigitsSplit:
    return load_split()


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The project's model repository with every reference model built (reused when current)."""
    build_all(DEFAULT_REPOSITORY)
    return DEFAULT_REPOSITORY


@pytest.fixture(scope="session")
def supervisor(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """A real tritonserver on free ports serving the model repository, for the whole session, supervised: a
    test that kills a stub or the server leaves a healed server to the tests after it."""
    workdir = tmp_path_factory.mktemp("triton")
    log_path = workdir / "tritonserver.log"
    with log_path.open("wb") as log:
        supervisor = Supervisor(
            TritonServer(model_repository, Ports.free(), workdir, output=log),
            report=lambda event: print(f"supervisor: {event}", file=sys.stderr),
        )
        try:
            supervisor.start()
        except ServerError as error:
            supervisor.stop()
            pytest.fail(str(error))  # the error ends with the log's last lines
        yield supervisor
        supervisor.stop()


@pytest.fixture(scope="session")
def triton(supervisor: Supervisor) -> TritonServer:
    """The session's server: the same object (URLs, ports, admin key) across restarts."""
    return supervisor.server
