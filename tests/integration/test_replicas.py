"""Two servers sharing one redis-server behind nginx, as real processes: one inference log read as one, a user's arm
and feedback the same whichever server answers, an experiment applied on one server served by both, a bandit fed
by both, a server killed under load costing no request, and a request one server sheds reaching its client without
taking that server out of the balancer."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path

import pytest

from tierserve.client import TierserveClient, TierserveError
from tierserve.policy import Policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.tools.balancer import Nginx
from tierserve.tools.cli import main
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.load import Sent, SteadyLoad
from tierserve.tools.log_admin import query
from tierserve.tools.repository_variants import policy_variant, shipped_policy
from tierserve.tools.server import TritonServer

from .prometheus import metric_values
from .replicas import ReplicaSet, replica_set
from .test_experiments import SPLIT, _apply

STRICT = {  # a second layer: an answer carries both arms or neither
    "name": "strict_cascade",
    "kind": "split",
    "layer": "cascade",
    "arms": [
        {"name": "control", "weight": 50},
        {"name": "strict", "weight": 50, "cascade": {"thresholds": {"standard": 0.97}}},
    ],
}
BANDIT = {
    "name": "bandit_rules",
    "kind": "bandit",
    "unit": "request",
    "layer": "cascade",
    "bandit": {"strategy": "thompson"},
    "arms": [
        {"name": "policy"},
        {"name": "rules_only", "models": {"digits_light:2": "digits_rules:1", "digits_heavy:3": "digits_rules:1"}},
    ],
}


@pytest.fixture(scope="module")
def replicas(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    with replica_set(model_repository, tmp_path_factory.mktemp("replicas")) as started:
        yield started


@pytest.fixture(scope="module")
def policy(model_repository: Path) -> Policy:
    return Policy.load(model_repository / ROUTER_MODEL / POLICY_FILE)


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


NGINX_NOTICE_S = 0.5  # a call nginx sent to the killed server before its first failure there took it out


def _in_flight_failures(load: SteadyLoad, killed_at: float) -> tuple[list[Sent], list[Sent]]:
    """(failures of requests that may have been on the killed server when it died, every other failure). Each load
    thread (one per tier) sends one request at a time, so its first request answered after the kill may have been in
    flight then. Over gRPC a call sent to the dead server on a kept-alive connection before nginx saw any failure there
    fails too (nginx keeps no gRPC body to send again): failures answered within NGINX_NOTICE_S of the kill count as
    such; later ones are failures the balancer should have prevented."""
    failed = [s for s in load.sent if s.error]
    in_flight = [s for s in failed if killed_at < s.at <= killed_at + NGINX_NOTICE_S]
    for tier in {s.tier for s in load.sent}:
        after = [s for s in load.sent if s.tier == tier and s.at > killed_at]
        if after and after[0].error and after[0] not in in_flight:
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
        # a liveness bound, not a timing: ~3 s on a quiet box, 30 s seen with a CPU hog beside the steady load
        assert _wait(lambda: killed.restarts > restarts, 120), f"not restarted: {killed.events}"
        back = time.time()
        # nginx tries it again fail_timeout_s after its last failure there: traffic comes back over both protocols
        assert _wait(lambda: min(_answered_by(nginx, killed.server, back)[p] for p in loads) > 0, 15)
        during = {p: sum(killed_at < s.at for s in load.sent) for p, load in loads.items()}
    failures = {protocol: _in_flight_failures(load, killed_at) for protocol, load in loads.items()}
    beyond = {protocol: [s.error for s in others] for protocol, (_, others) in failures.items()}
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


def _arms(client: TierserveClient, image, user: str) -> dict[str, str]:
    (answer,) = client.classify(image, user_id=user)
    return dict(answer.arms)


def _all_with_arms(sent: list[Sent], at_least: int) -> bool:
    return len(sent) >= at_least and all(s.answer and s.answer.arms for s in sent)


def test_an_experiment_applied_on_one_server_is_served_whole_by_both_and_a_user_keeps_their_arm(
    replicas: ReplicaSet, policy: Policy, split: DigitsSplit
):
    """Applied on a, two experiments reach b's routers through the shared state store: b answers with both or
    neither, never one (each router takes a revision whole), and every user has one arm per experiment on a, on b
    and through nginx over either protocol."""
    a, b, nginx = replicas.server("a"), replicas.server("b"), replicas.nginx
    image = split.test.images[0]
    with SteadyLoad(b.grpc_url, split.test.images[:50], ("standard",) * 2, user_id="watcher") as on_b:
        assert on_b.wait_until(lambda sent: len(sent) >= 20, 10)
        started = time.monotonic()
        _apply(a, policy, SPLIT, STRICT)
        applied = time.monotonic()
        # every router instance of b has taken it once the last 20 answers all carry arms
        assert on_b.wait_until(lambda sent: _all_with_arms([s for s in sent if s.at > applied][-20:], 20), 15)
    taken = next(s.at for i, s in enumerate(on_b.sent) if s.at > started and _all_with_arms(on_b.sent[i:], 1))
    seen = Counter(frozenset(s.answer.arms) for s in on_b.sent if s.answer)
    print(f"apply on a returned after {applied - started:.2f} s; b served it from {taken - started:.2f} s; {seen}")
    assert [s.error for s in on_b.sent if s.error] == []
    assert set(seen) == {frozenset(), frozenset({"heavy_versions", "strict_cascade"})}, "both experiments or none"
    with (
        TierserveClient(a.grpc_url) as on_a,
        TierserveClient(b.grpc_url) as on_b,
        TierserveClient(nginx.grpc_url) as grpc,
        TierserveClient(nginx.http_url, "http") as http,
    ):
        for user in (f"user-{i}" for i in range(30)):
            arms = [_arms(client, image, user) for client in (on_a, on_b, grpc, http, grpc, http)]
            assert all(x == arms[0] for x in arms) and set(arms[0]) == {"heavy_versions", "strict_cascade"}, arms


def _feedback_counted(replicas: ReplicaSet, experiment: str) -> float:
    """Feedback rows counted for `experiment`'s arms, over every server."""
    return sum(
        sum(metric_values(s.server, "tierserve_feedback_total", experiment=experiment))
        for s in replicas.servers.values()
    )


def test_feedback_for_an_answer_of_one_replica_is_taken_by_the_other_once(
    replicas: ReplicaSet, policy: Policy, split: DigitsSplit
):
    a, b = replicas.server("a"), replicas.server("b")
    label = int(split.test.labels[0])
    _apply(b, policy, SPLIT)
    with TierserveClient(a.grpc_url) as on_a, TierserveClient(b.grpc_url) as on_b:
        assert _wait(lambda: "heavy_versions" in _arms(on_a, split.test.images[0], "fed-back"), 15)
        counted = _feedback_counted(replicas, "heavy_versions")
        (answer,) = on_a.classify(split.test.images[0], user_id="fed-back")
        on_b.feedback(answer.request_id, label)
        for client in (on_a, on_b):
            with pytest.raises(TierserveError, match="duplicate feedback"):
                client.feedback(answer.request_id, label)
    assert _feedback_counted(replicas, "heavy_versions") == counted + 1
    joined = f"SELECT replica, feedback_label FROM answers WHERE request_id = '{answer.request_id}'"
    assert _wait(lambda: query(replicas.log_root, joined).rows == [("a", label)], 10)
    taken_by = f"SELECT replica FROM feedback WHERE request_id = '{answer.request_id}'"
    assert query(replicas.log_root, taken_by).rows == [("b",)]


def test_a_bandit_fed_through_both_replicas_moves_traffic_to_the_more_accurate_arm(
    replicas: ReplicaSet, policy: Policy, split: DigitsSplit
):
    """Rows answered and fed back through nginx, so by both servers: their posteriors are one (the shared store)."""
    a, b, nginx = replicas.server("a"), replicas.server("b"), replicas.nginx
    _apply(a, policy, BANDIT)
    images, labels = split.test.images, split.test.labels
    started = time.time()
    with TierserveClient(nginx.grpc_url) as grpc, TierserveClient(nginx.http_url, "http") as http:
        assert _wait(
            lambda: "bandit_rules" in _arms(http, images[0], "x") and "bandit_rules" in _arms(grpc, images[0], "x"), 15
        )
        for i in range(400):
            client = (grpc, http)[i % 2]
            (answer,) = client.classify(images[i % len(images)])
            client.feedback(answer.request_id, int(labels[i % len(labels)]))
        time.sleep(1.2)  # posteriors are read once a second
        arms = Counter(_arms((grpc, http)[i % 2], images[i % len(images)], "late")["bandit_rules"] for i in range(200))
    assert arms["policy"] / sum(arms.values()) >= 0.8, arms
    for server in (a, b):
        assert sum(_answered_by(nginx, server, started).values()) > 100, "both servers answered and took feedback"
    _apply(a, policy)


# Every best_effort request is shed once the router's queue wait (Triton's, a few µs even when idle) has stayed past
# a threshold of 0.1 µs for the policy's sustain_s; standard and critical are never shed.
SHED_BEST_EFFORT = {"degrade_best_effort_at_ms": 0.0001, "shed_best_effort_at_ms": 0.0001, "shed_standard_at_ms": 1e6}


@pytest.fixture(scope="module")
def shedding_replicas(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    workdir = tmp_path_factory.mktemp("shedding_replicas")
    repository = workdir / "repository"
    repository.mkdir()
    policy = {**shipped_policy(model_repository), "load_shedding": SHED_BEST_EFFORT}
    policy_variant(model_repository, repository, policy)
    with replica_set(repository, workdir) as started:
        yield started


def _shed(error: TierserveError) -> bool:
    return error.status == HTTPStatus.SERVICE_UNAVAILABLE and "best_effort request shed" in error.message


def test_a_request_shed_by_a_replica_reaches_its_client_and_leaves_the_replica_in(
    shedding_replicas: ReplicaSet, split: DigitsSplit
):
    """A shed request is a 503 from a live replica. nginx used to retry it on the other replica and count it as a
    failed try: one shed took a replica out for 2 s, and once both had shed one, every request got a 502 (no live
    upstream), critical ones too. Now the client gets the shed with its reason, and critical requests are answered."""
    nginx, image = shedding_replicas.nginx, split.test.images[0]
    for name in ("a", "b"):  # each replica's load signal is past the threshold: it sheds best_effort
        with TierserveClient(shedding_replicas.server(name).http_url, "http") as direct:

            def sheds() -> bool:
                try:
                    direct.classify(image, tier="best_effort")
                except TierserveError as error:
                    return _shed(error)
                return False

            assert _wait(sheds, 15, poll_s=0.01), f"replica {name} never shed best_effort"
    since, shed, answered = time.time(), [], []
    with TierserveClient(nginx.http_url, "http", tier_key=shedding_replicas.tier_key) as client:
        for _ in range(40):
            try:
                client.classify(image, tier="best_effort")
            except TierserveError as error:
                shed.append(error)
            (answer,) = client.classify(image, tier="critical")  # raises if nginx had no replica left (502)
            answered.append(answer)
    assert len(answered) == 40
    assert len(shed) >= 20 and all(_shed(error) for error in shed), [str(e) for e in shed[:3]]
    relayed = [line for line in nginx.access_lines() if float(line["at"]) > since and line["status"] == "503"]
    assert len(relayed) == len(shed)
    assert all(line["upstream_status"] == "503" for line in relayed), "a shed request is tried on one replica only"
