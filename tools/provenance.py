"""`tierserve models`: every model version a server serves, with its manifest (artifact hash, training recipe, seed,
split, test accuracy, library versions) and where the routing uses it (policy, lanes, running experiments).

The versions come from the server's repository index (admin key); when the server cannot be asked, from the model
repository on disk (what its config.pbtxt files would load), and the answer says so. A lane has no manifest of its
own: it shows the manifest of the model version it serves (its `serves` parameter). An optional model of the policy
that this repository does not have (the TensorRT variant, built on GPU hosts) is shown as absent, with its uses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve.experiment_spec import ExperimentsFile
from tierserve.manifest import MANIFEST_FILE, Manifest, ManifestError
from tierserve.operator_unloads import OperatorUnloads, stored_unloads
from tierserve.policy import Policy
from tierserve.promotions import ModelVersion, Promotions, Use, UseKind, describe, stored_promotions, version_uses
from tierserve.repository_api import READY
from tierserve.router_files import CONFIG_FILE, ROUTER_MODEL, absent_models, router_policy
from tierserve.state_store import StateStore
from tierserve.tools.lifecycle import (
    Lifecycle,
    ensemble_steps,
    repository_config,
    repository_configs,
    repository_versions,
    running_experiments,
)

ON_DISK = "on disk"  # the state of a version read from the repository instead of the server
ABSENT = "not in this repository"  # the state of an optional model of the policy that the repository does not have


@dataclass(frozen=True)
class ServedVersion:
    """One model version: its state on the server, its manifest (or why there is none) and its uses."""

    model: str
    version: int
    state: str  # READY, UNAVAILABLE, ... as the server says; "on disk" when read from the repository
    serves: str  # for a lane, the model:version whose artifacts it serves; "" otherwise
    manifest: Manifest | None
    note: str  # why there is no manifest
    uses: tuple[Use, ...]
    experiment_model: bool  # listed under the policy's experiment_models: experiments may name it
    optional: bool = False  # listed under the policy's optional_models: a server may not have it

    @property
    def name(self) -> str:
        return f"{self.model}:{self.version}"

    def routing(self) -> str:
        """Where the routing uses it, as people read it."""
        if self.model == ROUTER_MODEL:  # and the one step of digits
            return "the router itself"
        if self.uses:
            return "; ".join(map(str, self.uses))
        return "experiment_models (no experiment runs it)" if self.experiment_model else "not routed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "state": self.state,
            "serves": self.serves,
            "manifest": None if self.manifest is None else dataclasses.asdict(self.manifest),
            "note": self.note,
            "routing": [use.as_dict() for use in self.uses],
            "experiment_model": self.experiment_model,
            "optional": self.optional,
        }


@dataclass(frozen=True)
class Provenance:
    """What `tierserve models` shows: where the list came from, the promotions served, and every version."""

    source: str
    promotions: Promotions
    unloads: OperatorUnloads
    versions: tuple[ServedVersion, ...]

    def as_json(self) -> str:
        return json.dumps(
            {
                "source": self.source,
                "promotions": self.promotions.model_dump(mode="json"),
                "operator_unloads": self.unloads.model_dump(mode="json"),
                "versions": [v.as_dict() for v in self.versions],
            },
            indent=2,
        )


def _manifest(repository: Path, model: str, version: int) -> tuple[Manifest | None, str, str]:
    """(manifest, serves, note) of one version: a lane's is that of the version it serves."""
    if not (repository / model / CONFIG_FILE).is_file():
        return None, "", f"none: {repository / model} has no {CONFIG_FILE}"
    serves_model = repository_config(repository, model).get("parameters", {}).get("serves", {}).get("string_value")
    folder = repository / (serves_model or model) / str(version)
    serves = f"{serves_model}:{version}" if serves_model else ""
    if not (folder / MANIFEST_FILE).exists() and not serves:
        return None, "", f"none in {folder} (not a trained model, or not built: `tierserve build`)"
    try:
        return Manifest.read(folder), serves, ""
    except ManifestError as error:
        return None, serves, str(error)


def provenance(
    source: str,
    states: list[tuple[str, int, str]],
    repository: Path,
    policy: Policy,
    experiments: ExperimentsFile,
    promotions: Promotions,
    unloads: OperatorUnloads | None = None,
) -> Provenance:
    """Every (model, version, state) in `states`, and every optional model of `policy` that `repository` does not
    have (state ABSENT), with its manifest and its uses under `policy` and `experiments`."""
    listed = {(model, version) for model, version, _ in states}
    absent = [ModelVersion.parse(name) for name in absent_models(repository, policy)]
    latest: dict[str, int] = {}  # each served model's highest served version: what a step on the latest (-1) uses
    for model, version, state in states:
        if state in (READY, ON_DISK):
            latest[model] = max(version, latest.get(model, version))
    steps = {ensemble: on for ensemble, on in ensemble_steps(repository).items() if ensemble in latest}
    versions = []
    for model, version, state in sorted([*states, *((m, v, ABSENT) for m, v in absent if (m, v) not in listed)]):
        name = f"{model}:{version}"
        if state == ABSENT:
            manifest, serves, note = None, "", "none: an optional model this repository does not have"
        else:
            manifest, serves, note = _manifest(repository, model, version)
        step_versions = {version, -1} if latest.get(model) == version else {version}
        uses = tuple(version_uses(policy, experiments, name)) + tuple(
            Use(UseKind.ENSEMBLE_STEP, ensemble)
            for ensemble, on in steps.items()
            if any(m == model and v in step_versions for m, v in on)
        )
        versions.append(
            ServedVersion(
                model,
                version,
                state,
                serves,
                manifest,
                note,
                uses,
                name in policy.experiment_models,
                name in policy.optional_models,
            )
        )
    return Provenance(source, promotions, OperatorUnloads() if unloads is None else unloads, tuple(versions))


def server_provenance(lifecycle: Lifecycle, source: str) -> Provenance:
    """Every model version the server's repository index lists, with the routing it serves now."""
    states = [(v.model, int(v.version), v.state) for v in lifecycle.control.index() if v.version]
    promotions = lifecycle.promotions()
    return provenance(
        f"{source} (repository index)",
        states,
        lifecycle.repository,
        lifecycle.policy(promotions),
        lifecycle.experiments(),
        promotions,
        stored_unloads(lifecycle.store),
    )


def disk_provenance(repository: Path, store: StateStore, source: str) -> Provenance:
    """Every model version the repository's config files would load, with the routing last applied (the store)."""
    promotions = stored_promotions(store)
    return provenance(
        f"the repository on disk, {repository} ({source})",
        repository_states(repository),
        repository,
        router_policy(repository, promotions),
        running_experiments(store),
        promotions,
        stored_unloads(store),
    )


def repository_states(repository: Path) -> list[tuple[str, int, str]]:
    """The versions the repository's config.pbtxt files would load (version_policy: specific, latest or all;
    Triton's default is the latest one), each in state "on disk"."""
    states = []
    for name, config in repository_configs(repository):
        policy = config.get("version_policy", {"latest": {"num_versions": 1}})
        on_disk = repository_versions(repository, name)
        if "specific" in policy:
            chosen = [int(v) for v in policy["specific"].get("versions", [])]
        elif "latest" in policy:
            chosen = on_disk[-int(policy["latest"].get("num_versions", 1)) :]
        else:
            chosen = on_disk
        states += [(name, version, ON_DISK) for version in chosen]
    return states


def _recipe(recipe: dict[str, Any]) -> str:
    rest = " ".join(f"{k}={v}" for k, v in recipe.items() if k != "trainer")
    return f"{recipe.get('trainer', '?')} {rest}".strip()


def _split(split: dict[str, Any]) -> str:
    sizes = ", ".join(f"{part} {count}" for part, count in split.get("sizes", {}).items())
    return f"{split.get('dataset', '?')} seed {split.get('seed', '?')}: {sizes}; rows sha256 {split.get('rows_sha256')}"


def provenance_text(found: Provenance) -> str:
    """Every version as a block: name, state and routing, then its manifest's fields, one a line."""
    unloaded = ", ".join(found.unloads.targets()) or "none"
    lines = [f"source: {found.source}; promotions: {describe(found.promotions)}; retired or unloaded: {unloaded}"]
    for v in found.versions:
        lines += ["", f"{v.name}  {v.state}" + (f"  (a lane: serves {v.serves}'s artifacts)" if v.serves else "")]
        if v.state == ABSENT:
            lines[-1] += "  (optional: built on GPU hosts)"
        lines.append(f"  routing    {v.routing()}")
        if (m := v.manifest) is None:
            lines.append(f"  manifest   {v.note}")
            continue
        lines += [
            f"  artifact   {m.artifact}, sha256 {m.artifact_sha256}",
            f"  recipe     {_recipe(m.recipe)}; seed {m.seed}",
            f"  split      {_split(m.split)}",
            f"  accuracy   {m.test_accuracy:.4f} on the test split",
            f"  runtime    {m.runtime}, {m.us_per_sample:g} us per image (batch 64, one thread, when built)",
            f"  libraries  {', '.join(f'{name} {version}' for name, version in m.libraries.items())}",
        ]
    return "\n".join(lines)
