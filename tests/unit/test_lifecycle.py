"""promote, rollback, retire, load and unload against a stand-in for the server's model repository API: each checks
everything first and changes nothing when it refuses, loads what the new routing needs before it reloads the router,
and puts things back when the server does not take a step."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from tierserve.experiment_spec import ExperimentsFile, experiments_json, parse_experiments
from tierserve.experimenter import EXPERIMENTS_KEY
from tierserve.operator_lock import LEASE_KEY, one_change_at_a_time
from tierserve.operator_unloads import UNLOADS_KEY, OperatorUnloads, UnloadsError, store_unloads, stored_unloads
from tierserve.promotions import (
    PROMOTIONS_PARAMETER,
    ModelVersion,
    Promotion,
    Promotions,
    UseKind,
    store_promotions,
    stored_promotions,
)
from tierserve.router_files import ROUTER_MODEL, absent_models, router_policy
from tierserve.state_store import MemoryStore, StateStoreError
from tierserve.tools.audit import Step
from tierserve.tools.experiment_admin import check_served
from tierserve.tools.lifecycle import (
    Failed,
    Lifecycle,
    Problem,
    Reapplied,
    Refused,
    ensemble_steps,
    repository_config,
    repository_versions,
)
from tierserve.tools.model_control import VersionState
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.provenance import (
    ABSENT,
    ON_DISK,
    disk_provenance,
    provenance,
    provenance_text,
    server_provenance,
)
from tierserve.tools.serve import OperatorChanges

from .heavy_v2 import heavy_v2_router


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """The model repository, linked, its policy routing digits_heavy:2 (tests/unit/heavy_v2.py), with digits_heavy
    versions 1 and 2 as built, a version 3 (built), lane shims
    for versions 1 and 3, a version 7 that was never built, and a version 8 built but without a lane folder."""
    repository = tmp_path / "model_repository"
    repository.mkdir()
    for model in DEFAULT_REPOSITORY.iterdir():
        if model.name in ("digits_heavy", "digits_heavy_critical"):
            (repository / model.name).mkdir()
            config = (model / "config.pbtxt").read_text()
            versions = "1, 2" if model.name == "digits_heavy" else "2"  # as shipped before version 3
            policy = f"version_policy: {{ specific: {{ versions: [{versions}] }} }}"
            config = re.sub(r"version_policy: .*", policy, config)
            (repository / model.name / "config.pbtxt").write_text(config)
        elif model.name == ROUTER_MODEL:
            heavy_v2_router(repository)
        elif model.is_dir():
            (repository / model.name).symlink_to(model)
    heavy, lane = repository / "digits_heavy", repository / "digits_heavy_critical"
    for version in ("1", "2"):
        (heavy / version).symlink_to(DEFAULT_REPOSITORY / "digits_heavy" / version)
    (lane / "2").symlink_to(DEFAULT_REPOSITORY / "digits_heavy_critical" / "2")
    manifest = json.loads((DEFAULT_REPOSITORY / "digits_heavy" / "1" / "manifest.json").read_text())
    for version in ("3", "8"):
        (heavy / version).mkdir()
        (heavy / version / "manifest.json").write_text(json.dumps({**manifest, "version": int(version)}))
    (heavy / "7").mkdir()
    for version in ("1", "3"):
        (lane / version).mkdir()
        shutil.copy(DEFAULT_REPOSITORY / "digits_heavy_critical" / "2" / "model.py", lane / version / "model.py")
    return repository


class FakeControl:
    """The model repository API of a server, in memory: which versions each model serves, its running config,
    and every call made, in order. `fail` names the model whose next load the server refuses."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.configs = {
            model.name: repository_config(repository, model.name)
            for model in repository.iterdir()
            if (model / "config.pbtxt").exists()
        }
        served = {
            "digits_heavy": {1, 2},
            "digits_heavy_critical": {2},
            "digits_light": {1, 2},
            "digits_light_critical": {2},
        }
        self.ready = {m: served.get(m, {1}) for m in self.configs}
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []
        self.fail: str | None = None

    def config(self, model: str) -> dict:
        """The running config with config.pbtxt's version policy: Triton 2.51 reports the policy of a model's last
        full load, and a retirement or a promotion here changes only the versions."""
        config = copy.deepcopy(self.configs[model])
        pbtxt = repository_config(self.repository, model) if (self.repository / model).exists() else {}
        config.pop("version_policy", None)
        return {**config, **({"version_policy": pbtxt["version_policy"]} if "version_policy" in pbtxt else {})}

    def index(self) -> list[VersionState]:
        return [VersionState(m, str(v), "READY", "") for m, versions in self.ready.items() for v in versions]

    def ready_versions(self, model: str) -> set[int]:
        return set(self.ready.get(model, set()))

    def load_with(self, model: str, config: dict) -> None:
        if self.fail == model:
            raise InferenceServerException(f"failed to load '{model}': injected")
        self.configs[model] = copy.deepcopy(config)
        versions = config.get("version_policy", {}).get("specific", {}).get("versions")
        if versions is not None:
            self.ready[model] = {int(v) for v in versions}
        self.calls.append(("load", model, tuple(sorted(self.ready[model]))))

    def load_versions(self, model: str, versions, config: dict | None = None) -> None:
        config = dict(self.config(model) if config is None else config)
        config["version_policy"] = {"specific": {"versions": sorted(versions)}}
        self.load_with(model, config)

    def load(self, model: str) -> None:
        self.ready[model] = {1}
        self.calls.append(("load", model, (1,)))

    def unload(self, model: str) -> None:
        self.ready[model] = set()
        self.calls.append(("unload", model, ()))

    def router_promotions(self) -> Promotions:
        parameter = self.configs[ROUTER_MODEL].get("parameters", {}).get(PROMOTIONS_PARAMETER)
        return Promotions() if parameter is None else Promotions.model_validate_json(parameter["string_value"])


@pytest.fixture
def control(repository: Path) -> FakeControl:
    return FakeControl(repository)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def lifecycle(control: FakeControl, store: MemoryStore, repository: Path) -> Lifecycle:
    return Lifecycle(control, store, repository)  # type: ignore[arg-type]


def _run_experiments(store: MemoryStore, repository: Path, *experiments: dict) -> None:
    spec = parse_experiments({"experiments": list(experiments)}, router_policy(repository))
    store.set(EXPERIMENTS_KEY, experiments_json(spec).encode())


SPLIT = {
    "name": "heavy_versions",
    "kind": "split",
    "arms": [
        {"name": "control", "weight": 50},
        {"name": "v1", "weight": 50, "models": {"digits_heavy:2": "digits_heavy:1"}},
    ],
}
SHADOW = {"name": "shadow_v1", "kind": "shadow", "layer": "b", "shadow": {"candidate": "digits_heavy:1", "fraction": 1}}


def test_repository_config_and_versions_read_the_files(repository: Path):
    config = repository_config(repository, "digits_heavy")
    assert config["name"] == "digits_heavy" and config["version_policy"] == {"specific": {"versions": ["1", "2"]}}
    assert repository_versions(repository, "digits_heavy") == [1, 2, 3, 7, 8]
    assert repository_versions(repository, "no_such_model") == []


def test_promote_loads_the_version_and_its_lane_before_it_reloads_the_router(lifecycle, control, store):
    control.configs[ROUTER_MODEL]["parameters"] = {"experiments": {"string_value": '{"experiments":[]}'}}
    step = lifecycle.promote("digits_heavy:3")
    assert control.calls == [
        ("load", "digits_heavy", (1, 2, 3)),
        ("load", "digits_heavy_critical", (2, 3)),
        ("load", ROUTER_MODEL, (1,)),
    ]
    expected = Promotions(models={"digits_heavy": Promotion(version=3, history=(2,))})
    assert control.router_promotions() == expected == stored_promotions(store) == lifecycle.promotions()
    assert (step.before, step.after) == ("digits_heavy:2", "digits_heavy:3")
    assert "digits_heavy:3 instead of digits_heavy:2" in step.message
    assert lifecycle.policy().cascade.escalate_to == "digits_heavy:3"
    # the router's other parameters (the experiments applied) are kept
    assert set(control.configs[ROUTER_MODEL]["parameters"]) == {"experiments", PROMOTIONS_PARAMETER}


def test_promote_to_a_loaded_version_loads_only_what_is_missing(lifecycle, control):
    lifecycle.promote("digits_heavy:1")
    assert control.calls == [("load", "digits_heavy_critical", (1, 2)), ("load", ROUTER_MODEL, (1,))]
    control.calls.clear()
    lifecycle.rollback("digits_heavy")
    assert control.calls == [("load", ROUTER_MODEL, (1,))]


@pytest.mark.parametrize(
    ("target", "problem", "named"),
    [
        ("digits_heavy", Problem.MALFORMED, "expected MODEL:VERSION"),
        ("digits_heavy:-1", Problem.MALFORMED, "expected MODEL:VERSION"),
        ("../digits_heavy:3", Problem.MALFORMED, "expected MODEL:VERSION"),
        ("digits_huge:3", Problem.UNKNOWN_MODEL, "no model 'digits_huge'"),
        ("digits_heavy:9", Problem.UNKNOWN_VERSION, "digits_heavy:9 does not exist"),
        ("digits_heavy:7", Problem.NO_MANIFEST, "digits_heavy:7 has no usable manifest"),
        ("digits_heavy:8", Problem.UNKNOWN_VERSION, "digits_heavy:8's lane digits_heavy_critical:8 does not exist"),
        ("digits_heavy:2", Problem.ALREADY, "digits_heavy:2 is already the version the policy routes to"),
        ("digits_heavy_critical:3", Problem.LANE, "digits_heavy_critical is a lane of digits_heavy"),
        ("preprocess:1", Problem.NOT_ROUTED, "the policy does not route to preprocess"),
        (f"{ROUTER_MODEL}:1", Problem.ROUTER, "is the router"),
    ],
)
def test_a_refused_promotion_names_the_problem_and_changes_nothing(
    lifecycle, control, store, target: str, problem: Problem, named: str
):
    with pytest.raises(Refused) as refused:
        lifecycle.promote(target)
    assert refused.value.problem == problem
    assert named in str(refused.value)
    assert control.calls == [] and store.get("promotions") is None


def test_promote_is_refused_while_a_running_experiment_names_the_version_it_replaces(
    lifecycle, control, store, repository
):
    _run_experiments(store, repository, SPLIT)
    with pytest.raises(Refused) as refused:
        lifecycle.promote("digits_heavy:3")
    assert refused.value.problem == Problem.IN_USE
    assert [u.kind for u in refused.value.uses] == [UseKind.EXPERIMENT_ARM]
    assert "experiment heavy_versions arm v1" in str(refused.value) and "stop it first" in str(refused.value)
    assert control.calls == []


def test_rollback_returns_to_the_previous_version_and_then_has_nowhere_to_go(lifecycle, control, store):
    lifecycle.promote("digits_heavy:3")
    lifecycle.promote("digits_heavy:1")
    control.calls.clear()
    step = lifecycle.rollback("digits_heavy")
    assert (step.before, step.after) == ("digits_heavy:1", "digits_heavy:3")
    assert control.calls == [("load", ROUTER_MODEL, (1,))]  # 3 and its lane are loaded still
    assert stored_promotions(store).models["digits_heavy"] == Promotion(version=3, history=(2,))
    lifecycle.rollback("digits_heavy")
    assert lifecycle.policy().cascade.escalate_to == "digits_heavy:2"
    with pytest.raises(Refused) as refused:
        lifecycle.rollback("digits_heavy")
    assert refused.value.problem == Problem.NO_HISTORY
    assert "digits_heavy has no earlier version to roll back to" in str(refused.value)


@pytest.mark.parametrize(
    ("model", "problem"),
    [("digits_heavy:2", Problem.MALFORMED), ("digits_light", Problem.NO_HISTORY), ("nope", Problem.UNKNOWN_MODEL)],
)
def test_a_refused_rollback_changes_nothing(lifecycle, control, model: str, problem: Problem):
    with pytest.raises(Refused) as refused:
        lifecycle.rollback(model)
    assert refused.value.problem == problem and control.calls == []


def test_rollback_loads_a_previous_version_that_was_retired_since(lifecycle, control):
    lifecycle.promote("digits_heavy:3")
    lifecycle.retire("digits_heavy:2")
    lifecycle.retire("digits_heavy_critical:2")
    control.calls.clear()
    lifecycle.rollback("digits_heavy")
    assert control.calls == [
        ("load", "digits_heavy", (1, 2, 3)),
        ("load", "digits_heavy_critical", (2, 3)),
        ("load", ROUTER_MODEL, (1,)),
    ]


def test_retire_is_refused_naming_every_use(lifecycle, control, store, repository):
    with pytest.raises(Refused) as refused:
        lifecycle.retire("digits_heavy:2")
    assert refused.value.problem == Problem.IN_USE
    assert [u.kind for u in refused.value.uses] == [
        UseKind.LISTED,
        UseKind.CASCADE_ESCALATION,
        UseKind.FALLBACK_CHAIN,
    ]
    message = str(refused.value)
    assert message.startswith("digits_heavy:2 is still used by: policy models; cascade escalation; fallback chain")
    with pytest.raises(Refused) as lane:
        lifecycle.retire("digits_heavy_critical:2")
    assert "critical lane of digits_heavy:2" in str(lane.value)
    _run_experiments(store, repository, {**SPLIT, "layer": "a"}, SHADOW)
    with pytest.raises(Refused) as experiment:
        lifecycle.retire("digits_heavy:1")
    assert [u.where for u in experiment.value.uses] == ["heavy_versions", "shadow_v1"]
    assert "experiment heavy_versions arm v1" in str(experiment.value)
    assert "experiment shadow_v1 shadow candidate" in str(experiment.value)
    assert control.calls == []


def test_retire_unloads_an_unused_version(lifecycle, control):
    step = lifecycle.retire("digits_heavy:1")
    assert control.calls == [("load", "digits_heavy", (2,))]
    assert (step.before, step.after) == ("digits_heavy versions 1, 2", "digits_heavy versions 2")
    with pytest.raises(Refused) as again:
        lifecycle.retire("digits_heavy:1")
    assert again.value.problem == Problem.NOT_LOADED and "digits_heavy versions 2" in str(again.value)


def test_retire_follows_the_promotion(lifecycle, control):
    lifecycle.promote("digits_heavy:3")
    lifecycle.retire("digits_heavy:2")  # no longer routed to: free to go
    assert control.ready["digits_heavy"] == {1, 3}
    with pytest.raises(Refused) as refused:
        lifecycle.retire("digits_heavy_critical:3")
    assert "critical lane of digits_heavy:3" in str(refused.value)


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("preprocess:1", Problem.LAST_VERSION),
        ("digits_heavy:9", Problem.UNKNOWN_VERSION),
        ("digits_heavy:3", Problem.NOT_LOADED),
        ("digits_huge:1", Problem.UNKNOWN_MODEL),
        ("digits_heavy", Problem.MALFORMED),
    ],
)
def test_a_refused_retire_changes_nothing(lifecycle, control, target: str, problem: Problem):
    with pytest.raises(Refused) as refused:
        lifecycle.retire(target)
    assert refused.value.problem == problem and control.calls == []


def test_a_router_the_server_refuses_puts_the_loaded_versions_back(lifecycle, control, store):
    control.fail = ROUTER_MODEL
    with pytest.raises(Failed) as failed:
        lifecycle.promote("digits_heavy:3")
    assert f"the server did not reload {ROUTER_MODEL}: failed to load" in str(failed.value)
    assert "put digits_heavy_critical, digits_heavy back as it was" in str(failed.value)
    assert control.ready["digits_heavy"] == {1, 2} and control.ready["digits_heavy_critical"] == {2}
    assert store.get("promotions") is None and control.router_promotions() == Promotions()


def test_a_promotion_put_back_serves_the_versions_served_before_not_those_triton_reports(lifecycle, control, store):
    """Triton 2.51 reports the version policy of digits_heavy's last full load (1, 2) after version 1 was retired:
    the put-back serves what was served, version 2, not the retired version too."""
    lifecycle.retire("digits_heavy:1")
    reported = control.config("digits_heavy")["version_policy"]["specific"]["versions"]
    assert control.ready["digits_heavy"] == {2} and [int(v) for v in reported] == [1, 2]
    control.fail = ROUTER_MODEL
    with pytest.raises(Failed, match="put digits_heavy_critical, digits_heavy back as it was"):
        lifecycle.promote("digits_heavy:3")
    assert control.ready["digits_heavy"] == {2}, "the put-back brought the retired version back"
    assert control.ready["digits_heavy_critical"] == {2}


def test_a_lane_the_server_refuses_stops_before_the_router(lifecycle, control, store):
    control.fail = "digits_heavy_critical"
    with pytest.raises(Failed) as failed:
        lifecycle.promote("digits_heavy:3")
    assert "did not load digits_heavy_critical versions [2, 3]" in str(failed.value)
    assert control.ready["digits_heavy"] == {1, 2}
    assert all(model != ROUTER_MODEL for _, model, _ in control.calls)
    assert store.get("promotions") is None


def test_load_and_unload_whole_models_and_versions(lifecycle, control):
    lifecycle.retire("digits_heavy:1")
    step = lifecycle.load("digits_heavy:1")
    assert control.ready["digits_heavy"] == {1, 2}
    assert (step.before, step.after) == ("digits_heavy versions 2", "digits_heavy versions 1, 2")
    with pytest.raises(Refused) as again:
        lifecycle.load("digits_heavy:1")
    assert again.value.problem == Problem.ALREADY
    lifecycle.unload("digits_static_light")  # the ensemble with a step on preprocess
    step = lifecycle.unload("preprocess")
    assert step.after == "preprocess not loaded" and control.calls[-1] == ("unload", "preprocess", ())
    lifecycle.load("preprocess")
    assert control.calls[-1] == ("load", "preprocess", (1,))
    with pytest.raises(Refused) as loaded:
        lifecycle.load("preprocess")
    assert loaded.value.problem == Problem.ALREADY


def test_load_of_an_unloaded_model_version_starts_from_its_config_file(lifecycle, control):
    lifecycle.unload("digits_static_light")
    lifecycle.load("digits_static_light:1")
    assert control.ready["digits_static_light"] == {1}
    assert control.configs["digits_static_light"]["name"] == "digits_static_light"


@pytest.mark.parametrize(
    ("model", "problem", "named"),
    [
        ("digits_heavy", Problem.IN_USE, "digits_heavy:2 by policy models; cascade escalation"),
        (ROUTER_MODEL, Problem.ROUTER, "is the router"),
        ("digits", Problem.ROUTER, "digits is an ensemble of the router (what clients call)"),
        ("digits_huge", Problem.UNKNOWN_MODEL, "no model 'digits_huge'"),
        ("digits heavy", Problem.MALFORMED, "expected a model name"),
    ],
)
def test_a_refused_unload_names_why_and_changes_nothing(lifecycle, control, model: str, problem: Problem, named: str):
    with pytest.raises(Refused) as refused:
        lifecycle.unload(model)
    assert refused.value.problem == problem and named in str(refused.value)
    assert control.calls == []


def test_unloading_a_model_a_served_ensemble_needs_is_refused_naming_the_ensemble(lifecycle, control, repository):
    """Triton unloads an ensemble with a model it needs: unloading preprocess would take digits_static_light down
    with it, unannounced."""
    with pytest.raises(Refused) as refused:
        lifecycle.unload("preprocess")
    assert refused.value.problem == Problem.IN_USE
    assert str(refused.value) == (
        "preprocess is still used: preprocess by a step of ensemble digits_static_light; unload the ensemble first"
    )
    assert [(u.kind, u.where) for u in refused.value.uses] == [(UseKind.ENSEMBLE_STEP, "digits_static_light")]
    # a step on the latest version (-1) follows the versions that stay: one version can go
    assert lifecycle._ensemble_steps("preprocess", 1) == []
    pinned = repository / "digits_pinned"
    pinned.mkdir()
    config = (repository / "digits_static_light" / "config.pbtxt").read_text()
    config = config.replace('name: "digits_static_light"', 'name: "digits_pinned"')
    (pinned / "config.pbtxt").write_text(config.replace("model_version: -1", "model_version: 1"))
    control.ready["digits_pinned"] = {1}
    with pytest.raises(Refused, match=r"^preprocess:1 is still used by: a step of ensemble digits_pinned; "):
        lifecycle.retire("preprocess:1")
    assert control.calls == []


def test_a_config_triton_could_not_read_is_no_ensemble_and_stops_no_action(lifecycle, control, repository):
    """An operator's broken or odd config.pbtxt in the repository: left out, as Triton leaves it out, never a
    traceback of unload."""
    for name, text in [
        ("broken", 'name: "broken" platform: "ensemble" ensemble_scheduling { step [ { model_name: '),
        ("binary", "\udcff"),
        (
            "no_version",
            'name: "no_version" platform: "ensemble" ensemble_scheduling { step [ { model_name: "feedback" } ] }',
        ),
    ]:
        (repository / name).mkdir()
        (repository / name / "config.pbtxt").write_text(text, errors="surrogateescape")
    (repository / "a_file").write_text("not a model folder")
    steps = ensemble_steps(repository)
    assert "broken" not in steps and "binary" not in steps and "a_file" not in steps
    assert steps["no_version"] == [("feedback", -1)]  # no version: the latest
    control.ready["no_version"] = {1}
    with pytest.raises(Refused, match="feedback by a step of ensemble no_version"):
        lifecycle.unload("feedback")
    assert lifecycle.unload("digits_static_light").after == "digits_static_light not loaded"  # the others are read
    on_disk = {v.model for v in disk_provenance(repository, MemoryStore(), "not asked").versions}  # `tierserve models`
    assert "digits_light" in on_disk and not on_disk & {"broken", "binary", "a_file"}


def test_an_action_fills_the_step_it_is_given_even_when_refused(lifecycle):
    step = Step()
    with pytest.raises(Refused):
        lifecycle.retire("digits_heavy:2", step)
    assert step.before == "digits_heavy versions 1, 2" and step.after == ""


def test_models_shows_each_version_with_its_manifest_and_routing(lifecycle, control, repository):
    lifecycle.promote("digits_heavy:3")
    found = server_provenance(lifecycle, "the test server")
    by_name = {v.name: v for v in found.versions}
    assert found.source == "the test server (repository index)"
    assert found.promotions == lifecycle.promotions()
    heavy = by_name["digits_heavy:3"]
    assert heavy.state == "READY" and heavy.manifest is not None and heavy.manifest.version == 3
    assert "cascade escalation" in heavy.routing()
    assert by_name["digits_heavy:2"].routing() == "not routed"  # promoted away from, still loaded
    assert by_name["digits_heavy:1"].routing() == "experiment_models (no experiment runs it)"
    lane = by_name["digits_heavy_critical:3"]
    assert lane.serves == "digits_heavy:3" and lane.manifest == heavy.manifest
    assert lane.routing() == "critical lane of digits_heavy:3"
    assert by_name[f"{ROUTER_MODEL}:1"].routing() == "the router itself"
    # what `model unload` would take down with it: the served ensembles with a step on the version
    assert by_name["preprocess:1"].routing() == "a step of ensemble digits_static_light"  # on its latest
    assert by_name["digits_light:2"].routing().endswith("; a step of ensemble digits_static_light")  # pinned
    assert by_name["digits_heavy:1"].routing() == "experiment_models (no experiment runs it)"
    assert by_name[f"{ROUTER_MODEL}:1"].manifest is None and "not a trained model" in by_name[f"{ROUTER_MODEL}:1"].note
    text = provenance_text(found)
    assert "digits_heavy:3  READY" in text and f"sha256 {heavy.manifest.artifact_sha256}" in text
    assert "promotions: digits_heavy:3 (was 2)" in text
    data = json.loads(found.as_json())
    (entry,) = [v for v in data["versions"] if (v["model"], v["version"]) == ("digits_heavy", 3)]
    assert entry["manifest"]["artifact_sha256"] == heavy.manifest.artifact_sha256
    assert {"kind": "cascade_escalation", "where": "", "detail": "", "text": "cascade escalation"} in entry["routing"]


def test_models_falls_back_to_the_repository_on_disk_and_says_so(repository, store):
    found = disk_provenance(repository, store, "server not asked: refused")
    assert "the repository on disk" in found.source and "server not asked: refused" in found.source
    heavy = sorted(v.version for v in found.versions if v.model == "digits_heavy")
    assert heavy == [1, 2]  # what its config.pbtxt loads (version_policy specific), not every folder
    assert {v.state for v in found.versions} == {ON_DISK}
    never_built = provenance(
        "x", [("digits_heavy", 7, ON_DISK)], repository, router_policy(repository), ExperimentsFile(), Promotions()
    )
    assert never_built.versions[0].manifest is None and "not built" in never_built.versions[0].note


def _restarted(control: FakeControl, repository: Path, store: MemoryStore) -> tuple[FakeControl, Lifecycle]:
    """The server of `control` restarted: its config files loaded again (every version they list), its router with
    the promotions it had."""
    restarted = FakeControl(repository)
    restarted.configs[ROUTER_MODEL] = control.configs[ROUTER_MODEL]
    return restarted, Lifecycle(restarted, store, repository)  # type: ignore[arg-type]


def test_restore_loads_what_the_promotions_need_after_a_restart(lifecycle, control, repository, store):
    lifecycle.promote("digits_heavy:3")
    assert lifecycle.restore() == []  # nothing missing on the server that was promoted on
    restarted, after_restart = _restarted(control, repository, store)  # no version 3, no lane 3
    assert after_restart.restore() == ["digits_heavy:3", "digits_heavy_critical:3"]
    assert restarted.ready["digits_heavy"] == {1, 2, 3} and restarted.ready["digits_heavy_critical"] == {2, 3}
    assert after_restart.restore() == []


def test_a_restart_unloads_again_what_was_retired_or_unloaded(lifecycle, control, repository, store):
    lifecycle.retire("digits_heavy:1")
    lifecycle.unload("digits_static_light")
    found = server_provenance(lifecycle, "the test server")  # `tierserve models` shows the record
    assert provenance_text(found).startswith(
        "source: the test server (repository index); promotions: none; "
        "retired or unloaded: digits_static_light, digits_heavy:1\n"
    )
    assert json.loads(found.as_json())["operator_unloads"] == {
        "models": ["digits_static_light"],
        "versions": {"digits_heavy": [1]},
    }
    restarted, after_restart = _restarted(control, repository, store)
    assert restarted.ready["digits_heavy"] == {1, 2} and restarted.ready["digits_static_light"] == {1}
    reapplied = after_restart.reapply_unloads()
    assert (reapplied.unloaded, reapplied.kept) == (["digits_static_light", "digits_heavy:1"], [])
    assert restarted.ready["digits_heavy"] == {2} and restarted.ready["digits_static_light"] == set()
    restarted.calls.clear()
    assert after_restart.reapply_unloads().unloaded == [] and restarted.calls == []  # nothing loaded it since


def test_a_load_takes_what_it_serves_off_the_record_of_unloads(lifecycle, control, repository, store):
    lifecycle.retire("digits_heavy:1")
    lifecycle.load("digits_heavy:1")
    lifecycle.unload("digits_static_light")
    lifecycle.load("digits_static_light")
    lifecycle.promote("digits_heavy:3")
    lifecycle.retire("digits_heavy:2")
    lifecycle.rollback("digits_heavy")  # loads digits_heavy:2 again
    assert stored_unloads(store) == OperatorUnloads()
    restarted, after_restart = _restarted(control, repository, store)
    assert after_restart.reapply_unloads() == Reapplied() and restarted.calls == []


def test_what_the_routing_uses_after_the_restart_stays_loaded_and_is_named(lifecycle, control, repository, store):
    lifecycle.retire("digits_heavy:1")
    lifecycle.unload("digits_static_light")
    # meanwhile another replica sharing the store promoted digits_heavy:1
    store_promotions(store, Promotions(models={"digits_heavy": Promotion(version=1, history=(2,))}))
    restarted = FakeControl(repository)  # its router reads the promotions from the store
    after_restart = Lifecycle(restarted, store, repository)  # type: ignore[arg-type]
    assert after_restart.restore() == ["digits_heavy_critical:1"]
    reapplied = after_restart.reapply_unloads()
    assert reapplied.unloaded == ["digits_static_light"]
    ((target, refused),) = reapplied.kept
    assert target == "digits_heavy:1" and refused.problem == Problem.IN_USE
    assert str(refused).startswith("digits_heavy:1 is still used by: policy models")
    assert restarted.ready["digits_heavy"] == {1, 2}


def test_the_record_of_unloads_is_typed_and_a_malformed_one_is_named(store):
    unloads = OperatorUnloads().retired(ModelVersion("digits_heavy", 2)).retired(ModelVersion("digits_heavy", 1))
    assert unloads.versions == {"digits_heavy": (1, 2)}
    unloads = unloads.unloaded("preprocess").unloaded("digits_heavy")
    assert unloads == OperatorUnloads(models=("digits_heavy", "preprocess"))
    assert unloads.retired(ModelVersion("digits_light", 3)).serving("digits_light", {1, 3}).versions == {}
    assert unloads.serving("preprocess", set()) == unloads  # a load that serves nothing loaded nothing
    store_unloads(store, unloads)
    assert stored_unloads(store) == unloads
    for bad, named in [
        (b'{"models": ["../etc"]}', "models.0"),
        (b'{"versions": {"digits_heavy": [0]}}', "versions.digits_heavy.0"),
        (b'{"retired": []}', "retired"),
        (b"[", "record"),
    ]:
        store.set(UNLOADS_KEY, bad)
        with pytest.raises(UnloadsError, match=f"state store key 'operator_unloads': {re.escape(named)}"):
            stored_unloads(store)


def test_an_unload_the_record_cannot_take_is_a_failure_that_says_what_was_done(lifecycle, control, store):
    store.set(UNLOADS_KEY, b'{"models": 3}')
    with pytest.raises(Failed, match=r"^unloaded digits_heavy:1, but did not update the record of unloads: state"):
        lifecycle.retire("digits_heavy:1")
    assert control.ready["digits_heavy"] == {2}
    with pytest.raises(UnloadsError):
        lifecycle.reapply_unloads()


class DownStore(MemoryStore):
    """A state store that takes the operator lease and then no other write."""

    def set(self, key: str, value: bytes, **options) -> bool:
        if key == LEASE_KEY:
            return super().set(key, value, **options)
        raise StateStoreError("the state store did not answer")


def test_a_change_the_store_does_not_record_is_a_failure_that_says_what_was_done(control, repository):
    lifecycle = Lifecycle(control, DownStore(), repository)  # type: ignore[arg-type]
    with pytest.raises(Failed, match=r"^unloaded digits_static_light, but .*: the state store did not answer$"):
        lifecycle.unload("digits_static_light")
    assert control.ready["digits_static_light"] == set()
    with pytest.raises(Failed, match=r"^the router routes to digits_heavy:3 now, but the state store did not record"):
        lifecycle.promote("digits_heavy:3")
    assert control.router_promotions().models["digits_heavy"].version == 3


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """The model repository as shipped, linked: its policy lists digits_heavy_trt:1 (built on GPU hosts only) under
    optional_models, and this repository has no such model."""
    repository = tmp_path / "shipped"
    repository.mkdir()
    for model in DEFAULT_REPOSITORY.iterdir():
        if model.is_dir():
            (repository / model.name).symlink_to(model)
    return repository


def _shipped_control(shipped: Path) -> FakeControl:
    control = FakeControl(shipped)
    control.ready.update({"digits_heavy": {1, 2, 3}, "digits_heavy_critical": {3}})  # what its config files load
    return control


def test_an_optional_model_the_repository_lacks_is_absent_for_restore_and_promote(shipped, store):
    assert absent_models(shipped, router_policy(shipped)) == ("digits_heavy_trt:1",)
    control = _shipped_control(shipped)
    lifecycle = Lifecycle(control, store, shipped)  # type: ignore[arg-type]
    assert lifecycle.restore() == []  # neither loaded nor read: the repository has no config for it
    lifecycle.promote("digits_heavy:2")
    restarted = _shipped_control(shipped)
    restarted.configs[ROUTER_MODEL] = control.configs[ROUTER_MODEL]
    assert Lifecycle(restarted, store, shipped).restore() == ["digits_heavy_critical:2"]  # type: ignore[arg-type]
    assert all(model != "digits_heavy_trt" for _, model, _ in restarted.calls)
    with pytest.raises(Refused) as refused:
        lifecycle.retire("digits_heavy_trt:1")
    assert refused.value.problem == Problem.UNKNOWN_MODEL and "optional_models" in str(refused.value)


def test_models_shows_an_optional_model_the_repository_lacks_as_absent_with_its_uses(shipped, store):
    lifecycle = Lifecycle(_shipped_control(shipped), store, shipped)  # type: ignore[arg-type]
    for found in (server_provenance(lifecycle, "the test server"), disk_provenance(shipped, store, "not asked")):
        (trt,) = [v for v in found.versions if v.model == "digits_heavy_trt"]
        assert (trt.version, trt.state, trt.optional, trt.manifest) == (1, ABSENT, True, None)
        assert [u.kind for u in trt.uses] == [UseKind.LISTED, UseKind.CASCADE_ESCALATION, UseKind.FALLBACK_CHAIN]
        assert "digits_heavy_trt:1  not in this repository  (optional: built on GPU hosts)" in provenance_text(found)
    gone = provenance("x", [("gone", 1, "READY")], shipped, router_policy(shipped), ExperimentsFile(), Promotions())
    (unknown,) = [v for v in gone.versions if v.model == "gone"]  # the server lists it; the repository lacks it
    assert unknown.manifest is None and "has no config.pbtxt" in unknown.note


def test_an_action_while_another_change_is_under_way_is_refused_and_changes_nothing(lifecycle, control, store):
    with one_change_at_a_time(store, "experiment apply experiments.yaml"):
        for action, target in [("promote", "digits_heavy:3"), ("retire", "digits_heavy:1"), ("unload", "preprocess")]:
            with pytest.raises(Refused) as refused:
                getattr(lifecycle, action)(target)
            assert refused.value.problem == Problem.BUSY
            assert "another change is under way: experiment apply experiments.yaml by " in str(refused.value)
    assert control.calls == [] and store.get("promotions") is None
    lifecycle.retire("digits_heavy:1")  # once it ended


def test_a_change_made_of_actions_holds_the_lease_across_them(lifecycle, control, store):
    with lifecycle.exclusive("canary digits_heavy:3"):
        lifecycle.load("digits_heavy:3")  # within the canary's own change
        lifecycle.promote("digits_heavy:3")
        with pytest.raises(Refused, match="another change is under way: canary digits_heavy:3 by "):
            Lifecycle(control, store, lifecycle.repository).retire("digits_heavy:1")  # type: ignore[arg-type]
    assert control.ready["digits_heavy"] == {1, 2, 3} and store.get(LEASE_KEY) is None


def test_experiments_that_send_rows_to_a_version_not_served_are_refused_naming_it(lifecycle, control, repository):
    spec = parse_experiments(
        {
            "experiments": [
                {**SPLIT, "layer": "a"},
                SHADOW,
            ]
        },
        router_policy(repository),
    )
    check_served(control, spec)  # digits_heavy:1 is served
    lifecycle.retire("digits_heavy:1")
    with pytest.raises(Refused) as refused:
        check_served(control, spec)
    assert refused.value.problem == Problem.NOT_LOADED
    assert str(refused.value).startswith(
        "experiment heavy_versions arm v1 sends rows to digits_heavy:1, which the server does not serve"
    )
    with pytest.raises(Refused, match="experiment shadow_v1 shadow candidate sends rows to digits_heavy:1"):
        check_served(control, spec.model_copy(update={"experiments": spec.experiments[1:]}))


def _held_lease(store: MemoryStore, change: str) -> tuple[threading.Event, threading.Thread]:
    """Another operator's `change` holding the lease until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with one_change_at_a_time(store, change):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    return release, holder


def test_a_start_waits_for_the_lease_to_unload_again_and_says_so_when_it_never_came(
    lifecycle, control, repository, store
):
    lifecycle.retire("digits_heavy:1")
    restarted, after_restart = _restarted(control, repository, store)
    release, other = _held_lease(store, "unload again what was unloaded, after a start")  # another replica's start
    busy = after_restart.reapply_unloads(wait_s=0.3)  # held all that time
    assert busy.unloaded == [] and busy.kept == [] and busy.busy is not None and busy.busy.problem == Problem.BUSY
    under_way = busy.busy.under_way
    assert under_way is not None and under_way.change == "unload again what was unloaded, after a start"
    assert restarted.ready["digits_heavy"] == {1, 2}
    threading.Timer(0.3, release.set).start()
    assert after_restart.reapply_unloads(wait_s=5).unloaded == ["digits_heavy:1"]  # its turn came
    other.join()
    assert restarted.ready["digits_heavy"] == {2}


@dataclass
class _StartDuringACanary:
    """A restarted server (`restarted`) whose OperatorChanges (`changes`, saying `said`) started while a canary held
    the operator lease; `release` ends the canary, `canary` is its thread."""

    restarted: FakeControl
    changes: OperatorChanges
    said: list[str]
    release: threading.Event
    canary: threading.Thread


@contextlib.contextmanager
def _start_during_a_canary(control: FakeControl, repository: Path, store: MemoryStore) -> Iterator[_StartDuringACanary]:
    restarted, after_restart = _restarted(control, repository, store)
    release, canary = _held_lease(store, "canary digits_heavy:2")

    @contextlib.contextmanager
    def lifecycle_of(server: object) -> Iterator[Lifecycle]:
        yield after_restart

    said: list[str] = []
    changes = OperatorChanges(say=said.append, lifecycle_of=lifecycle_of)  # type: ignore[arg-type]
    try:
        changes.after_start(object())  # type: ignore[arg-type]
        assert changes.waiting()
        yield _StartDuringACanary(restarted, changes, said, release, canary)
    finally:
        release.set()
        changes.close()


def test_a_start_during_another_change_unloads_again_once_that_change_ends(lifecycle, control, repository, store):
    """A restart while a canary holds the lease: the start neither waits for it nor gives up; a thread asks again
    until the canary ends, then unloads what was retired."""
    lifecycle.promote("digits_heavy:3")
    lifecycle.retire("digits_heavy:1")
    with _start_during_a_canary(control, repository, store) as start:
        assert start.restarted.ready["digits_heavy"] == {1, 2, 3}  # promotions restored at once; the retirement waits
        assert start.said[-1].startswith(
            "will unload again what was retired or unloaded before once another change ends: canary digits_heavy:2 by "
        ), start.said
        assert start.said[-1].endswith(" holds the operator lease"), start.said
        start.release.set()
        start.canary.join()
        deadline = time.monotonic() + 10
        while start.changes.waiting():
            assert time.monotonic() < deadline, start.said
            time.sleep(0.05)
        assert start.restarted.ready["digits_heavy"] == {2, 3}
        assert start.said[-1] == "unloaded digits_heavy:1 again, as retired or unloaded before"


def test_closing_ends_the_wait_for_the_lease_and_a_later_start_restores_nothing(lifecycle, control, repository, store):
    lifecycle.retire("digits_heavy:1")
    with _start_during_a_canary(control, repository, store) as start:
        start.changes.close()
        assert not start.changes.waiting()
        start.release.set()
        start.canary.join()
        start.changes.after_start(object())  # type: ignore[arg-type]
        assert start.restarted.ready["digits_heavy"] == {1, 2} and len(start.said) == 1
