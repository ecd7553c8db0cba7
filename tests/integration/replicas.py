"""Several servers behind nginx, for the tests of tierserve on more than one server: supervised tritonservers that
share one redis-server, one tier keys file and one inference log root (each its own partition), and an nginx of the
test's own in front of them (tierserve.tools.balancer), all on free ports of 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tierserve.tier_keys import TierKeys, new_key
from tierserve.tools.balancer import BalancerSettings, Nginx, Replica
from tierserve.tools.redis_server import RedisServer
from tierserve.tools.server import LOCAL_TIER_KEY_NAME, Ports, TritonServer
from tierserve.tools.supervisor import Supervisor

from .conftest import supervised_server


@contextlib.contextmanager
def balancer(servers: Sequence[TritonServer], prefix: Path, **settings: int | float) -> Iterator[Nginx]:
    """nginx on free ports in front of `servers` (each named by its replica name), everything it writes under
    `prefix`; stopped on leaving."""
    replicas = [
        Replica(name=server.replica or f"server{i}", http_port=server.ports.http, grpc_port=server.ports.grpc)
        for i, server in enumerate(servers)
    ]
    ports = Ports.free()
    with Nginx(replicas, BalancerSettings(http_port=ports.http, grpc_port=ports.grpc, **settings), prefix) as nginx:
        yield nginx


@dataclass
class ReplicaSet:
    """Servers sharing one state, and the balancer in front of them."""

    servers: dict[str, Supervisor]  # by replica name
    nginx: Nginx
    redis: RedisServer
    log_root: Path  # every server writes its partition replica=NAME/ here
    tier_key: str  # the key for `critical`, which every server takes

    def server(self, name: str) -> TritonServer:
        return self.servers[name].server


@contextlib.contextmanager
def replica_set(model_repository: Path, workdir: Path, names: Sequence[str] = ("a", "b")) -> Iterator[ReplicaSet]:
    """A redis-server, one supervised server per name with `--state` on it and the same tier keys file, and nginx in
    front of them; all stopped on leaving."""
    tier_keys, tier_key = workdir / "tier_keys.json", new_key()
    TierKeys().add(LOCAL_TIER_KEY_NAME, tier_key, "critical").save(tier_keys)
    log_root = workdir / "inference_log"
    for name in names:
        (workdir / name).mkdir()
    with RedisServer(workdir / "redis") as redis, contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                supervised_server(
                    model_repository,
                    workdir / name,
                    state=redis.url,
                    tier_keys=tier_keys,
                    inference_log=log_root,
                    replica=name,
                )
            )
            for name in names
        }
        nginx = stack.enter_context(balancer([s.server for s in servers.values()], workdir / "nginx"))
        yield ReplicaSet(servers, nginx, redis, log_root, tier_key)
