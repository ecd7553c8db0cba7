"""Model versions on a real server of their own: promote, rollback, retire and load under load at concurrency 8 with
no failed request, retire refused naming what uses the version, experiments and promotions composing, `tierserve
models`, a restart after kill -9 that keeps the promotions and what was retired or unloaded, and the audit trail of
every action, refused ones included. The shipped policy routes digits_heavy:3; its TensorRT variant, an optional
model, is not in this repository (the cascade passes over it)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierserve.client import TierserveClient
from tierserve.operator_lock import one_change_at_a_time
from tierserve.router_files import ROUTER_MODEL
from tierserve.state_store import open_store
from tierserve.tools.audit import Action, Outcome, read_audit
from tierserve.tools.cli import main
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.exit_codes import ExitCode
from tierserve.tools.load import SteadyLoad
from tierserve.tools.paths import ADMIN_KEY_ENV, AUDIT_ENV
from tierserve.tools.serve import OperatorChanges
from tierserve.tools.supervisor import EventKind, Supervisor

from .conftest import escalated_images, supervised_server

LANE = "digits_heavy_critical"


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model repository, linked, plus the critical lane of digits_heavy:1 (digits_heavy_critical:1, a shim
    like those of its other versions), so digits_heavy:1 can be promoted with its lane."""
    target = tmp_path_factory.mktemp("versions") / "model_repository"
    target.mkdir()
    for model in model_repository.iterdir():
        if model.is_dir() and model.name != LANE:
            (target / model.name).symlink_to(model.resolve())
    (target / LANE).mkdir()
    for item in (model_repository / LANE).iterdir():
        (target / LANE / item.name).symlink_to(item.resolve())
    (target / LANE / "1").mkdir()
    shim = (model_repository / LANE / "2" / "model.py").read_text().replace("version 2", "version 1")
    (target / LANE / "1" / "model.py").write_text(shim)
    return target


@pytest.fixture(scope="module")
def operator_changes() -> Iterator[OperatorChanges]:
    """What `tierserve serve` runs after every start: puts back the operators' changes the config files do not say."""
    changes = OperatorChanges()
    yield changes
    changes.close()


@pytest.fixture(scope="module")
def server(
    repository: Path, tmp_path_factory: pytest.TempPathFactory, operator_changes: OperatorChanges
) -> Iterator[Supervisor]:
    """A server of this module's own: the versions changed here never reach the session server's tests. The CLI
    runs with its admin key and writes to an audit log of this module's own."""
    workdir = tmp_path_factory.mktemp("versions_server")
    with (
        supervised_server(repository, workdir, on_ready=operator_changes.after_start) as supervisor,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv(ADMIN_KEY_ENV, supervisor.server.admin_key)
        env.setenv(AUDIT_ENV, str(workdir / "audit.jsonl"))
        yield supervisor


@pytest.fixture
def cli(server: Supervisor, repository: Path, capsys: pytest.CaptureFixture):
    """`tierserve ARGS --url ... --state ... --model-repository ...` on this module's server: (exit status, stdout,
    stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        where = ["--url", server.server.http_url, "--state", server.server.state, "--model-repository", str(repository)]
        status = main([*args, *([] if args[0] == "audit" else where)])
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture(scope="module")
def hard_images(server: Supervisor, split: DigitsSplit) -> np.ndarray:
    """Test images (at most 32) that the cascade escalates to the heavy model at the standard tier."""
    return escalated_images(server.server, split.test.images[:256])


def _routes(server: Supervisor, images: np.ndarray, tier: str = "standard") -> set[str]:
    with TierserveClient(server.server.grpc_url, tier_key=server.server.tier_key) as client:
        return {a.route for a in client.classify(images, tier=tier)}


def _served(server: Supervisor, model: str, *change: int, without: int = 0) -> str:
    """What the tools say `model` serves, from the server's index, with versions `change` added or `without` not."""
    index = server.server.models()
    ready = {int(m["version"]) for m in index if m["name"] == model and m.get("state") == "READY"}
    return f"{model} versions {', '.join(map(str, sorted((ready | set(change)) - {without})))}"


def _audit(server: Supervisor) -> list:
    return list(read_audit(Path(server.server.workdir) / "audit.jsonl").entries)


def test_promote_rollback_retire_and_load_under_load_fail_no_request(server: Supervisor, cli, hard_images: np.ndarray):
    tiers = ("standard",) * 4 + ("critical",) * 4  # concurrency 8, the critical half through the lanes
    heavy, lane = _served(server, "digits_heavy"), _served(server, LANE, 1)  # before; the lane's 1 comes with promote
    with SteadyLoad(server.server.grpc_url, hard_images, tiers=tiers, tier_key=server.server.tier_key) as load:
        time.sleep(1.0)
        assert cli("promote", "digits_heavy:1")[0] == 0
        promoted_at = time.monotonic()  # the new router serves; requests the old one took may still finish
        time.sleep(1.5)
        assert _routes(server, hard_images) == {"digits_heavy:1"}
        assert _routes(server, hard_images, "critical") == {f"{LANE}:1"}
        switching_back_at = time.monotonic()
        assert cli("rollback", "digits_heavy")[0] == 0
        rolled_back_at = time.monotonic()
        time.sleep(1.5)
        assert cli("retire", "digits_heavy:1")[0] == 0
        assert cli("retire", f"{LANE}:1")[0] == 0
        time.sleep(1.0)
        assert cli("model", "load", "digits_heavy:1")[0] == 0
        time.sleep(1.0)
    sent = list(load.sent)
    errors = [s.error for s in sent if s.error]
    assert len(sent) > 200 and errors == [], errors[:3]
    # hard images escalate, except where a loaded box leaves no budget for it (REASON: escalation skipped). A request
    # sent once the reload returned reaches the new router; one sent before may be answered by the old one later
    between = [s.answer for s in sent if promoted_at < s.sent_at and s.at < switching_back_at]
    assert between and {a.route for a in between if a.route.startswith("digits_heavy")} == {
        "digits_heavy:1",
        f"{LANE}:1",
    }
    assert not any("digits_heavy:3" in a.path or f"{LANE}:3" in a.path for a in between)
    after = [s.answer for s in sent if s.sent_at > rolled_back_at]
    assert {a.route for a in after if a.route.startswith("digits_heavy")} == {"digits_heavy:3", f"{LANE}:3"}
    assert _routes(server, hard_images) == {"digits_heavy:3"}
    assert server.server.model_ready("digits_heavy", "1") and not server.server.model_ready(LANE, "1")
    actions = [(e.action, e.target, e.before, e.after, e.outcome) for e in _audit(server)[-5:]]
    assert actions == [
        (Action.PROMOTE, "digits_heavy:1", "digits_heavy:3", "digits_heavy:1", Outcome.OK),
        (Action.ROLLBACK, "digits_heavy", "digits_heavy:1", "digits_heavy:3", Outcome.OK),
        (Action.RETIRE, "digits_heavy:1", heavy, _served(server, "digits_heavy", without=1), Outcome.OK),
        (Action.RETIRE, f"{LANE}:1", lane, _served(server, LANE), Outcome.OK),
        (Action.LOAD, "digits_heavy:1", _served(server, "digits_heavy", without=1), heavy, Outcome.OK),
    ]


def test_retire_is_refused_while_a_version_is_used_naming_each_use(server: Supervisor, cli):
    status, _, err = cli("retire", "digits_heavy:3")
    assert status == 1
    uses = "policy models; fallback chain of digits_light:2; fallback chain of digits_heavy_trt:1"
    assert f"digits_heavy:3 is still used by: {uses}" in err
    status, _, err = cli("retire", f"{LANE}:3")
    assert status == 1 and "critical lane of digits_heavy:3" in err
    status, _, err = cli("model", "unload", "digits_light")
    assert status == 1 and "digits_light:2 by policy models" in err
    status, _, err = cli("retire", "digits_heavy_trt:1")  # the optional model this repository does not have
    assert status == ExitCode.NOT_FOUND and "no model 'digits_heavy_trt'" in err and "optional_models" in err
    assert server.server.model_ready("digits_heavy", "3") and server.server.model_ready(LANE, "3")
    refused = _audit(server)[-4:]
    assert [(e.action, e.outcome) for e in refused] == [
        (Action.RETIRE, Outcome.REFUSED),
        (Action.RETIRE, Outcome.REFUSED),
        (Action.UNLOAD, Outcome.REFUSED),
        (Action.RETIRE, Outcome.REFUSED),
    ]
    assert "fallback chain of digits_heavy_trt:1" in refused[0].message
    assert refused[0].before == _served(server, "digits_heavy")


def test_unloading_a_model_a_served_ensemble_needs_is_refused_and_its_ensemble_keeps_serving(server: Supervisor, cli):
    """Triton 2.51 unloads an ensemble with a model it needs: `model unload preprocess` would take the static
    ensemble down unannounced. It is refused, naming the ensemble; once the ensemble is unloaded, it goes."""
    status, _, err = cli("model", "unload", "preprocess")
    assert status == ExitCode.FAILED
    assert "preprocess is still used: preprocess by a step of ensemble digits_static_light; unload the ensemble" in err
    assert server.server.model_ready("preprocess", "1") and server.server.model_ready("digits_static_light", "1")
    try:
        assert cli("model", "unload", "digits_static_light")[0] == 0
        assert cli("model", "unload", "preprocess")[0] == 0
        assert not server.server.model_ready("preprocess", "1")
    finally:
        cli("model", "load", "preprocess")
        cli("model", "load", "digits_static_light")
    assert server.server.model_ready("digits_static_light", "1")


@pytest.mark.parametrize(
    ("args", "named", "exit_code"),
    [
        (("promote", "digits_heavy:9"), "digits_heavy:9 does not exist", ExitCode.NOT_FOUND),
        (("promote", "digits_heavy:3"), "digits_heavy:3 is already the version the policy routes to", ExitCode.FAILED),
        (("promote", f"{LANE}:1"), f"{LANE} is a lane of digits_heavy", ExitCode.FAILED),
        (("rollback", "digits_heavy"), "digits_heavy has no earlier version to roll back to", ExitCode.FAILED),
        (("retire", "digits_heavy:9"), "digits_heavy:9 does not exist", ExitCode.NOT_FOUND),
        (("model", "load", "digits_heavy:3"), "digits_heavy:3 is loaded already", ExitCode.FAILED),
    ],
)
def test_bad_input_is_refused_naming_the_problem_and_changes_nothing(
    server: Supervisor, cli, args, named: str, exit_code: ExitCode
):
    index = server.server.models()
    status, _, err = cli(*args)
    assert status == exit_code and named in err
    assert server.server.models() == index
    assert _audit(server)[-1].outcome == Outcome.REFUSED


def _split_file(folder: Path) -> Path:
    """An experiments file: a split whose arm v1 sends digits_heavy:3's rows to digits_heavy:1."""
    arms = [
        {"name": "control", "weight": 50},
        {"name": "v1", "weight": 50, "models": {"digits_heavy:3": "digits_heavy:1"}},
    ]
    split = folder / "split.yaml"
    split.write_text(json.dumps({"experiments": [{"name": "heavy_versions", "kind": "split", "arms": arms}]}))
    return split


def test_experiments_and_promotions_compose(server: Supervisor, cli, hard_images: np.ndarray, tmp_path: Path):
    shadow = tmp_path / "shadow.yaml"
    mirror = {"candidate": "digits_light:2", "fraction": 1.0}
    shadow.write_text(json.dumps({"experiments": [{"name": "shadow_light", "kind": "shadow", "shadow": mirror}]}))
    split = _split_file(tmp_path)
    try:
        assert cli("experiment", "apply", str(split))[0] == 0
        status, _, err = cli("promote", "digits_heavy:1")  # the split replaces digits_heavy:3: it must stop first
        assert status == 1 and "experiment heavy_versions arm v1" in err and "stop it first" in err
        status, _, err = cli("retire", "digits_heavy:1")
        assert status == 1 and "experiment heavy_versions arm v1 (digits_heavy:3 -> digits_heavy:1)" in err
        assert cli("experiment", "apply", str(shadow))[0] == 0
        assert cli("promote", "digits_heavy:1")[0] == 0
        with TierserveClient(server.server.grpc_url) as client:
            answers = client.classify(hard_images, user_id="composer")
        assert {a.route for a in answers} == {"digits_heavy:1"}
        assert all(a.arms == {"shadow_light": "mirrored"} for a in answers)  # the experiment still runs
        assert cli("experiment", "stop", "shadow_light")[0] == 0
        assert _routes(server, hard_images) == {"digits_heavy:1"}  # and the promotion stays
        status, _, err = cli("experiment", "apply", str(split))  # names digits_heavy:3, no longer routed to
        assert status == 1 and "experiments[0].arms[1].models.digits_heavy:3" in err
    finally:
        cli("experiment", "stop", "heavy_versions")
        cli("experiment", "stop", "shadow_light")
        cli("rollback", "digits_heavy")
    assert _routes(server, hard_images) == {"digits_heavy:3"}
    actions = {(e.action, e.outcome) for e in _audit(server)}
    assert {(Action.EXPERIMENT_APPLY, Outcome.OK), (Action.EXPERIMENT_APPLY, Outcome.REFUSED)} <= actions
    assert {(Action.EXPERIMENT_STOP, Outcome.OK), (Action.PROMOTE, Outcome.REFUSED)} <= actions


def test_models_shows_every_served_version_with_its_manifest_and_routing(server: Supervisor, cli, repository: Path):
    status, out, _ = cli("models")
    assert status == 0
    assert out.startswith(f"source: the server at {server.server.http_url} (repository index); promotions: ")
    heavy = json.loads((repository / "digits_heavy" / "3" / "manifest.json").read_text())
    block = out.split("\ndigits_heavy:3  READY\n")[1].split("\n\n")[0]
    assert "routing    policy models; fallback chain of digits_light:2; fallback chain of digits_heavy_trt:1" in block
    assert f"sha256 {heavy['artifact_sha256']}" in block and f"seed {heavy['seed']}" in block
    assert f"rows sha256 {heavy['split']['rows_sha256']}" in block
    assert f"{heavy['test_accuracy']:.4f} on the test split" in block
    assert all(f"{name} {version}" in block for name, version in heavy["libraries"].items())
    assert f"{LANE}:3  READY  (a lane: serves digits_heavy:3's artifacts)" in out
    # the optional TensorRT variant: absent here, shown with its uses instead of failing on its missing config
    absent = out.split("\ndigits_heavy_trt:1  not in this repository  (optional: built on GPU hosts)\n")[1]
    assert absent.startswith("  routing    policy models; cascade escalation; fallback chain of digits_light:2\n")
    status, out, _ = cli("models", "--json")
    versions = {(v["model"], v["version"]): v for v in json.loads(out)["versions"]}
    assert versions[("digits_heavy", 1)]["state"] == "READY"
    assert versions[("digits_heavy", 1)]["experiment_model"] is True
    assert versions[(LANE, 3)]["serves"] == "digits_heavy:3"
    trt = versions[("digits_heavy_trt", 1)]
    assert trt["state"] == "not in this repository" and trt["optional"] is True and trt["manifest"] is None
    assert versions[(ROUTER_MODEL, 1)]["manifest"] is None


def test_a_restarted_server_keeps_the_promotion_its_lane_and_what_was_unloaded(
    server: Supervisor, cli, hard_images: np.ndarray
):
    """After kill -9, the supervisor's restart loads the config files (every version they list), then does what
    `tierserve serve` does once the server is ready: loads the promoted routing's lane and unloads again what was
    retired or unloaded."""
    assert cli("promote", "digits_heavy:1")[0] == 0
    try:
        assert cli("retire", "digits_heavy:3")[0] == 0  # no longer routed to
        assert cli("model", "unload", "digits_static_light")[0] == 0
        _killed_and_restarted(server)
        # the new router read the promotion from the state store; its lane is not in the config files
        assert _routes(server, hard_images) == {"digits_heavy:1"}
        assert _routes(server, hard_images, "critical") == {f"{LANE}:1"}
        assert _served(server, "digits_heavy") == "digits_heavy versions 1, 2"
        assert server.server.model_ready("digits_static_light", "1") is False
    finally:
        cli("rollback", "digits_heavy")  # loads digits_heavy:3 again
        cli("model", "load", "digits_static_light")
    assert _routes(server, hard_images) == {"digits_heavy:3"}
    assert server.server.model_ready("digits_static_light", "1")


def _killed_and_restarted(server: Supervisor) -> None:
    events = len(server.events)
    os.kill(server.server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while not any(e.kind == EventKind.SERVER_RESTARTED for e in server.events[events:]):
        assert time.monotonic() < deadline, f"no restart: {[str(e) for e in server.events[events:]]}"
        time.sleep(0.2)
    assert not any(e.kind == EventKind.RESTART_FAILED for e in server.events[events:])


def test_a_restart_during_another_change_unloads_again_once_that_change_ends(
    server: Supervisor, cli, operator_changes: OperatorChanges
):
    """kill -9 while a canary holds the operator lease: the supervisor restarts the server without waiting for the
    canary (the config files load the retired version again), and once the canary ends the retired version is
    unloaded again, with no restart."""
    assert cli("retire", "digits_heavy:1")[0] == 0
    store = open_store(server.server.state)
    try:
        with one_change_at_a_time(store, "canary digits_heavy:2"):
            _killed_and_restarted(server)
            assert _served(server, "digits_heavy") == "digits_heavy versions 1, 2, 3"
            assert operator_changes.waiting()
        deadline = time.monotonic() + 30
        while operator_changes.waiting():  # it takes the lease within RETRY_WAIT_S, unloads, then ends
            assert time.monotonic() < deadline, _served(server, "digits_heavy")
            time.sleep(0.2)
        assert _served(server, "digits_heavy") == "digits_heavy versions 2, 3"
    finally:
        store.close()
        cli("model", "load", "digits_heavy:1")
    assert _served(server, "digits_heavy") == "digits_heavy versions 1, 2, 3"


def test_a_change_while_another_operators_is_under_way_is_refused_naming_it(server: Supervisor, cli):
    """Two operators, one server: the second's change is refused while the first's holds the lease in the server's
    state store, and goes once it ended."""
    store = open_store(server.server.state)
    try:
        with one_change_at_a_time(store, "canary digits_heavy:2"):
            for args in (("retire", "digits_heavy:1"), ("experiment", "stop", "shadow_light")):
                status, _, err = cli(*args)
                assert status == ExitCode.FAILED
                assert err.startswith("tierserve: refused, nothing changed: another change is under way: canary "), err
                assert "try `" in err and "` again once it is done (one change at a time)" in err
            assert _served(server, "digits_heavy") == "digits_heavy versions 1, 2, 3"
    finally:
        store.close()
    refused = [e for e in _audit(server)[-2:] if e.outcome == Outcome.REFUSED]
    assert [e.action for e in refused] == [Action.RETIRE, Action.EXPERIMENT_STOP]
    assert cli("retire", "digits_heavy:1")[0] == 0  # the lease was given back
    assert cli("model", "load", "digits_heavy:1")[0] == 0


def test_an_experiment_that_sends_rows_to_a_version_not_served_is_refused(server: Supervisor, cli, tmp_path: Path):
    assert cli("retire", "digits_heavy:1")[0] == 0
    try:
        router = server.server.model_config(ROUTER_MODEL)
        status, _, err = cli("experiment", "apply", str(_split_file(tmp_path)))
        assert status == ExitCode.FAILED
        assert "experiment heavy_versions arm v1 sends rows to digits_heavy:1, which the server does not serve" in err
        assert server.server.model_config(ROUTER_MODEL) == router  # not reloaded
        assert (_audit(server)[-1].action, _audit(server)[-1].outcome) == (Action.EXPERIMENT_APPLY, Outcome.REFUSED)
    finally:
        assert cli("model", "load", "digits_heavy:1")[0] == 0


def test_the_audit_command_prints_every_action_including_refusals(server: Supervisor, cli):
    status, out, _ = cli("audit", "--json")
    assert status == 0
    entries = json.loads(out)
    assert {e["outcome"] for e in entries} >= {"ok", "refused"}
    assert {e["action"] for e in entries} >= {"promote", "rollback", "retire", "load", "experiment_apply"}
    assert all(e["time"] and e["operator"] for e in entries)
    status, out, _ = cli("audit", "--last", "3")
    assert status == 0 and "outcome" in out and len(out.splitlines()) >= 4
