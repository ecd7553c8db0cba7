"""Two servers sharing one redis-server behind nginx, as real processes: one inference log read as one, a user's arm
and feedback the same whichever server answers, an experiment applied on one server served by both, a bandit fed
by both, and a server killed under load costing no request."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tierserve.client import TierserveClient, TierserveError
from tierserve.tools.balancer import Nginx
from tierserve.tools.cli import main
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.load import Sent, SteadyLoad
from tierserve.tools.log_admin import query
from tierserve.tools.server import TritonServer

from .replicas import ReplicaSet, replica_set


@pytest.fixture(scope="module")
def replicas(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    with replica_set(model_repository, tmp_path_factory.mktemp("replicas")) as started:
        yield started


def _wait(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _answered_by(nginx: Nginx, server: TritonServer, since: float = 0.0) -> Counter[str]:
    """Requests nginx had `server` answer (its last try, status 200) after `since` (unix time), per protocol."""
    ports = {f"127.0.0.1:{server.ports.http}": "http", f"127.0.0.1:{server.ports.grpc}": "grpc"}
    answered: Counter[str] = Counter()
    for line in nginx.access_lines():
        last = line["upstream_addr"].split(", ")[-1]
        if float(line["at"]) > since and last in ports and line["upstream_status"].split(", ")[-1] == "200":
            answered[ports[last]] += 1
    return answered


def _log_count(log_root: Path, sql: str) -> int:
    return query(log_root, sql).rows[0][0]


def test_each_replica_writes_its_partition_and_log_query_reads_them_as_one(
    replicas: ReplicaSet, split: DigitsSplit, capsys: pytest.CaptureFixture[str]
):
    nginx = replicas.nginx
    with TierserveClient(nginx.grpc_url) as grpc, TierserveClient(nginx.http_url, "http") as http:
        answers = [
            (grpc, http)[i % 2].classify(image, user_id=f"logged-{i}")[0]
            for i, image in enumerate(split.test.images[:40])
        ]
    listed = ", ".join(f"'{a.request_id}'" for a in answers)
    logged = f"SELECT count(DISTINCT request_id) FROM inferences WHERE request_id IN ({listed})"
    assert _wait(lambda: _log_count(replicas.log_root, logged) == len(answers), 10), "every answer is in the log"
    assert sorted(p.name for p in replicas.log_root.iterdir()) == ["replica=a", "replica=b"]
    per_replica = f"SELECT replica, count(*) FROM inferences WHERE request_id IN ({listed}) GROUP BY replica"
    counts = dict(query(replicas.log_root, per_replica).rows)
    assert set(counts) == {"a", "b"} and sum(counts.values()) == len(answers), counts
    assert main(["log", "query", "--log", str(replicas.log_root), per_replica + " ORDER BY replica"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split() == ["a", str(counts["a"])] and out.splitlines()[3].split() == [
        "b",
        str(counts["b"]),
    ]


def _in_flight_failures(load: SteadyLoad, killed_at: float) -> tuple[list[Sent], list[Sent]]:
    """(failures of requests that may have been in flight on the killed server, every other failure). Each load
    thread (one per tier) sends one request at a time, so only its first request answered after the kill can have
    been in flight then."""
    failed = [s for s in load.sent if s.error]
    in_flight = []
    for tier in {s.tier for s in load.sent}:
        after = [s for s in load.sent if s.tier == tier and s.at > killed_at]
        if after and after[0].error:
            in_flight.append(after[0])
    return in_flight, [s for s in failed if s not in in_flight]


def test_a_replica_killed_under_load_costs_no_request_and_takes_traffic_again(replicas: ReplicaSet, split: DigitsSplit):
    """SIGKILL one server's tritonserver under steady load through nginx over HTTP and gRPC: nginx retries what was
    in flight there on the other server, skips the dead one, and sends it traffic again once its supervisor has
    restarted it (it listens only once ready)."""
    nginx, killed = replicas.nginx, replicas.servers["a"]
    images = split.test.images[:50]
    loads = {
        protocol: SteadyLoad(url, images, tier_key=replicas.tier_key, protocol=protocol)  # critical, standard
        for protocol, url in (("http", nginx.http_url), ("grpc", nginx.grpc_url))
    }
    with loads["http"], loads["grpc"]:
        assert all(load.wait_until(lambda sent: len(sent) >= 40, 15) for load in loads.values())
        started = time.time()
        assert _wait(lambda: min(_answered_by(nginx, killed.server, started)[p] for p in loads) > 0, 5)
        restarts = killed.restarts
        killed_at, killed_wall = time.monotonic(), time.time()
        os.kill(killed.server.pid, signal.SIGKILL)
        assert _wait(lambda: killed.restarts > restarts, 30), f"not restarted: {killed.events}"
        back = time.time()
        # nginx tries it again fail_timeout_s after its last failure there: traffic comes back over both protocols
        assert _wait(lambda: min(_answered_by(nginx, killed.server, back)[p] for p in loads) > 0, 15)
        during = {p: sum(killed_at < s.at for s in load.sent) for p, load in loads.items()}
    failures = {protocol: _in_flight_failures(load, killed_at) for protocol, load in loads.items()}
    beyond = {protocol: [s.error for s in others] for protocol, (_, others) in failures.items()}
    in_flight = {protocol: len(mine) for protocol, (mine, _) in failures.items()}
    in_flight = {protocol: [s.error for s in mine] for protocol, (mine, _) in failures.items()}
    print(f"requests after the kill {during}; failed while in flight {in_flight}; other failures {beyond}")
    assert beyond == {"http": [], "grpc": []}, "no request failed beyond those in flight on the killed server"
    retried = [
        line
        for line in nginx.access_lines()
        if float(line["at"]) > killed_wall and ", " in line["upstream_addr"] and line["status"] == "200"
    ]
    assert retried, "nginx answered some requests from the other server after a try on the dead one"
    survivor = replicas.servers["b"].server
    assert sum(_answered_by(nginx, survivor, killed_wall).values()) > 0


def _arm_of(client: TierserveClient, image, user: str, experiment: str) -> str:
    (answer,) = client.classify(image, user_id=user)
    return answer.arms.get(experiment, "")


def test_feedback_for_an_answer_of_one_replica_is_taken_by_the_other_once(replicas: ReplicaSet, split: DigitsSplit):
    a, b = replicas.server("a"), replicas.server("b")
    with TierserveClient(a.grpc_url) as on_a, TierserveClient(b.grpc_url) as on_b:
        (answer,) = on_a.classify(split.test.images[0], user_id="fed-back")
        on_b.feedback(answer.request_id, int(split.test.labels[0]))
        for client in (on_a, on_b):
            with pytest.raises(TierserveError, match="duplicate feedback"):
                client.feedback(answer.request_id, int(split.test.labels[0]))
    joined = f"SELECT replica, feedback_label FROM answers WHERE request_id = '{answer.request_id}'"
    assert _wait(lambda: query(replicas.log_root, joined).rows == [("a", int(split.test.labels[0]))], 10)
    taken_by = f"SELECT replica FROM feedback WHERE request_id = '{answer.request_id}'"
    assert query(replicas.log_root, taken_by).rows == [("b",)]
