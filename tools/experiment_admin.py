"""`tierserve experiment apply|list|stop`: change the experiments of a running server.

Applying loads the router again with its running config (so the promotions it serves stay) plus a parameter
`experiments` (the validated file as JSON), through Triton's model repository API, so it needs the admin key.
Triton keeps the loaded router serving until the new one is ready, and keeps it when the new one fails to load (a
malformed file: the message names the key).
The routers write what they serve to the state store, which `list` and `stop` read and which outlives a restart.
"""

from __future__ import annotations

from pathlib import Path

from tierserve.experiment_spec import ExperimentsFile, experiments_json, load_experiments
from tierserve.experimenter import EXPERIMENTS_PARAMETER, next_revision, stored_experiments
from tierserve.policy import Policy
from tierserve.promotions import ModelVersion, stored_promotions
from tierserve.repository_api import READY
from tierserve.router_files import ROUTER_MODEL, router_policy
from tierserve.state_store import StateStore
from tierserve.tools.lifecycle import Problem, Refused
from tierserve.tools.model_control import ModelControl


class ExperimentNotRunning(KeyError):
    """`stop` named an experiment that is not running; the message lists those that are."""


def served_policy(store: StateStore, repository: Path) -> Policy:
    """The policy the routers serve: the repository's, with the promotions last applied (`tierserve promote`)."""
    return router_policy(repository, stored_promotions(store))


def read_spec(path: Path, repository: Path, store: StateStore) -> ExperimentsFile:
    """The experiments file, validated against the policy the routers serve; ExperimentSpecError names the bad key."""
    return load_experiments(path, served_policy(store, repository))


def apply(control: ModelControl, spec: ExperimentsFile) -> None:
    """Reload the router with `spec` under a new revision; on failure (InferenceServerException) the running
    experiments keep serving. The reloaded router writes it to the state store, from which the routers of every
    server sharing that store take it within experimenter.FOLLOW_S."""
    config = control.config(ROUTER_MODEL)
    parameters = dict(config.get("parameters", {}))
    parameters[EXPERIMENTS_PARAMETER] = {"string_value": experiments_json(next_revision(spec))}
    config["parameters"] = parameters
    control.load_with(ROUTER_MODEL, config)


def check_served(control: ModelControl, spec: ExperimentsFile) -> None:
    """Refused (NOT_LOADED), having changed nothing, when an arm or a shadow of `spec` sends rows to a version the
    server does not serve (retired, or never loaded): the router would pass over it to the fallback for every row."""
    ready = {(v.model, v.version) for v in control.index() if v.state == READY}
    for experiment in spec.experiments:
        sent_to = [(f"arm {arm.name}", model) for arm in experiment.arms for model in arm.models.values()]
        if experiment.shadow is not None:
            sent_to.append(("shadow candidate", experiment.shadow.candidate))
        for where, name in sent_to:
            version = ModelVersion.parse(name)
            if (version.model, str(version.version)) not in ready:
                raise Refused(
                    Problem.NOT_LOADED,
                    f"experiment {experiment.name} {where} sends rows to {name}, which the server does not serve "
                    f"(retired, or never loaded); `tierserve model load {name}` first",
                )


def serve_experiments(http_url: str, admin_key: str, spec: ExperimentsFile) -> None:
    """`apply` on the server at `http_url`, over a connection of its own; AdminKeyRefused or
    InferenceServerException when the server does not take it."""
    control = ModelControl(http_url, admin_key)
    try:
        apply(control, spec)
    finally:
        control.close()


def served(store: StateStore, repository: Path) -> ExperimentsFile:
    """What the routers serve, as they last wrote it to the state store (nothing before a server first ran)."""
    return stored_experiments(store, served_policy(store, repository)) or ExperimentsFile()


def without(spec: ExperimentsFile, name: str) -> ExperimentsFile:
    """`spec` less the experiment `name`; ExperimentNotRunning when it has none of that name."""
    if name not in {e.name for e in spec.experiments}:
        running = ", ".join(e.name for e in spec.experiments) or "none"
        raise ExperimentNotRunning(f"no experiment {name!r} is running (running: {running})")
    return spec.model_copy(update={"experiments": tuple(e for e in spec.experiments if e.name != name)})


def describe(spec: ExperimentsFile) -> str:
    """One line per experiment: name, kind, layer and range, unit, who is eligible, arms and weights."""
    if not spec.experiments:
        return "no experiments"
    lines = []
    for e in spec.experiments:
        if e.kind == "shadow":
            arms = f"mirrors {e.shadow.fraction:.0%} to {e.shadow.candidate}"
        else:
            arms = ", ".join(f"{a.name} {a.weight:g}%" if e.kind != "bandit" else a.name for a in e.arms)
        lo, hi = e.layer_range
        lines.append(
            f"{e.name}: {e.kind} in layer {e.layer} [{lo:g}, {hi:g})% by {e.unit}; "
            f"tiers {', '.join(e.eligible.tiers)}; {arms}"
        )
    return "\n".join(lines)
