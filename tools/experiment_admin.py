"""`tierserve experiment apply|list|stop`: change the experiments of a running server.

Applying loads `router` again with its running config plus a parameter `experiments` (the validated file as JSON),
through Triton's model repository API, so it needs the admin key. Triton keeps the loaded router serving until
the new one is ready, and keeps it when the new one fails to load (a malformed file: the message names the key).
The routers write what they serve to the state store, which `list` and `stop` read and which outlives a restart.
"""

from __future__ import annotations

import json
from pathlib import Path

from tierserve.experiment_spec import ExperimentsFile, experiments_json, load_experiments, parse_experiments
from tierserve.experimenter import EXPERIMENTS_KEY, EXPERIMENTS_PARAMETER
from tierserve.policy import Policy
from tierserve.router_files import POLICY_FILE
from tierserve.state_store import StateStore
from tierserve.tools.model_control import ModelControl

ROUTER = "router"


def read_spec(path: Path, repository: Path) -> ExperimentsFile:
    """The experiments file, validated against the repository's policy; ExperimentSpecError names the bad key."""
    return load_experiments(path, Policy.load(repository / ROUTER / POLICY_FILE))


def apply(control: ModelControl, spec: ExperimentsFile) -> None:
    """Reload the router with `spec`; on failure (InferenceServerException) the running experiments keep serving."""
    config = control.config(ROUTER)
    parameters = dict(config.get("parameters", {}))
    parameters[EXPERIMENTS_PARAMETER] = {"string_value": experiments_json(spec)}
    config["parameters"] = parameters
    control.load_with(ROUTER, config)


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
    stored = store.get(EXPERIMENTS_KEY)
    if stored is None:
        return ExperimentsFile()
    return parse_experiments(json.loads(stored), Policy.load(repository / ROUTER / POLICY_FILE))


def without(spec: ExperimentsFile, name: str) -> ExperimentsFile:
    """`spec` less the experiment `name`; KeyError when it has none of that name."""
    if name not in {e.name for e in spec.experiments}:
        running = ", ".join(e.name for e in spec.experiments) or "none"
        raise KeyError(f"no experiment {name!r} is running (running: {running})")
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
