"""Experiments inside the router, against a real server of their own: sticky assignment, layers, eligibility,
canary growth, shadow traffic, bandits, feedback, per-user adaptation and live changes under load."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from grpc import StatusCode
from tritonclient.utils import InferenceServerException

from tierserve.assignment import Assigner, Unit
from tierserve.client import TierserveClient, TierserveError
from tierserve.experiment_spec import parse_experiments
from tierserve.learned_router import load_learned_routers
from tierserve.manifest import version_dir
from tierserve.policy import Policy
from tierserve.request_ids import IssuedRow, RequestIds, new_seeds, user_key
from tierserve.router_files import LEARNED_ROUTER_FILE, POLICY_FILE, ROUTER_MODEL
from tierserve.runners import load_runner
from tierserve.state_store import open_store, shared_secret
from tierserve.tools.cli import main
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.experiment_admin import serve_experiments, served
from tierserve.tools.load import SteadyLoad
from tierserve.tools.server import TritonServer
from tierserve.tools.supervisor import Supervisor
from tierserve.tools.workload import pure_noise

from .conftest import learned_router_inputs, supervised_server
from .prometheus import metric_values

SPLIT = {
    "name": "heavy_versions",
    "kind": "split",
    "layer": "models",
    "arms": [
        {"name": "control", "weight": 50},
        {"name": "v1", "weight": 50, "models": {"digits_heavy:3": "digits_heavy:1"}},
    ],
}


@pytest.fixture(scope="module")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """A server of this module's own: experiments applied here never reach the session server's tests."""
    with supervised_server(model_repository, tmp_path_factory.mktemp("experiments")) as supervisor:
        yield supervisor


@pytest.fixture(scope="module")
def policy(model_repository: Path) -> Policy:
    return Policy.load(model_repository / ROUTER_MODEL / POLICY_FILE)


@pytest.fixture
def sdk(server: Supervisor) -> Iterator[TierserveClient]:
    with TierserveClient(server.server.grpc_url, tier_key=server.server.tier_key) as client:
        yield client


def _apply(server: TritonServer, policy: Policy, *experiments: dict) -> None:
    serve_experiments(server.http_url, server.admin_key, parse_experiments({"experiments": list(experiments)}, policy))


@pytest.fixture
def experiments(server: Supervisor, policy: Policy) -> Iterator:
    """Apply experiments for one test; none run once it ends."""
    yield lambda *specs: _apply(server.server, policy, *specs)
    _apply(server.server, policy)


def _arms(sdk: TierserveClient, image: np.ndarray, user: str, **parameters) -> dict[str, str]:
    (answer,) = sdk.classify(image, user_id=user, **parameters)
    return dict(answer.arms)


def test_every_answer_has_a_unique_request_id_and_no_arms_without_experiments(sdk, split: DigitsSplit):
    answers = sdk.classify(split.test.images[:20], user_id="alice")
    assert len({a.request_id for a in answers}) == 20 and all(a.request_id for a in answers)
    assert all(a.arms == {} for a in answers)


def _secret(server: Supervisor) -> bytes:
    """The server's state secret, which keys user hashes (and so user-unit buckets)."""
    store = open_store(server.server.state)
    try:
        return shared_secret(store)
    finally:
        store.close()


def test_assignment_is_sticky_across_instances_and_restarts_and_as_hashing_predicts(
    server: Supervisor, sdk, experiments, policy: Policy, split: DigitsSplit
):
    experiments(SPLIT)
    assigner = Assigner(parse_experiments({"experiments": [SPLIT]}, policy))
    users = [f"user-{i}" for i in range(300)]
    image = split.test.images[0]
    first = {user: _arms(sdk, image, user)["heavy_versions"] for user in users}
    secret = _secret(server)
    expected = {  # unit user: the bucket is the user's keyed hash; the seed plays no part
        user: assigner.assign(Unit("standard", user_key(secret, user), {}, 0))[0].arm for user in users
    }
    assert first == expected
    assert 0.35 < Counter(first.values())["v1"] / len(users) < 0.65
    # the router has two instances: many requests per user land on both
    for user in users[:20]:
        assert {_arms(sdk, image, user)["heavy_versions"] for _ in range(6)} == {first[user]}
    # a restarted server serves the experiment it had (from the state store) and the same arms
    restarts = server.restarts
    os.kill(server.server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (server.restarts > restarts and server.server.is_ready()) and time.monotonic() < deadline:
        time.sleep(0.1)
    with TierserveClient(server.server.grpc_url) as fresh:
        assert {user: _arms(fresh, image, user)["heavy_versions"] for user in users[:50]} == {
            user: first[user] for user in users[:50]
        }


def test_an_arm_changes_the_model_version_and_says_so(
    server: Supervisor, sdk, experiments, policy: Policy, split: DigitsSplit
):
    experiments(SPLIT)
    assigner, secret = Assigner(parse_experiments({"experiments": [SPLIT]}, policy)), _secret(server)
    v1_user = next(
        u
        for u in (f"u{i}" for i in range(100))
        if assigner.assign(Unit("standard", user_key(secret, u), {}, 0))[0].arm == "v1"
    )
    # a hard image escalates to the heavy model: v1 gets version 1 of it
    hard = next(
        image
        for image in split.test.images[:300]
        if sdk.classify(image, user_id="nobody-in-particular")[0].route.startswith("digits_heavy")
    )
    (answer,) = sdk.classify(hard, user_id=v1_user)
    assert answer.route == "digits_heavy:1" and answer.arms == {"heavy_versions": "v1"}
    assert "heavy_versions" in answer.reason


def test_an_arm_with_another_first_model_is_doubted_by_the_learned_router_built_for_it(
    sdk, experiments, model_repository: Path, split: DigitsSplit
):
    """The build trains a learned router for digits_light:2 (the cascade's first) and one for digits_light:1 (an
    experiment model): in an arm whose cascade starts with digits_light:1, the doubts are those of version 1's."""
    experiments(
        {
            "name": "light_v1",
            "kind": "canary",
            "arms": [
                {"name": "canary", "weight": 100, "models": {"digits_light:2": "digits_light:1"}},
                {"name": "baseline", "weight": 0},
            ],
        }
    )
    images = split.test.images[:64]
    answers = sdk.classify(images, user_id="anyone")
    router_dir = model_repository / ROUTER_MODEL / "1"
    learned, alternates = load_learned_routers(router_dir / LEARNED_ROUTER_FILE)
    assert (learned.judges, [a.judges for a in alternates]) == ("digits_light:2", ["digits_light:1"])
    probs = load_runner(version_dir(model_repository, "digits_light:1")).infer(images)
    inputs = learned_router_inputs(model_repository, images, probs)
    version_1, version_2 = alternates[0].wrong_probability(inputs), learned.wrong_probability(inputs)
    cascaded = [i for i, a in enumerate(answers) if a.reason.startswith("cascade")]
    assert len(cascaded) > 50 and all(answers[i].arms == {"light_v1": "canary"} for i in cascaded)
    served = [float(re.search(r"p\(wrong\)=([0-9.]+)", answers[i].reason).group(1)) for i in cascaded]
    assert all("digits_light:1 confidence" in answers[i].reason for i in cascaded)
    np.testing.assert_allclose(served, version_1[cascaded], atol=0.0015)
    assert np.abs(version_2[cascaded] - version_1[cascaded]).max() > 0.1, "the two routers must tell apart here"


def test_layers_exclude_and_eligibility_decides(sdk, experiments, split: DigitsSplit, server: Supervisor):
    left = {**SPLIT, "name": "left", "layer_range": [0, 50]}
    right = {**SPLIT, "name": "right", "layer_range": [50, 100]}
    eu_only = {
        "name": "eu_only",
        "kind": "split",
        "layer": "thresholds",
        "eligible": {"tiers": ["standard"], "attributes": {"region": ["eu"], "account_age_days": ">= 30"}},
        "arms": [
            {"name": "control", "weight": 50},
            {"name": "strict", "weight": 50, "cascade": {"thresholds": {"standard": 0.99}}},
        ],
    }
    experiments(left, right, eu_only)
    image = split.test.images[1]
    seen = [_arms(sdk, image, f"layer-{i}") for i in range(200)]
    assert all(not ("left" in arms and "right" in arms) for arms in seen)
    assert all(("left" in arms) != ("right" in arms) for arms in seen)  # together they take the whole layer
    assert all("eu_only" not in arms for arms in seen)  # no region sent: not eligible
    eligible = _arms(sdk, image, "eve", attributes={"region": "eu", "account_age_days": 45})
    assert "eu_only" in eligible
    assert "eu_only" not in _arms(sdk, image, "eve", attributes={"region": "us", "account_age_days": 45})
    assert "eu_only" not in _arms(sdk, image, "eve", attributes={"region": "eu", "account_age_days": 3})
    assert _arms(sdk, image, "eve", tier="critical") == {}  # critical is never in an experiment by default
    assert _arms(sdk, image, "") == {}  # no user: the control, in no experiment
    for bad, named in (({"region": "mars"}, "region"), ({"account_age_days": "old"}, "account_age_days")):
        with pytest.raises(TierserveError) as refused:
            sdk.classify(image, user_id="eve", attributes=bad)
        assert refused.value.status == StatusCode.INVALID_ARGUMENT and named in str(refused.value)


def test_a_growing_canary_only_moves_users_into_the_treatment(sdk, experiments, split: DigitsSplit):
    def canary(weight: int) -> dict:
        return {
            "name": "canary_v1",
            "kind": "canary",
            "arms": [
                {"name": "canary", "weight": weight, "models": {"digits_heavy:3": "digits_heavy:1"}},
                {"name": "baseline", "weight": 100 - weight},
            ],
        }

    image, users = split.test.images[2], [f"c{i}" for i in range(300)]
    treated: set[str] = set()
    for weight in (10, 30, 60):
        experiments(canary(weight))
        now = {u for u in users if _arms(sdk, image, u)["canary_v1"] == "canary"}
        assert treated <= now
        assert abs(len(now) / len(users) - weight / 100) < 0.1
        treated = now


def _untroubled(answer) -> bool:
    """Whether every model tried for the answer answered (no PATH hop failed, timed out or was ejected)."""
    return not any(hop.endswith((" error", " timeout", " ejected")) for hop in answer.path.split(">"))


def test_shadow_traffic_never_changes_answers_and_is_counted(server: Supervisor, sdk, experiments, split: DigitsSplit):
    images = split.test.images[:40]
    before = [sdk.classify(image, user_id=f"s{i}")[0] for i, image in enumerate(images)]
    experiments({"name": "shadow_v1", "kind": "shadow", "shadow": {"candidate": "digits_heavy:1", "fraction": 1.0}})
    after = [sdk.classify(image, user_id=f"s{i}")[0] for i, image in enumerate(images)]
    # rows whose every call answered at once (a loaded box can time a call out: then the fallback answers)
    clean = [(o, n) for o, n in zip(before, after, strict=True) if _untroubled(o) and _untroubled(n)]
    assert len(clean) >= len(images) * 0.8
    for old, new in clean:
        assert (new.label, new.route) == (old.label, old.route)
        np.testing.assert_allclose(new.probs, old.probs, atol=1e-6)
    assert all(new.arms == {"shadow_v1": "mirrored"} for new in after)
    store = open_store(server.server.state)
    try:
        from tierserve.experiment_stats import ExperimentStats

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            shadow = ExperimentStats(store).report("shadow_v1").shadow
            if sum(shadow.values()) >= len(images):
                break
            time.sleep(0.2)
        assert shadow.get("agree", 0) + shadow.get("disagree", 0) + shadow.get("dropped", 0) >= len(images)
        assert shadow.get("agree", 0) > len(images) / 2  # two versions of one model mostly agree
    finally:
        store.close()


def test_feedback_is_refused_for_unknown_expired_duplicate_ids_and_bad_labels(
    server: Supervisor, sdk, split: DigitsSplit
):
    (answer,) = sdk.classify(split.test.images[3], user_id="fb")
    sdk.feedback(answer.request_id, int(split.test.labels[3]))
    refusals = {
        "duplicate": (answer.request_id, 3),
        "unknown": ("not-an-id", 3),
        "outside 0-9": (sdk.classify(split.test.images[4], user_id="fb")[0].request_id, 12),
    }
    store = open_store(server.server.state)
    try:
        old = time.time() - 30 * 24 * 3600
        (expired,) = RequestIds(shared_secret(store)).issue(
            [IssuedRow(new_seeds(1)[0], old, "", "standard", 1, None, ())]
        )
    finally:
        store.close()
    refusals["expired"] = (expired, 1)
    for why, (request_id, label) in refusals.items():
        with pytest.raises(TierserveError) as refused:
            sdk.feedback(request_id, label)
        assert refused.value.status == StatusCode.INVALID_ARGUMENT, why
        assert why in str(refused.value), (why, str(refused.value))
        assert not refused.value.retryable


def test_a_bandit_moves_traffic_to_the_more_accurate_arm_and_explains_it(sdk, experiments, split: DigitsSplit):
    experiments(
        {
            "name": "bandit_rules",
            "kind": "bandit",
            "unit": "request",
            "bandit": {"strategy": "thompson"},
            "arms": [
                {"name": "policy"},
                {
                    "name": "rules_only",
                    "models": {"digits_light:2": "digits_rules:1", "digits_heavy:3": "digits_rules:1"},
                },
            ],
        }
    )
    images, labels = split.test.images, split.test.labels
    for i in range(400):
        (answer,) = sdk.classify(images[i % len(images)], user_id=f"b{i % 50}")
        assert "bandit bandit_rules" in answer.reason
        sdk.feedback(answer.request_id, int(labels[i % len(labels)]))
    time.sleep(1.2)  # posteriors are read once a second
    arms = Counter(
        sdk.classify(images[i % len(images)], user_id="late")[0].arms["bandit_rules"] for i in range(400, 600)
    )
    assert arms["policy"] / sum(arms.values()) >= 0.8, arms


def test_a_users_feedback_adapts_their_cascade(sdk, split: DigitsSplit):
    images = split.test.images
    # a user whose every label disagrees with the first model: the light model is always wrong for them
    for i in range(12):
        (answer,) = sdk.classify(images[i], user_id="contrarian", tier="best_effort")
        if "cascade" in answer.reason:
            sdk.feedback(answer.request_id, (answer.label + 1) % 10)
    time.sleep(1.2)
    (answer,) = sdk.classify(images[20], user_id="contrarian", tier="best_effort")
    assert "per-user" in answer.reason and answer.route.startswith("digits_heavy"), answer.reason
    (other,) = sdk.classify(images[20], user_id="someone-else", tier="best_effort")
    assert "per-user" not in other.reason


def test_a_user_the_first_model_often_gets_wrong_gets_a_stricter_threshold_and_keeps_the_doubt(
    sdk, policy: Policy, split: DigitsSplit
):
    first, images = policy.cascade.first, split.test.images
    # feedback only on rows the first model answered alone (so its label is the answer's): 7 right, 5 wrong
    kept = 0
    for i in range(len(images)):
        (answer,) = sdk.classify(images[i], user_id="sometimes-wrong")
        if answer.path == f"{first} ok":
            sdk.feedback(answer.request_id, answer.label if kept < 7 else (answer.label + 1) % 10)
            kept += 1
            if kept == 12:
                break
    assert kept == 12
    time.sleep(1.2)  # user records are read at most once a second
    (answer,) = sdk.classify(images[-1], user_id="sometimes-wrong")
    threshold = policy.adaptation.stricter_threshold
    assert f"per-user: first model right on 7/12 of this user's images, escalates below {threshold:.2f}" in (
        answer.reason
    )
    assert "this row's threshold" in answer.reason and "learned router p(wrong)" in answer.reason, answer.reason


def test_changing_experiments_under_load_fails_no_request(
    server: Supervisor, experiments, model_repository: Path, split: DigitsSplit, tmp_path: Path
):
    url = server.server.grpc_url
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiments": [{**SPLIT, "arms": [{"name": "control", "weight": 101}]}]}))
    with SteadyLoad(url, split.test.images[:50], tiers=("standard",) * 8, user_id="load") as load:
        time.sleep(0.5)
        experiments(SPLIT)
        time.sleep(0.5)
        experiments({**SPLIT, "arms": [{**SPLIT["arms"][0], "weight": 20}, {**SPLIT["arms"][1], "weight": 80}]})
        time.sleep(0.5)
        assert main(["experiment", "apply", str(bad), "--url", server.server.http_url]) == 1
        experiments()
        time.sleep(0.5)
    errors = [s.error for s in load.sent if s.error]
    assert len(load.sent) > 100 and errors == []
    store = open_store(server.server.state)
    try:
        assert served(store, model_repository).experiments == ()
    finally:
        store.close()


def test_a_malformed_file_is_refused_naming_the_key_and_the_running_experiments_keep_serving(
    server: Supervisor, experiments, tmp_path: Path, capsys, sdk, split: DigitsSplit
):
    experiments(SPLIT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiments": [{**SPLIT, "arms": [{"name": "control", "wieght": 50}]}]}))
    assert main(["experiment", "apply", str(bad), "--url", server.server.http_url]) == 1
    assert "experiments[0].arms[0].wieght" in capsys.readouterr().err
    assert "heavy_versions" in _arms(sdk, split.test.images[0], "still-here")
    assert main(["experiment", "list", "--state", server.server.state]) == 0
    assert "heavy_versions" in capsys.readouterr().out


def test_rules_still_decide_for_rows_in_an_arm(sdk, experiments):
    experiments(SPLIT)
    (answer,) = sdk.classify(pure_noise(1, seed=7)[0], user_id="noisy")
    assert answer.route == "digits_rules:1" and "heavy_versions" in answer.arms


def test_metrics_and_the_report_count_rows_feedback_and_accuracy_per_arm(
    server: Supervisor, sdk, experiments, split: DigitsSplit, tmp_path: Path, capsys
):
    experiments({**SPLIT, "name": "reported"})
    images, labels = split.test.images, split.test.labels
    arms: Counter[str] = Counter()
    for i in range(80):
        (answer,) = sdk.classify(images[i], user_id=f"r{i}")
        arms[answer.arms["reported"]] += 1
        sdk.feedback(answer.request_id, int(labels[i]))
    rows = {
        arm: sum(metric_values(server.server, "tierserve_experiment_rows_total", experiment="reported", arm=arm))
        for arm in arms
    }
    assert rows == {arm: float(count) for arm, count in arms.items()}
    fed_back = sum(metric_values(server.server, "tierserve_feedback_total", experiment="reported"))
    assert fed_back == 80
    time.sleep(1.0)  # the routers write per-arm rows to the state store every 0.5 s
    png = tmp_path / "reported.png"
    assert main(["experiment", "report", "reported", "--state", server.server.state, "--png", str(png)]) == 0
    text = capsys.readouterr().out
    for arm, count in arms.items():
        line = next(words for words in map(str.split, text.splitlines()) if words[:1] == [arm])  # its table row
        assert int(line[2]) == count and int(line[3]) == count, line  # rows and feedback of that arm
    assert "two-proportion z-test" in text and "probability of being the best arm" in text
    assert png.stat().st_size > 10_000


def _raw_feedback(server: TritonServer, ids: np.ndarray, labels: np.ndarray, label_type: str = "INT64"):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        request_id = grpcclient.InferInput("REQUEST_ID", list(ids.shape), "BYTES")
        request_id.set_data_from_numpy(ids)
        label = grpcclient.InferInput("LABEL", list(labels.shape), label_type)
        label.set_data_from_numpy(labels)
        return client.infer("feedback", [request_id, label], client_timeout=10).as_numpy("ACCEPTED")
    finally:
        client.close()


def test_what_an_outsider_sends_to_feedback_is_refused_for_that_request_alone(
    server: Supervisor, sdk, split: DigitsSplit
):
    triton = server.server
    (answer,) = sdk.classify(split.test.images[5], user_id="outsider")
    real = answer.request_id
    tampered = real[:-2] + ("A" if real[-2] != "A" else "B") + real[-1]
    one = np.array([[3]], np.int64)
    cases = {
        "a tampered id": (np.array([[tampered.encode()]], object), one, "INT64", "unknown REQUEST_ID"),
        "a megabyte id": (np.array([[b"x" * 1_000_000]], object), one, "INT64", "unknown REQUEST_ID"),
        "bytes that are not UTF-8": (np.array([[b"\xff\xfe\x00"]], object), one, "INT64", "unknown REQUEST_ID"),
        "an empty id": (np.array([[b""]], object), one, "INT64", "unknown REQUEST_ID"),
        "a negative label": (np.array([[real.encode()]], object), np.array([[-1]], np.int64), "INT64", "LABEL"),
        "a huge label": (np.array([[real.encode()]], object), np.array([[2**62]], np.int64), "INT64", "LABEL"),
        "a float label": (np.array([[real.encode()]], object), np.array([[3.0]], np.float32), "FP32", "LABEL"),
        "rows that do not pair up": (
            np.array([[real.encode()], [real.encode()]], object),
            one,
            "INT64",
            "",
        ),
    }
    for what, (ids, labels, label_type, says) in cases.items():
        with pytest.raises(InferenceServerException) as refused:
            _raw_feedback(triton, ids, labels, label_type)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", (what, refused.value)
        assert says in refused.value.message(), (what, refused.value.message()[:200])
        assert "Traceback" not in refused.value.message() and "/work/" not in refused.value.message()
    # none of that touched the real id: its one feedback is still to be given, and a second is refused
    assert _raw_feedback(triton, np.array([[real.encode()]], object), one).tolist() == [[True]]
    with pytest.raises(InferenceServerException, match="duplicate"):
        _raw_feedback(triton, np.array([[real.encode()]], object), one)


def test_concurrent_feedback_for_one_answer_is_taken_exactly_once(server: Supervisor, sdk, split: DigitsSplit):
    (answer,) = sdk.classify(split.test.images[6], user_id="racer")

    def send(_: int) -> str:
        with TierserveClient(server.server.grpc_url) as client:
            try:
                client.feedback(answer.request_id, int(split.test.labels[6]))
                return "accepted"
            except TierserveError as error:
                return "duplicate" if "duplicate" in str(error) else str(error)

    with ThreadPoolExecutor(8) as pool:
        outcomes = Counter(pool.map(send, range(16)))
    assert outcomes == {"accepted": 1, "duplicate": 15}


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"account_age_days": True}, "account_age_days"),
        ({"account_age_days": "99999999999"}, "account_age_days"),
        ({"account_age_days": "-"}, "account_age_days"),
        ({"region": "x" * 100_000}, "region"),
        ({"device": ""}, "device"),
    ],
)
def test_malformed_attributes_are_refused_naming_them(server: Supervisor, split: DigitsSplit, attributes, named):
    client = grpcclient.InferenceServerClient(server.server.grpc_url)
    try:
        pixels = grpcclient.InferInput("PIXELS", [1, 8, 8], "FP32")
        pixels.set_data_from_numpy(split.test.images[:1].astype(np.float32))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("digits", [pixels], parameters={"user_id": "u", **attributes}, client_timeout=10)
    finally:
        client.close()
    message = refused.value.message()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and named in message
    assert len(message) < 400  # the value is echoed cut short
