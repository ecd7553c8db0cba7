"""The router's files: its policy beside its versions, its built statistics and learned router in a version; the
policy as served is the file's with the promotions applied (tierserve.promotions)."""

from __future__ import annotations

from pathlib import Path

from tierserve.learned_router import load_learned_routers
from tierserve.manifest import MANIFEST_FILE, Manifest, version_dir
from tierserve.model_states import ModelStates
from tierserve.policy import Policy
from tierserve.promotions import Promotions, promoted_policy
from tierserve.routing import Router
from tierserve.runners import Runner, load_runner
from tierserve.signature import TrainingStats

ROUTER_MODEL = "router"  # the router's Python model, the one step of `digits` (its folder: policy, experiments)
POLICY_FILE = "policy.yaml"
CONFIG_FILE = "config.pbtxt"  # a Triton model folder's configuration
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
    absent = set(absent_models(router_dir.parent, policy))
    accepts_missing = {
        model: model not in absent and Manifest.read(version_dir(router_dir.parent, model)).accepts_missing
        for model in (*policy.models, *policy.experiment_models)
    }
    learned, alternates = load_learned_routers(router_dir / version / LEARNED_ROUTER_FILE)
    router = Router(
        policy,
        accepts_missing,
        learned,
        alternates=alternates,
        states=ModelStates(policy.in_process, policy.optional_models, policy.callable_models),
    )
    return router, TrainingStats.load(router_dir / version / STATS_FILE)


def absent_models(repository: Path, policy: Policy) -> tuple[str, ...]:
    """The policy's optional models this repository has not built (no config.pbtxt, or no version folder with its
    manifest: the TensorRT variant on a host without a GPU). They are absent, not an error: the router passes over
    them (they take no missing pixels) and the tools neither load nor read them."""
    return tuple(
        model
        for model in policy.optional_models
        if not (repository / model.split(":")[0] / CONFIG_FILE).is_file()
        or not (version_dir(repository, model) / MANIFEST_FILE).is_file()
    )


def in_process_runners(router_dir: Path, policy: Policy) -> dict[str, Runner]:
    """The runners of the models the router serves itself, from their own version folders (the same artifacts
    their Triton models serve)."""
    return {model: load_runner(version_dir(router_dir.parent, model)) for model in policy.in_process}
