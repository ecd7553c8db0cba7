"""Servers for benchmarks: the built repository, or a copy of it with another routing policy."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tierserve.tools.build_models import build_all
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.server import Ports, TritonServer


@contextlib.contextmanager
def running_server(repository: Path = DEFAULT_REPOSITORY) -> Iterator[TritonServer]:
    """A ready tritonserver on free ports serving `repository` (models built first); log in a temp dir."""
    build_all(DEFAULT_REPOSITORY, log=lambda line: None)
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "tritonserver.log").open("wb") as log, \
            TritonServer(repository, Ports.free(), Path(tmp), output=log) as server:
        server.wait_ready()
        yield server


@contextlib.contextmanager
def policy_variant(cascade: dict[str, Any]) -> Iterator[Path]:
    """A repository that links every model of the built one but gives the router other cascade settings."""
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        for model in DEFAULT_REPOSITORY.iterdir():
            if model.is_dir() and model.name != "router":
                (repository / model.name).symlink_to(model.resolve())
        router = repository / "router"
        router.mkdir()
        for item in (DEFAULT_REPOSITORY / "router").iterdir():
            if item.name != "policy.yaml":
                (router / item.name).symlink_to(item.resolve())
        policy = yaml.safe_load((DEFAULT_REPOSITORY / "router" / "policy.yaml").read_text())
        policy["cascade"] = cascade
        (router / "policy.yaml").write_text(yaml.safe_dump(policy))
        yield repository


@contextlib.contextmanager
def server_url(url: str | None) -> Iterator[str]:
    """The given gRPC address, or that of a fresh server on the built repository."""
    if url:
        yield url
        return
    with running_server() as server:
        yield server.grpc_url
