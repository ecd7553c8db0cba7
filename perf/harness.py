"""Servers for benchmarks: the built repository, or a copy of it with another routing policy."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tierserve.tools.build_models import build_all
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import policy_variant, shipped_policy
from tierserve.tools.server import Ports, TritonServer


@contextlib.contextmanager
def running_server(repository: Path = DEFAULT_REPOSITORY) -> Iterator[TritonServer]:
    """A ready tritonserver on free ports serving `repository` (models built first); log in a temp dir."""
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    with (
        tempfile.TemporaryDirectory() as tmp,
        (Path(tmp) / "tritonserver.log").open("wb") as log,
        TritonServer(repository, Ports.free(), Path(tmp), output=log) as server,
    ):
        server.wait_ready()
        yield server


@contextlib.contextmanager
def cascade_variant(cascade: dict[str, Any]) -> Iterator[Path]:
    """A repository linking every built model, with the router's cascade settings replaced."""
    with tempfile.TemporaryDirectory() as tmp:
        yield policy_variant(DEFAULT_REPOSITORY, Path(tmp), {**shipped_policy(DEFAULT_REPOSITORY), "cascade": cascade})


@contextlib.contextmanager
def server_url(url: str | None) -> Iterator[str]:
    """The given gRPC address, or that of a fresh server on the built repository."""
    if url:
        yield url
        return
    with running_server() as server:
        yield server.grpc_url
