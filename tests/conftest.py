"""Fixtures shared by unit and integration tests: the built model repository and a real tritonserver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tierserve.tools.build_models import build_all
from tierserve.tools.dataset import DigitsSplit, load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.server import Ports, ServerError, TritonServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration talks to a real server: `-m "not integration"` skips it."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def split() -> DigitsSplit:
    return load_split()


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The project's model repository with every reference model built (reused when current)."""
    build_all(DEFAULT_REPOSITORY)
    return DEFAULT_REPOSITORY


@pytest.fixture(scope="session")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real tritonserver on free ports serving the model repository, for the whole session."""
    workdir = tmp_path_factory.mktemp("triton")
    log_path = workdir / "tritonserver.log"
    with log_path.open("wb") as log:
        server = TritonServer(model_repository, Ports.free(), workdir, output=log)
        server.start()
        try:
            server.wait_ready()
        except ServerError as error:
            server.stop()
            pytest.fail(f"{error}\n--- tritonserver log ---\n{log_path.read_text()[-5000:]}")
        yield server
        server.stop()
