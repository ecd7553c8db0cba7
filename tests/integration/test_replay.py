"""`tierserve replay` against a real server of its own: rows answered under experiments that draw at random (a
shadow sampling half its rows, a Thompson bandit, a user split) come back with their logged route, label and arms
for every row; against one model version directly; bad targets and tokens refused."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tierserve.client import Classification, TierserveClient
from tierserve.experiment_spec import parse_experiments
from tierserve.policy import Policy
from tierserve.replay_tokens import REPLAY_PARAMETER
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.state_store import open_store, shared_secret
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.experiment_admin import serve_experiments
from tierserve.tools.log_admin import query
from tierserve.tools.replay import (
    Agreement,
    ModelNotReady,
    ReplayRefused,
    ReplayTargetError,
    replay,
    report_png,
    report_table,
)
from tierserve.tools.server import TritonServer
from tierserve.tools.supervisor import Supervisor
from tierserve.tools.workload import noisy, pure_noise, upscaled, with_missing

from .conftest import supervised_server
from .test_experiments import SPLIT

ROWS = 200
FLUSH_WAIT_S = 2.5  # the router's inference log is written every second (inference_log.yaml)
EXPERIMENTS = [
    SPLIT,
    {
        "name": "shadow_v1",
        "kind": "shadow",
        "layer": "shadow",
        "shadow": {"candidate": "digits_heavy:1", "fraction": 0.5},
    },
    {
        "name": "bandit_rules",
        "kind": "bandit",
        "layer": "bandit",
        "layer_range": [0, 60],  # the other 40% of rows are in no bandit: feedback on them moves no posterior
        "bandit": {"strategy": "thompson"},
        "arms": [
            {"name": "policy"},
            {"name": "rules_only", "models": {"digits_light:2": "digits_rules:1", "digits_heavy:3": "digits_rules:1"}},
        ],
    },
]


@dataclass(frozen=True)
class Sent:
    """One row sent: what it was, the answer, and the true label (None for pure noise)."""

    kind: str
    user: str | None
    answer: Classification
    truth: int | None


def _workload(split: DigitsSplit) -> list[tuple[str, np.ndarray, int | None]]:
    """ROWS images of every kind the router tells apart: clean, noisy, upscaled to 16x16, with missing pixels, and
    pure noise."""
    images, labels = split.test.images, split.test.labels
    rows = []
    for i in range(ROWS):
        image, label = images[i % len(images)][None], int(labels[i % len(labels)])
        kind = ("clean", "noisy", "upscaled", "missing", "clean", "noise")[i % 6]
        if kind == "noisy":
            image = noisy(image, 3.0, i)
        elif kind == "upscaled":
            image = upscaled(image, 2)
        elif kind == "missing":
            image = with_missing(image, 0.3, i)
        elif kind == "noise":
            image, label = pure_noise(1, i), None
        rows.append((kind, image[0], label))
    return rows


def _send(server: TritonServer, split: DigitsSplit) -> list[Sent]:
    """Every row as its own request: standard and critical, with and without a user id (30 users), some with
    attributes, each with an ample deadline (time is not replayed, so a budget a stall could exhaust would make the
    replay differ); feedback on the rows that can change no later decision (no user, no bandit arm)."""
    sent = []
    with TierserveClient(server.grpc_url, tier_key=server.tier_key) as sdk:
        for i, (kind, image, truth) in enumerate(_workload(split)):
            user = f"user-{i % 30}" if i % 3 else None
            (answer,) = sdk.classify(
                image,
                tier="critical" if i % 7 == 0 else "standard",
                user_id=user,
                deadline_ms=(1000, 2000)[i % 2],  # ample: no stall of the machine skips an escalation
                attributes={"region": ("eu", "us")[i % 2], "device": "mobile"} if i % 4 == 0 else None,
            )
            sent.append(Sent(kind, user, answer, truth))
        for row in sent:
            if row.truth is not None and row.user is None and "bandit_rules" not in row.answer.arms:
                sdk.feedback(row.answer.request_id, row.truth)
    return sent


@pytest.fixture(scope="module")
def served(
    model_repository: Path, split: DigitsSplit, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Supervisor, list[Sent]]]:
    """A server of this module's own, with the experiments applied and the rows sent and logged."""
    with supervised_server(model_repository, tmp_path_factory.mktemp("replay")) as supervisor:
        server = supervisor.server
        policy = Policy.load(model_repository / ROUTER_MODEL / POLICY_FILE)
        serve_experiments(server.http_url, server.admin_key, parse_experiments({"experiments": EXPERIMENTS}, policy))
        sent = _send(server, split)
        time.sleep(FLUSH_WAIT_S)
        yield supervisor, sent


def _logged(server: TritonServer) -> int:
    return query(server.inference_log, "SELECT count(*) FROM inferences").rows[0][0]


def test_replay_reproduces_every_logged_route_label_and_arm(served):
    supervisor, sent = served
    server = supervisor.server
    assert _logged(server) == ROWS
    # the experiments really drew at random: both bandit arms, half the eligible rows mirrored, both split arms
    arms = [row.answer.arms for row in sent]
    assert set(Counter(a["bandit_rules"] for a in arms if "bandit_rules" in a)) == {"policy", "rules_only"}
    users = [a for row, a in zip(sent, arms, strict=True) if row.user and row.answer.arms.get("heavy_versions")]
    mirrored = sum("shadow_v1" in a for a in users)
    assert 0.25 * len(users) < mirrored < 0.75 * len(users)
    assert {a["heavy_versions"] for a in users} == {"control", "v1"}
    assert len({row.answer.route for row in sent}) >= 3

    seen: list[tuple[int, int]] = []
    report = replay(
        server.inference_log,
        url=server.grpc_url,
        state_path=server.state,
        tier_key=server.tier_key,
        concurrency=2,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert report.errors == 0
    assert report.reproduced == Agreement(ROWS, ROWS), report_table(report)
    assert report.arms_agreement == Agreement(ROWS, ROWS), report_table(report)
    assert seen[-1] == (ROWS, ROWS)
    answered = {row.answer.request_id: row.answer for row in sent}  # as the clients saw them, not as logged
    replayed = {r.request_id: (r.label, r.route, dict(r.arms)) for r in report.rows}
    assert replayed == {i: (a.label, a.route, dict(a.arms)) for i, a in answered.items()}
    assert report.feedback_rows > 20 and report.replayed_accuracy == report.logged_accuracy
    assert "100.0%" in report_table(report) and "not reproduced" not in report_table(report)

    over_http = replay(
        server.inference_log,
        url=server.http_url,
        protocol="http",
        state_path=server.state,
        tier_key=server.tier_key,
        where="tier = 'critical' OR user_hash IS NOT NULL",
        concurrency=2,
    )
    assert over_http.reproduced == Agreement(len(over_http.rows), len(over_http.rows)) and len(over_http.rows) > 100
    time.sleep(FLUSH_WAIT_S)
    assert _logged(server) == ROWS  # replayed rows are not logged again


def test_replay_against_one_model_version_directly_reports_its_agreement(served, tmp_path: Path):
    supervisor, sent = served
    server = supervisor.server
    report = replay(server.inference_log, url=server.grpc_url, target="digits_heavy:1", concurrency=2)
    assert len(report.rows) == ROWS and report.route_agreement is None
    missing = sum(row.kind == "missing" for row in sent)
    assert report.errors == missing  # digits_heavy takes no missing pixels: those rows are refused, and said so
    assert report.label_agreement.agree < ROWS - missing  # a version the router mostly does not answer with
    assert report.label_agreement.agree > (ROWS - missing) / 2
    assert report.replayed_accuracy is not None and report.replayed_latency is not None
    text = report_table(report)
    assert "against digits_heavy:1 (directly)" in text and "rows not reproduced" in text
    report_png(report, png := tmp_path / "replay.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_model_or_version_that_is_not_loaded_is_named_before_anything_is_sent(served):
    server = served[0].server
    with pytest.raises(ModelNotReady, match=r"digits_heavy:7 is not loaded .*ready versions of digits_heavy: 1, 2, 3"):
        replay(server.inference_log, url=server.grpc_url, target="digits_heavy:7")
    with pytest.raises(ModelNotReady, match="no_such_model is not loaded"):
        replay(server.inference_log, url=server.http_url, protocol="http", target="no_such_model")
    with pytest.raises(ReplayTargetError, match="digits_light_critical:2 refuses direct calls"):
        replay(server.inference_log, url=server.grpc_url, target="digits_light_critical:2", concurrency=4)
    assert server.is_ready()


def test_a_forged_token_is_refused(served, split: DigitsSplit, tmp_path: Path):
    server = served[0].server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        pixels = grpcclient.InferInput("PIXELS", [1, 8, 8], "FP32")
        pixels.set_data_from_numpy(split.test.images[:1].astype(np.float32))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("digits", [pixels], parameters={REPLAY_PARAMETER: f"1..{'0' * 32}"})
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and REPLAY_PARAMETER in refused.value.message()
    finally:
        client.close()
    other = tmp_path / "other_state.db"  # a state store of another server: another secret
    store = open_store(str(other))
    shared_secret(store)
    store.close()
    with pytest.raises(ReplayRefused, match=REPLAY_PARAMETER):
        replay(server.inference_log, url=server.grpc_url, state_path=other, tier_key=server.tier_key, limit=5)
