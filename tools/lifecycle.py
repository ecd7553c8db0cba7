"""`tierserve promote`, `rollback`, `retire` and `model load|unload`: live changes of which model versions a running
server serves and which of them the router routes to, through Triton's model repository API (admin key).

Every action checks everything first and changes nothing when it refuses (Refused: a typed Problem, a message
naming it and, for a version still in use, each use). Promote and rollback load what the new routing needs (the
version and its lanes' versions) before they reload the router with the promotions as its config parameter; Triton
keeps the running router serving until the new one is ready, so no request fails. Only then are the promotions
written to the state store, which the router reads after a restart. Retire reloads the model with a version_policy
without the version. When the server does not take a step (Failed), what was loaded for it is put back. Each action
holds the operator lease while it runs (tierserve.operator_lock: one change at a time), and is refused while another
change holds it.

After a restart, tritonserver loads what its config files list. `restore` loads what the promotions need besides,
and `reapply_unloads` unloads again what retire and unload had unloaded (tierserve.operator_unloads: their record
in the state store, which loads take versions off).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from tierserve.experiment_spec import ExperimentsFile, ExperimentSpecError, parse_experiments
from tierserve.experimenter import EXPERIMENTS_KEY
from tierserve.manifest import Manifest, ManifestError
from tierserve.operator_lock import ChangeRefused, ChangeUnderWay, one_change_at_a_time
from tierserve.operator_unloads import OperatorUnloads, UnloadsError, store_unloads, stored_unloads
from tierserve.policy import Policy
from tierserve.promotions import (
    MODEL_NAME,
    PROMOTIONS_PARAMETER,
    ModelVersion,
    PromotionError,
    Promotions,
    Use,
    UseKind,
    model_of,
    routed_versions,
    served_promotions,
    store_promotions,
    version_uses,
)
from tierserve.repository_api import READY
from tierserve.router_files import CONFIG_FILE, POLICY_FILE, ROUTER_MODEL, absent_models, router_policy
from tierserve.state_store import StateStore, StateStoreError
from tierserve.tools.audit import Step
from tierserve.tools.model_control import ModelControl


class Problem(str, Enum):
    """Why an action was refused."""

    MALFORMED = "malformed"  # not MODEL:VERSION, or not a model name
    UNKNOWN_MODEL = "unknown_model"  # no such model in the repository
    UNKNOWN_VERSION = "unknown_version"  # no such version of the model in the repository
    NO_MANIFEST = "no_manifest"  # the version was never built (or its manifest is damaged)
    NOT_ROUTED = "not_routed"  # the policy does not route to the model
    LANE = "lane"  # a lane follows its model; act on the model
    SEVERAL_ROUTED = "several_routed"  # the policy routes to more than one version of the model
    ALREADY = "already"  # already routed to, or already loaded
    NO_HISTORY = "no_history"  # nothing to roll back to
    IN_USE = "in_use"  # the routing or a running experiment still uses it
    LAST_VERSION = "last_version"  # retiring it would leave the model without a version
    NOT_LOADED = "not_loaded"  # the server does not serve it
    ROUTER = "router"  # the router itself
    BUSY = "busy"  # another operator change is under way (tierserve.operator_lock)


class Refused(Exception):
    """An action refused before it changed anything; `problem` says why, `uses` what still uses the version, and
    `under_way` the other change that held the operator lease (BUSY; None when it ended as it was read)."""

    def __init__(
        self, problem: Problem, message: str, uses: tuple[Use, ...] = (), under_way: ChangeUnderWay | None = None
    ) -> None:
        super().__init__(message)
        self.problem = problem
        self.uses = uses
        self.under_way = under_way


class Failed(RuntimeError):
    """The server did not take a step of an action; the message says which, why, and what was put back."""


@dataclass
class Reapplied:
    """What `reapply_unloads` unloaded again, what it kept serving with the refusal that kept it, and, when another
    change held the operator lease all the time it waited (it then did nothing), that refusal."""

    unloaded: list[str] = field(default_factory=list)
    kept: list[tuple[str, Refused]] = field(default_factory=list)
    busy: Refused | None = None


def _one_change_at_a_time(action: Callable[[Lifecycle, str, Step | None], Step]):
    """An action that holds the operator lease while it runs (tierserve.operator_lock): refused (BUSY) while
    another change is under way."""

    @functools.wraps(action)
    def run(self: Lifecycle, target: str, step: Step | None = None) -> Step:
        with self.exclusive(f"{action.__name__} {target}"):
            return action(self, target, step)

    return run


def repository_config(repository: Path, model: str) -> dict:
    """A model's config.pbtxt as the JSON the model repository API takes (and `get_model_config` gives)."""
    text = (repository / model / CONFIG_FILE).read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def repository_versions(repository: Path, model: str) -> list[int]:
    """The versions of `model` the repository has a folder for."""
    folder = repository / model
    found = (int(d.name) for d in folder.iterdir() if d.is_dir() and d.name.isdigit()) if folder.is_dir() else ()
    return sorted(found)


def repository_configs(repository: Path) -> Iterator[tuple[str, dict]]:
    """Each model folder of `repository` with its config.pbtxt, in name order. A folder without a config Triton could
    read (missing, unreadable, not UTF-8, not a model config) is left out, as Triton leaves it out."""
    for folder in sorted(repository.iterdir()):
        try:
            config = repository_config(repository, folder.name)
        except (OSError, ValueError, text_format.ParseError):
            continue
        yield folder.name, config


def ensemble_steps(repository: Path) -> dict[str, list[tuple[str, int]]]:
    """Each ensemble of `repository` (platform "ensemble"): the model and version of each of its steps (-1: the latest
    the server serves)."""
    ensembles = {}
    for name, config in repository_configs(repository):
        if config.get("platform") == "ensemble":
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            ensembles[name] = [(s.get("model_name", ""), int(s.get("model_version", -1))) for s in steps]
    return ensembles


def _versions_text(model: str, versions: set[int] | list[int]) -> str:
    return f"{model} versions {', '.join(map(str, sorted(versions)))}" if versions else f"{model} not loaded"


def _uses_text(uses: list[Use]) -> str:
    return "; ".join(map(str, uses))


def running_experiments(store: StateStore) -> ExperimentsFile:
    """The experiments the routers serve, as they last wrote them to the state store (not checked against a policy:
    read for the versions they name)."""
    stored = store.get(EXPERIMENTS_KEY)
    return ExperimentsFile() if stored is None else ExperimentsFile.model_validate_json(stored)


class Lifecycle:
    """Promote, roll back, retire, load and unload on the server `control` talks to, whose model repository is
    `repository` and whose state store is `store`. Each action fills `step` (before, after, message) as it learns
    them, for the audit trail, and returns it."""

    def __init__(self, control: ModelControl, store: StateStore, repository: Path) -> None:
        self.control = control
        self.store = store
        self.repository = repository
        self._holding: str | None = None  # the change this Lifecycle holds the operator lease for

    @contextlib.contextmanager
    def exclusive(self, change: str, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the operator lease for `change` (tierserve.operator_lock) while the block runs; Refused (BUSY),
        having changed nothing, while another change is under way `wait_s` from now. Within a change this Lifecycle
        holds already (a canary's promotion), it holds on."""
        if self._holding is not None:
            yield
            return
        with contextlib.ExitStack() as lease:
            try:
                lease.enter_context(one_change_at_a_time(self.store, change, wait_s=wait_s))
            except ChangeRefused as refused:
                raise Refused(Problem.BUSY, str(refused), under_way=refused.under_way) from None
            self._holding = change
            try:
                yield
            finally:
                self._holding = None

    # -- what the server serves -----------------------------------------------------------------------------------

    def promotions(self) -> Promotions:
        """The promotions the router serves: its config parameter, else those last applied (the state store)."""
        return served_promotions(self.store, self.control.config(ROUTER_MODEL))

    def policy(self, promotions: Promotions | None = None) -> Policy:
        """The policy the router serves (with `promotions`, default those it serves now)."""
        return router_policy(self.repository, self.promotions() if promotions is None else promotions)

    def experiments(self) -> ExperimentsFile:
        """The experiments the routers serve."""
        return running_experiments(self.store)

    # -- actions --------------------------------------------------------------------------------------------------

    @_one_change_at_a_time
    def promote(self, target: str, step: Step | None = None) -> Step:
        """Route the policy to `target` (MODEL:VERSION) instead of the version it routes to now."""
        step = step or Step()
        promotions, serving, wanted = self.check_promote(target, step)
        after = promotions.promoted(wanted, serving.version)
        loaded = self._switch(promotions, after, serving, wanted)
        step.after = str(wanted)
        step.message = f"the policy routes to {wanted} instead of {serving}{loaded}"
        return step

    def check_promote(self, target: str, step: Step | None = None) -> tuple[Promotions, ModelVersion, ModelVersion]:
        """Promote's checks, changing nothing: (the promotions served now, the version the policy routes to, the
        version `target` names); Refused naming the problem. `step`, when given, learns the version routed to as
        soon as it is known."""
        wanted = self._parse(target)
        promotions = self.promotions()
        serving = self._routed(self.policy(promotions), wanted.model)
        if step is not None:
            step.before = str(serving)
        self._built(wanted)
        if wanted == serving:
            raise Refused(Problem.ALREADY, f"{wanted} is already the version the policy routes to")
        return promotions, serving, wanted

    @_one_change_at_a_time
    def rollback(self, model: str, step: Step | None = None) -> Step:
        """Route the policy back to the version `model` had before its last promotion."""
        step = step or Step()
        if not re.fullmatch(MODEL_NAME, model):
            raise Refused(Problem.MALFORMED, f"rollback takes a model name such as digits_heavy, got {model!r}")
        promotions = self.promotions()
        serving = self._routed(self.policy(promotions), model)
        step.before = str(serving)
        try:
            after = promotions.rolled_back(model)
        except PromotionError as error:
            raise Refused(Problem.NO_HISTORY, str(error)) from None
        previous = ModelVersion(model, after.models[model].version)
        self._built(previous)
        loaded = self._switch(promotions, after, serving, previous)
        step.after = str(previous)
        step.message = f"rolled back: the policy routes to {previous} instead of {serving}{loaded}"
        return step

    @_one_change_at_a_time
    def retire(self, target: str, step: Step | None = None) -> Step:
        """Unload one version of a model, refused while the routing or a running experiment uses it."""
        step = step or Step()
        version = self._parse(target)
        ready = self.control.ready_versions(version.model)
        step.before = _versions_text(version.model, ready)
        if version.version not in ready:
            raise Refused(Problem.NOT_LOADED, f"{version} is not loaded ({step.before}); nothing to retire")
        uses = version_uses(self.policy(), self.experiments(), str(version))
        if uses := uses + self._ensemble_steps(version.model, version.version):
            raise Refused(
                Problem.IN_USE,
                f"{version} is still used by: {_uses_text(uses)}; promote another version, stop the experiment, "
                "change policy.yaml or unload the ensemble first",
                tuple(uses),
            )
        remaining = ready - {version.version}
        if not remaining:
            raise Refused(
                Problem.LAST_VERSION,
                f"{version} is the last version {version.model} serves; `tierserve model unload {version.model}` "
                "unloads the whole model",
            )
        self._load_versions(version.model, remaining)
        self._record(f"unloaded {version}", lambda unloads: unloads.retired(version))
        step.after = _versions_text(version.model, remaining)
        step.message = f"unloaded {version}"
        return step

    @_one_change_at_a_time
    def load(self, target: str, step: Step | None = None) -> Step:
        """Load a model (MODEL, from its config.pbtxt) or one more version of it (MODEL:VERSION)."""
        step = step or Step()
        if ":" not in target:
            model = self._model(target)
            ready = self.control.ready_versions(model)
            step.before = _versions_text(model, ready)
            if ready:
                raise Refused(Problem.ALREADY, f"{model} is loaded already ({step.before})")
            self._call(f"load {model}", lambda: self.control.load(model))
        else:
            version = self._parse(target)
            ready = self.control.ready_versions(version.model)
            step.before = _versions_text(version.model, ready)
            if version.version in ready:
                raise Refused(Problem.ALREADY, f"{version} is loaded already ({step.before})")
            self._load_versions(version.model, ready | {version.version})
            model = version.model
        serving = self._record_serving(model, f"loaded {target}")
        step.after = _versions_text(model, serving)
        step.message = f"loaded {target}"
        return step

    @_one_change_at_a_time
    def unload(self, model: str, step: Step | None = None) -> Step:
        """Unload every version of a model, refused while the routing or a running experiment uses one of them."""
        step = step or Step()
        model = self._model(model)
        steps = repository_config(self.repository, model).get("ensemble_scheduling", {}).get("step", [])
        if model == ROUTER_MODEL or ROUTER_MODEL in {step.get("model_name") for step in steps}:
            what = "the router" if model == ROUTER_MODEL else "an ensemble of the router (what clients call)"
            raise Refused(Problem.ROUTER, f"{model} is {what}: unloading it would stop serving")
        ready = self.control.ready_versions(model)
        step.before = _versions_text(model, ready)
        if not ready:
            raise Refused(Problem.NOT_LOADED, f"{model} is not loaded; nothing to unload")
        policy, experiments = self.policy(), self.experiments()
        uses = {f"{model}:{v}": version_uses(policy, experiments, f"{model}:{v}") for v in sorted(ready)}
        uses[model] = self._ensemble_steps(model)
        if any(uses.values()):
            named = "; ".join(f"{name} by {_uses_text(u)}" for name, u in uses.items() if u)
            how = "to unload one version, `tierserve retire MODEL:VERSION`"
            if uses[model]:
                how = "unload the ensemble first"
            raise Refused(
                Problem.IN_USE, f"{model} is still used: {named}; {how}", tuple(use for u in uses.values() for use in u)
            )
        self._call(f"unload {model}", lambda: self.control.unload(model))
        self._record(f"unloaded {model}", lambda unloads: unloads.unloaded(model))
        step.after = _versions_text(model, self.control.ready_versions(model))
        step.message = f"unloaded {model}"
        return step

    def restore(self) -> list[str]:
        """Load the versions the served routing needs that the server does not serve: after a restart the config
        files load the versions they list, not those promote loaded since (a promoted version's lane, say). An
        optional model this repository does not have is left out, with its lanes. Returns what it loaded; Failed
        when the server does not take a load."""
        policy = self.policy()
        absent = set(absent_models(self.repository, policy))
        lanes = (lane for by_model in policy.lanes.values() for model, lane in by_model.items() if model not in absent)
        needed: dict[str, set[int]] = {}
        for name in (*(model for model in policy.models if model not in absent), *lanes):
            version = ModelVersion.parse(name)
            needed.setdefault(version.model, set()).add(version.version)
        loaded = []
        for model, versions in sorted(needed.items()):
            ready = self.control.ready_versions(model)
            if missing := versions - ready:
                self._load_versions(model, ready | missing)
                loaded += [f"{model}:{version}" for version in sorted(missing)]
        return loaded

    def reapply_unloads(self, wait_s: float = 0.0) -> Reapplied:
        """After a restart, unload again what retire and unload had unloaded (their record) and the config files
        loaded, each with the checks of the action itself: what the served routing or a running experiment uses
        now, or what the repository no longer has, is kept, with the refusal. Holds the operator lease throughout,
        waiting up to `wait_s` for it; `busy` when another change held it all that time (nothing was done: ask
        again once it ends). UnloadsError when the record is malformed; Failed when the server does not take an
        unload."""
        done, targets = Reapplied(), stored_unloads(self.store).targets()
        if not targets:
            return done
        try:
            with self.exclusive("unload again what was unloaded, after a start", wait_s):
                for target in targets:
                    try:
                        (self.retire if ":" in target else self.unload)(target)
                        done.unloaded.append(target)
                    except Refused as refused:
                        if refused.problem != Problem.NOT_LOADED:  # not loaded: nothing to do
                            done.kept.append((target, refused))
        except Refused as busy:  # another change held the lease all that time
            done.busy = busy
        return done

    # -- checks ---------------------------------------------------------------------------------------------------

    def _ensemble_steps(self, model: str, version: int | None = None) -> list[Use]:
        """The ensembles the server serves with a step on `model`, or on exactly `version` of it when given (a step
        on the latest version follows the versions that stay). Triton unloads an ensemble with a model it needs, so
        unloading that model would take the ensemble down too, unannounced."""
        served = {v.model for v in self.control.index() if v.state == READY}
        return [
            Use(UseKind.ENSEMBLE_STEP, ensemble)
            for ensemble, steps in ensemble_steps(self.repository).items()
            if ensemble in served and any(m == model and version in (None, v) for m, v in steps)
        ]

    def _parse(self, target: str) -> ModelVersion:
        try:
            version = ModelVersion.parse(target)
        except PromotionError as error:
            raise Refused(Problem.MALFORMED, str(error)) from None
        self._model(version.model)
        if version.model == ROUTER_MODEL:
            raise Refused(Problem.ROUTER, f"{version.model} is the router; its versions are not routed to")
        if version.version not in (versions := repository_versions(self.repository, version.model)):
            raise Refused(
                Problem.UNKNOWN_VERSION,
                f"{version} does not exist: {self.repository / version.model} has version(s) "
                f"{', '.join(map(str, versions)) or 'none'}",
            )
        return version

    def _model(self, model: str) -> str:
        if not re.fullmatch(MODEL_NAME, model):
            raise Refused(Problem.MALFORMED, f"expected a model name such as digits_heavy, got {model!r}")
        if not (self.repository / model / CONFIG_FILE).is_file():
            known = sorted(d.name for d in self.repository.iterdir() if (d / CONFIG_FILE).is_file())
            # from the file, without the promotions: a refusal asks the server nothing (promotions keep model names)
            optional = any(model_of(name) == model for name in router_policy(self.repository).optional_models)
            raise Refused(
                Problem.UNKNOWN_MODEL,
                f"no model {model!r} in {self.repository} (models: {', '.join(known)})"
                + (": it is one of the policy's optional_models, built on GPU hosts only" if optional else ""),
            )
        return model

    def _routed(self, policy: Policy, model: str) -> ModelVersion:
        """The version of `model` the policy routes to; Refused when it routes to none or several."""
        self._model(model)
        lanes = {model_of(lane): routed for by_model in policy.lanes.values() for routed, lane in by_model.items()}
        if model in lanes:
            raise Refused(
                Problem.LANE,
                f"{model} is a lane of {model_of(lanes[model])}: it follows the version its model is routed to; "
                f"act on {model_of(lanes[model])}",
            )
        routed = routed_versions(policy, model)
        if not routed:
            raise Refused(
                Problem.NOT_ROUTED,
                f"the policy does not route to {model} (models: {', '.join(policy.models)}); "
                f"list it in {ROUTER_MODEL}/{POLICY_FILE} first",
            )
        if len(routed) > 1:
            raise Refused(
                Problem.SEVERAL_ROUTED,
                f"the policy routes to {', '.join(routed)}; promote needs it to route to one version of {model}",
            )
        return ModelVersion.parse(routed[0])

    def _built(self, version: ModelVersion) -> None:
        try:
            Manifest.read(self.repository / version.model / str(version.version))
        except ManifestError as error:
            raise Refused(Problem.NO_MANIFEST, f"{version} has no usable manifest: {error}") from None

    # -- changes --------------------------------------------------------------------------------------------------

    def _switch(self, before: Promotions, after: Promotions, serving: ModelVersion, wanted: ModelVersion) -> str:
        """Load what routing to `wanted` needs, then reload the router with `after`; what was loaded, as text."""
        policy = router_policy(self.repository, after)
        lanes = [
            ModelVersion.parse(by_model[str(wanted)]) for by_model in policy.lanes.values() if str(wanted) in by_model
        ]
        for lane in lanes:
            if lane.version not in repository_versions(self.repository, lane.model):
                raise Refused(
                    Problem.UNKNOWN_VERSION,
                    f"{wanted}'s lane {lane} does not exist: a lane serves its model's version from a folder "
                    f"{self.repository / lane.model / str(lane.version)} with a model.py of its own",
                )
        experiments = self.experiments()
        try:
            parse_experiments(experiments.model_dump(mode="json"), policy)
        except ExperimentSpecError as error:
            uses = [
                use
                for use in version_uses(self.policy(before), experiments, str(serving))
                if use.kind in (UseKind.EXPERIMENT_ARM, UseKind.SHADOW)
            ]
            raise Refused(
                Problem.IN_USE,
                f"a running experiment names {serving}, which the policy would no longer route to: "
                f"{_uses_text(uses) or error}; stop it first (`tierserve experiment stop NAME`)",
                tuple(uses),
            ) from None
        # each model reloaded here, its config before (None: it was not loaded) and the versions it served: Triton
        # 2.51 reports the version policy of a model's last full load, not a later retirement's
        undo: list[tuple[str, dict | None, set[int]]] = []
        try:
            for version in (wanted, *lanes):
                ready = self.control.ready_versions(version.model)
                if version.version not in ready:
                    before = copy.deepcopy(self.control.config(version.model)) if ready else None
                    undo.append((version.model, before, ready))
                    self._load_versions(version.model, ready | {version.version})
            config = self.control.config(ROUTER_MODEL)
            config["parameters"] = {
                **config.get("parameters", {}),
                PROMOTIONS_PARAMETER: {"string_value": after.to_json()},
            }
            self._call(f"reload {ROUTER_MODEL}", lambda: self.control.load_with(ROUTER_MODEL, config))
        except Failed as error:
            raise Failed(f"{error}; {self._undo(undo)}") from None
        try:
            store_promotions(self.store, after)
        except StateStoreError as error:
            raise Failed(
                f"the router routes to {wanted} now, but the state store did not record it ({error}): "
                f"after a restart it would route to {serving} again"
            ) from None
        loaded = [model for model, _, _ in undo]
        for model in loaded:
            self._record_serving(model, f"loaded {model}")
        return f" (loaded {', '.join(loaded)} with version {wanted.version} first)" if loaded else ""

    def _load_versions(self, model: str, versions: set[int]) -> None:
        """Serve exactly `versions` of `model` (from its running config, or config.pbtxt when it is not loaded)."""
        ready = self.control.ready_versions(model)
        config = self.control.config(model) if ready else repository_config(self.repository, model)
        self._call(
            f"load {model} versions {sorted(versions)}", lambda: self.control.load_versions(model, versions, config)
        )
        if (now := self.control.ready_versions(model)) != versions:
            raise Failed(f"{model} serves versions {sorted(now)} after the load, not {sorted(versions)}")

    def _undo(self, undo: list[tuple[str, dict | None, set[int]]]) -> str:
        """Put the models reloaded for a switch back as they were (config and versions); what was put back, as
        text."""
        if not undo:
            return "nothing was changed"
        put_back, failed = [], []
        for model, config, versions in reversed(undo):
            try:
                if config is None:
                    self.control.unload(model)
                else:
                    self.control.load_versions(model, versions, config)
                put_back.append(model)
            except InferenceServerException as error:
                failed.append(f"{model} ({error.message()})")
        text = f"put {', '.join(put_back)} back as it was" if put_back else ""
        return "; ".join(filter(None, [text, f"could not put back {', '.join(failed)}" if failed else ""]))

    def _record(self, done: str, change: Callable[[OperatorUnloads], OperatorUnloads]) -> None:
        """Write `change` into the record of unloads, once the server `done` the change it records."""
        try:
            store_unloads(self.store, change(stored_unloads(self.store)))
        except (UnloadsError, StateStoreError) as error:
            raise Failed(f"{done}, but did not update the record of unloads: {error}") from None

    def _record_serving(self, model: str, done: str) -> set[int]:
        """Take what `model` serves after a load off the record of unloads; the versions it serves."""
        serving = self.control.ready_versions(model)
        self._record(done, lambda unloads: unloads.serving(model, serving))
        return serving

    @staticmethod
    def _call(what: str, call: Callable[[], None]) -> None:
        try:
            call()
        except InferenceServerException as error:
            raise Failed(f"the server did not {what}: {error.message()}") from None
