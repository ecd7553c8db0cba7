"""The state store on Redis, against a real server of this module's own and a redis-server of its own: state lands
in Redis, and Redis trouble is no outage. Under steady load, Redis hung (SIGSTOP) and then stopped: every inference
request is answered, feedback is refused UNAVAILABLE, the metrics count it; once Redis is back (restarted empty,
as one without persistence comes back) the routers write back the shared secret and the experiments they serve, the
experiment counts kept during the outage catch up, and feedback is taken again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tierserve.client import TierserveClient, TierserveError
from tierserve.experiment_spec import parse_experiments
from tierserve.experiment_stats import ExperimentStats
from tierserve.experimenter import EXPERIMENTS_KEY
from tierserve.policy import Policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.state_store import SECRET_KEY, open_store
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.experiment_admin import serve_experiments
from tierserve.tools.load import Sent, SteadyLoad
from tierserve.tools.redis_server import RedisServer
from tierserve.tools.supervisor import Supervisor

from .conftest import supervised_server
from .prometheus import metric_values
from .test_experiments import SPLIT

OUTAGE_S = 2.0  # each outage under load: long enough for many executes and flushes, short for the suite


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[Supervisor]:
    with supervised_server(model_repository, tmp_path_factory.mktemp("redis_state"), state=redis_server.url) as sup:
        policy = Policy.load(model_repository / ROUTER_MODEL / POLICY_FILE)
        serve_experiments(
            sup.server.http_url, sup.server.admin_key, parse_experiments({"experiments": [SPLIT]}, policy)
        )
        yield sup


def _counted_rows(url: str) -> int:
    with contextlib.closing(open_store(url)) as store:
        return ExperimentStats(store).rows(SPLIT["name"])


def _in_split(sent: list[Sent], start: float, end: float) -> int:
    return sum(1 for s in sent if start <= s.at < end and s.answer is not None and SPLIT["name"] in s.answer.arms)


def test_state_lands_in_redis(server: Supervisor, redis_server: RedisServer, split: DigitsSplit):
    with TierserveClient(server.server.grpc_url) as client:
        answers = client.classify(split.test.images[:8], user_id="alice")
        client.feedback(answers[0].request_id, int(split.test.labels[0]))
        with pytest.raises(TierserveError, match="duplicate"):
            client.feedback(answers[0].request_id, int(split.test.labels[0]))
    store = open_store(redis_server.url)
    assert store.get(SECRET_KEY) is not None and SPLIT["name"].encode() in store.get(EXPERIMENTS_KEY)
    store.close()
    deadline = time.monotonic() + 5
    while _counted_rows(redis_server.url) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)  # the routers write counts every 0.5 s
    assert _counted_rows(redis_server.url) >= 8


def test_redis_hung_then_stopped_under_load_fails_no_inference(
    server: Supervisor, redis_server: RedisServer, split: DigitsSplit
):
    triton = server.server
    store = open_store(redis_server.url)
    secret = store.get(SECRET_KEY)
    store.close()
    images = split.test.images[:64]
    with TierserveClient(triton.grpc_url) as client:
        before = client.classify(images[:2], user_id="bob")
    errors_before = sum(metric_values(triton, "tierserve_state_store_errors_total"))
    with (
        SteadyLoad(triton.grpc_url, images, tier_key=triton.tier_key, user_id="carol") as load,
        TierserveClient(triton.grpc_url) as client,
    ):
        assert load.wait_until(lambda sent: len(sent) >= 20, timeout_s=10)
        redis_server.pause()  # hung: connections stay open, nothing answers (read timeouts)
        time.sleep(OUTAGE_S)
        with pytest.raises(TierserveError, match="state store is unavailable") as refused:
            client.feedback(before[0].request_id, 3)
        assert refused.value.status == grpc.StatusCode.UNAVAILABLE and refused.value.retryable
        assert min(metric_values(triton, "tierserve_state_store_up")) == 0.0
        redis_server.resume()
        time.sleep(1.0)
        redis_server.stop()  # stopped: connections refused; it comes back empty
        stopped = time.monotonic()
        time.sleep(OUTAGE_S)
        with pytest.raises(TierserveError, match="state store is unavailable") as refused:
            client.feedback(before[0].request_id, 3)
        assert refused.value.status == grpc.StatusCode.UNAVAILABLE
        during = client.classify(images[:1], user_id="dave")  # answered, with a REQUEST_ID, while Redis is gone
        redis_server.start()
        restarted = time.monotonic()
        outage_rows = _in_split(load.sent, stopped, restarted)
        # caught up: the rows answered while Redis was stopped were kept and written once it was back
        assert load.wait_until(lambda _: _counted_rows(redis_server.url) >= outage_rows, timeout_s=10)
    failed = [s.error for s in load.sent if s.error is not None]
    assert not failed, failed[:3]
    assert outage_rows > 0 and len(load.sent) > 100
    store = open_store(redis_server.url)
    assert store.get(SECRET_KEY) == secret  # written back by the routers, not made anew
    assert SPLIT["name"].encode() in store.get(EXPERIMENTS_KEY)
    store.close()
    with TierserveClient(triton.grpc_url) as client:
        deadline = time.monotonic() + 5
        while True:  # the feedback model tries the store again once a second
            try:
                client.feedback(before[0].request_id, 3)
                break
            except TierserveError as error:
                if error.status != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        client.feedback(during[0].request_id, 3)
    assert sum(metric_values(triton, "tierserve_state_store_errors_total")) > errors_before
    assert min(metric_values(triton, "tierserve_state_store_up")) == 1.0
    assert sum(metric_values(triton, "tierserve_feedback_refused_total", why="unavailable")) >= 2
