"""The router's files: its policy beside its versions, its built statistics and learned router in a version; the
policy as served is the file's with the promotions applied (tierserve.promotions)."""

from __future__ import annotations

from pathlib import Path

from tierserve.learned_router import LearnedRouter
from tierserve.manifest import Manifest, version_dir
from tierserve.policy import Policy
from tierserve.promotions import Promotions, promoted_policy
from tierserve.routing import Router
from tierserve.signature import TrainingStats

ROUTER_MODEL = "router"  # the router's Python model, the one step of `digits` (its folder: policy, experiments)
POLICY_FILE = "policy.yaml"
STATS_FILE = "stats.json"
LEARNED_ROUTER_FILE = "learned_router.json"


def router_policy(repository: Path, promotions: Promotions | None = None) -> Policy:
    """The policy the router of `repository` serves with `promotions` applied (PolicyError names a bad key)."""
    return _policy(repository / ROUTER_MODEL, promotions)


def _policy(router_dir: Path, promotions: Promotions | None) -> Policy:
    return promoted_policy(Policy.load(router_dir / POLICY_FILE), promotions or Promotions())


def load_router(router_dir: Path, version: str, promotions: Promotions | None = None) -> tuple[Router, TrainingStats]:
    """The Router of a built router model folder, with `promotions` applied to its policy, and the training
    statistics its signatures need.

    Which models take missing pixels comes from their manifests, in the same model repository."""
    policy = _policy(router_dir, promotions)
    accepts_missing = {
        model: Manifest.read(version_dir(router_dir.parent, model)).accepts_missing
        for model in (*policy.models, *policy.experiment_models)
    }
    learned = LearnedRouter.load(router_dir / version / LEARNED_ROUTER_FILE)
    return Router(policy, accepts_missing, learned), TrainingStats.load(router_dir / version / STATS_FILE)
