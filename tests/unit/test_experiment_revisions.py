"""Experiments across servers that share one state store: an apply gets a revision above every earlier one, a router
serves the highest revision it has seen (a stale applied parameter never rolls the others back), and a router takes
a newer stored revision whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.test_experiments import SPLIT
from tierserve.experiment_spec import ExperimentSpecError, experiments_json, parse_experiments
from tierserve.experimenter import (
    EXPERIMENTS_KEY,
    Experimenter,
    ExperimentsFollower,
    next_revision,
    served_experiments,
    stored_experiments,
)
from tierserve.policy import Policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.signature import RequestContext
from tierserve.state_store import MemoryStore
from tierserve.tools.paths import DEFAULT_REPOSITORY

POLICY = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
SHADOW = {
    "name": "shadow_v1",
    "kind": "shadow",
    "layer": "shadow",
    "shadow": {"candidate": "digits_heavy:1", "fraction": 0.25},
}


def _spec(*experiments: dict, revision: int = 0):
    return parse_experiments({"experiments": list(experiments), "revision": revision}, POLICY)


@pytest.fixture
def no_file(tmp_path: Path) -> Path:
    return tmp_path / "experiments.yaml"


def test_an_apply_gets_a_revision_above_the_one_it_replaces_and_above_the_clock():
    assert next_revision(_spec(SPLIT), clock=lambda: 10.0).revision == 10_000_000
    assert next_revision(_spec(SPLIT, revision=20_000_000), clock=lambda: 10.0).revision == 20_000_001


def test_an_applied_revision_newer_than_the_store_is_served_and_stored(no_file: Path):
    store = MemoryStore()
    store.set(EXPERIMENTS_KEY, experiments_json(_spec(SHADOW, revision=5)).encode())
    spec, source = served_experiments(store, POLICY, no_file, experiments_json(_spec(SPLIT, revision=6)))
    assert (source, [e.name for e in spec.experiments]) == ("applied", ["heavy_versions"])
    assert stored_experiments(store, POLICY) == spec


def test_a_stale_applied_parameter_does_not_roll_back_what_another_server_applied_since(no_file: Path):
    """A router reloaded with the configuration it ran (a healed stub) still carries the parameter of an older
    apply: the store's newer revision wins, and stays."""
    store = MemoryStore()
    newer = _spec(SHADOW, revision=9)
    store.set(EXPERIMENTS_KEY, experiments_json(newer).encode())
    spec, source = served_experiments(store, POLICY, no_file, experiments_json(_spec(SPLIT, revision=6)))
    assert spec == newer and source.startswith("state store")
    assert stored_experiments(store, POLICY) == newer


def test_a_changed_file_is_taken_with_a_revision_above_the_store_so_every_server_follows(tmp_path: Path):
    file = tmp_path / "experiments.yaml"
    file.write_text(yaml.safe_dump({"experiments": [SPLIT]}))
    store = MemoryStore()
    store.set(EXPERIMENTS_KEY, experiments_json(_spec(SHADOW, revision=9)).encode())
    spec, source = served_experiments(store, POLICY, file, None)
    assert source == "experiments.yaml" and spec.revision == 10 and spec.experiments[0].name == "heavy_versions"
    assert served_experiments(store, POLICY, file, None) == (spec, "state store")  # the next start: unchanged


def test_a_router_takes_a_newer_stored_revision_whole_and_ignores_older_ones():
    store = MemoryStore()
    serving = _spec(SPLIT, revision=5)
    follower = ExperimentsFollower(store, POLICY, serving)
    assert follower.newer() is None  # nothing stored
    store.set(EXPERIMENTS_KEY, experiments_json(_spec(SHADOW, revision=4)).encode())
    assert follower.newer() is None  # older than what is served
    newer = _spec(SPLIT, SHADOW, revision=7)
    store.set(EXPERIMENTS_KEY, experiments_json(newer).encode())
    assert follower.newer() == newer
    assert follower.newer() is None  # taken once


def test_stored_experiments_this_server_cannot_serve_are_said_once_and_the_served_ones_stay():
    store = MemoryStore()
    follower = ExperimentsFollower(store, POLICY, _spec(SPLIT, revision=1))
    unknown = {**SPLIT, "arms": [SPLIT["arms"][0], {"name": "v9", "weight": 50, "models": {"digits_heavy:3": "x:9"}}]}
    store.set(EXPERIMENTS_KEY, json.dumps({"revision": 2, "experiments": [unknown]}).encode())
    with pytest.raises(ExperimentSpecError):
        follower.newer()
    assert follower.newer() is None and follower.revision == 1


def test_an_experimenter_serves_a_new_revision_from_the_next_plan():
    store = MemoryStore()
    experimenter = Experimenter(_spec(revision=1), POLICY, store)
    contexts = [RequestContext("standard", user_id=f"u{i}") for i in range(20)]
    assert {plan.arms for plan in experimenter.plan(contexts, adapt=False)} == {""}
    experimenter.serve(_spec(SPLIT, revision=2))
    arms = {plan.arms for plan in experimenter.plan(contexts, adapt=False)}
    assert arms == {"heavy_versions=control", "heavy_versions=v1"}
