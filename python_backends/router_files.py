"""The router's files: its policy beside its versions, its built statistics and learned router in a version."""

from __future__ import annotations

from pathlib import Path

from tierserve.learned_router import LearnedRouter
from tierserve.manifest import Manifest, version_dir
from tierserve.policy import Policy
from tierserve.routing import Router
from tierserve.signature import TrainingStats

ROUTER_MODEL = "router"  # the Triton model that runs the router (its folder holds the policy and experiments)
POLICY_FILE = "policy.yaml"
STATS_FILE = "stats.json"
LEARNED_ROUTER_FILE = "learned_router.json"


def load_router(router_dir: Path, version: str) -> tuple[Router, TrainingStats]:
    """The Router of a built router model folder, and the training statistics its signatures need.

    Which models take missing pixels comes from their manifests, in the same model repository."""
    policy = Policy.load(router_dir / POLICY_FILE)
    accepts_missing = {
        model: Manifest.read(version_dir(router_dir.parent, model)).accepts_missing
        for model in (*policy.models, *policy.experiment_models)
    }
    learned = LearnedRouter.load(router_dir / version / LEARNED_ROUTER_FILE)
    return Router(policy, accepts_missing, learned), TrainingStats.load(router_dir / version / STATS_FILE)
