"""Promotions: which version of each routed model the policy routes to, as `tierserve promote` and `rollback` left
it, and where a model version is used (what `tierserve retire` refuses to unload, what `tierserve models` shows).

policy.yaml names one version of each model (`digits_heavy:2`). A promotion replaces that version everywhere the
policy names it (models, rules, cascade, fallback, fallback chains) and moves its lanes to the same version: a lane
serves its model's artifacts of its own version (the lane's `serves` parameter names the model), so promoted
`digits_heavy:3` is served to critical rows by `digits_heavy_critical:3`. The router applies promotions when it
loads, like experiments: from its config parameter `promotions` (set by the tools when they reload it), else
from the state store (what was last applied: it outlives a restart), else none. Pure Python, no Triton.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tierserve.experiment_spec import ExperimentsFile
from tierserve.policy import Policy
from tierserve.state_store import StateStore

PROMOTIONS_PARAMETER = "promotions"  # the router config parameter the tools reload it with (JSON)
PROMOTIONS_KEY = "promotions"  # in the state store: the promotions last applied (JSON)
MAX_HISTORY = 20  # earlier versions kept per model for rollback
MODEL_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # a Triton model folder's name (never '.' or '..')
_MODEL_VERSION = re.compile(rf"^({MODEL_NAME}):([1-9][0-9]{{0,8}})$")


class PromotionError(ValueError):
    """A model version or promotions document is malformed, or a rollback has nowhere to go; the message says which."""


class ModelVersion(NamedTuple):
    """A 'model:version' name, parsed."""

    model: str
    version: int

    def __str__(self) -> str:
        return f"{self.model}:{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelVersion:
        """'digits_heavy:3' -> ModelVersion('digits_heavy', 3); PromotionError naming the text otherwise."""
        match = _MODEL_VERSION.match(text)
        if not match:
            raise PromotionError(f"expected MODEL:VERSION such as digits_heavy:3 (a version from 1), got {text!r}")
        return cls(match.group(1), int(match.group(2)))


def model_of(name: str) -> str:
    """The model of a 'model:version' name."""
    return name.rsplit(":", 1)[0]


class Promotion(BaseModel):
    """One model's promotion: the version routed to, and the versions routed to before it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1, strict=True, description="the version the policy routes to")
    history: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (), max_length=MAX_HISTORY, description="versions routed to before, oldest first; rollback returns to the last"
    )


class Promotions(BaseModel):
    """Every model's promotion; a model without one is routed to the version policy.yaml names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, Promotion] = Field(default_factory=dict, description="model name -> its promotion")

    def promoted(self, target: ModelVersion, serving: int) -> Promotions:
        """These promotions with `target` routed to; `serving` (the version routed to now) becomes the one a
        rollback returns to."""
        if target.version == serving:
            raise PromotionError(f"{target} is already the version routed to")
        earlier = self.models.get(target.model, Promotion(version=serving)).history
        history = (*earlier, serving)[-MAX_HISTORY:]
        return self._with(target.model, Promotion(version=target.version, history=history))

    def rolled_back(self, model: str) -> Promotions:
        """These promotions with `model` routed to the version it had before its last promotion."""
        promotion = self.models.get(model)
        if promotion is None or not promotion.history:
            raise PromotionError(f"{model} has no earlier version to roll back to (it was not promoted since)")
        *earlier, previous = promotion.history
        return self._with(model, Promotion(version=previous, history=tuple(earlier)))

    def _with(self, model: str, promotion: Promotion) -> Promotions:
        return Promotions(models={**self.models, model: promotion})

    def to_json(self) -> str:
        """Canonical JSON (keys sorted), for the config parameter and the state store."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Promotions:
        """Parse promotions JSON; PromotionError naming `source` and the bad key when it is malformed."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            raise PromotionError(f"{source}: {first_problem(error, 'promotions')}") from None


def first_problem(error: ValidationError, whole: str) -> str:
    """A stored document's first validation problem as 'dotted.key: message' (`whole` where it is the whole)."""
    first = error.errors(include_url=False)[0]
    return f"{'.'.join(str(part) for part in first['loc']) or whole}: {first['msg']}"


def served_promotions(store: StateStore, model_config: Mapping[str, Any]) -> Promotions:
    """The promotions the router serves: its config parameter `promotions` (as the tools reloaded it), else what the
    state store holds (applied earlier: it outlives a restart), else none. PromotionError names a malformed one."""
    applied = model_config.get("parameters", {}).get(PROMOTIONS_PARAMETER, {}).get("string_value")
    if applied is not None:
        return Promotions.from_json(applied, f"router config parameter {PROMOTIONS_PARAMETER!r}")
    return stored_promotions(store)


def stored_promotions(store: StateStore) -> Promotions:
    """The promotions last applied, as the tools wrote them to the state store (none before the first)."""
    stored = store.get(PROMOTIONS_KEY)
    return Promotions() if stored is None else Promotions.from_json(stored, f"state store key {PROMOTIONS_KEY!r}")


def store_promotions(store: StateStore, promotions: Promotions) -> None:
    """Record `promotions` as applied (once the router took them), for restarts and the CLI."""
    store.set(PROMOTIONS_KEY, promotions.to_json().encode())


def routed_versions(policy: Policy, model: str) -> list[str]:
    """The 'model:version' names of `model` under the policy's `models` (one, unless it routes to several)."""
    return [name for name in policy.models if model_of(name) == model]


def promoted_policy(policy: Policy, promotions: Promotions) -> Policy:
    """`policy` routed to the promoted versions: each promoted model's version replaced wherever the policy names
    it (`in_process` and `optional_models` included: the promoted version is served and skipped as its predecessor
    was), its lanes moved to the same version, and the version dropped from `experiment_models` (it is routed now).
    A promotion of a model the policy does not route to exactly one version of is ignored (the file changed since)."""
    versions: dict[str, int] = {}  # the policy's name of a promoted model -> its promoted version
    for model, promotion in promotions.models.items():
        routed = routed_versions(policy, model)
        if len(routed) == 1 and routed[0] != f"{model}:{promotion.version}":
            versions[routed[0]] = promotion.version
    if not versions:
        return policy

    def rename(name: str) -> str:
        return f"{model_of(name)}:{versions[name]}" if name in versions else name

    def lane(model: str, current: str) -> str:
        return f"{model_of(current)}:{versions[model]}" if model in versions else current

    cascade, promoted = policy.cascade, {rename(name) for name in versions}
    return dataclasses.replace(
        policy,
        models=tuple(rename(m) for m in policy.models),
        rules=tuple(dataclasses.replace(rule, route=rename(rule.route)) for rule in policy.rules),
        cascade=dataclasses.replace(cascade, first=rename(cascade.first), escalate_to=rename(cascade.escalate_to)),
        fallback=rename(policy.fallback),
        fallbacks={rename(route): tuple(rename(m) for m in chain) for route, chain in policy.fallbacks.items()},
        lanes={
            tier: {rename(model): lane(model, name) for model, name in by_model.items()}
            for tier, by_model in policy.lanes.items()
        },
        experiment_models=tuple(m for m in policy.experiment_models if m not in promoted),
        in_process=tuple(rename(m) for m in policy.in_process),
        optional_models=tuple(rename(m) for m in policy.optional_models),
    )


def describe(promotions: Promotions) -> str:
    """One clause per promoted model, e.g. 'digits_heavy:3 (was 2)'; 'none' without promotions."""
    parts = [
        f"{model}:{p.version}" + (f" (was {p.history[-1]})" if p.history else "")
        for model, p in sorted(promotions.models.items())
    ]
    return ", ".join(parts) or "none"


class UseKind(str, Enum):
    """How the routing uses a model version."""

    LISTED = "listed"  # under the policy's models
    RULE = "rule"  # a rule's route
    CASCADE_FIRST = "cascade_first"
    CASCADE_ESCALATION = "cascade_escalation"
    FALLBACK = "fallback"  # the policy's safe default
    FALLBACK_CHAIN = "fallback_chain"  # in another route's fallback chain
    LANE = "lane"  # a tier's reserved lane of a model
    EXPERIMENT_ARM = "experiment_arm"  # replaced, or the replacement, in a running experiment's arm
    SHADOW = "shadow"  # a running shadow experiment's candidate
    ENSEMBLE_STEP = "ensemble_step"  # a step of a served ensemble (Triton unloads an ensemble with a model it needs)


@dataclass(frozen=True)
class Use:
    """One place the routing uses a model version: what kind of use, and where (a rule, a route, a tier, an
    experiment)."""

    kind: UseKind
    where: str = ""
    detail: str = ""

    def __str__(self) -> str:
        texts = {
            UseKind.LISTED: "policy models",
            UseKind.RULE: f"route of rule {self.where}",
            UseKind.CASCADE_FIRST: "cascade first",
            UseKind.CASCADE_ESCALATION: "cascade escalation",
            UseKind.FALLBACK: "policy fallback",
            UseKind.FALLBACK_CHAIN: f"fallback chain of {self.where}",
            UseKind.LANE: f"{self.where} lane of {self.detail}",
            UseKind.EXPERIMENT_ARM: f"experiment {self.where} arm {self.detail}",
            UseKind.SHADOW: f"experiment {self.where} shadow candidate",
            UseKind.ENSEMBLE_STEP: f"a step of ensemble {self.where}",
        }
        return texts[self.kind]

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "where": self.where, "detail": self.detail, "text": str(self)}


def version_uses(policy: Policy, experiments: ExperimentsFile, name: str) -> list[Use]:
    """Every place `policy` (as served, promotions applied) and the running `experiments` use the model version
    `name`; [] when nothing routes to it."""
    uses = []
    if name in policy.models:
        uses.append(Use(UseKind.LISTED))
    uses += [Use(UseKind.RULE, rule.name) for rule in policy.rules if rule.route == name]
    if policy.cascade.first == name:
        uses.append(Use(UseKind.CASCADE_FIRST))
    if policy.cascade.escalate_to == name:
        uses.append(Use(UseKind.CASCADE_ESCALATION))
    if policy.fallback == name:
        uses.append(Use(UseKind.FALLBACK))
    uses += [Use(UseKind.FALLBACK_CHAIN, route) for route, chain in policy.fallbacks.items() if name in chain]
    uses += [
        Use(UseKind.LANE, tier, model)
        for tier, by_model in policy.lanes.items()
        for model, lane in by_model.items()
        if lane == name
    ]
    for experiment in experiments.experiments:
        if experiment.shadow is not None and experiment.shadow.candidate == name:
            uses.append(Use(UseKind.SHADOW, experiment.name))
        uses += [
            Use(UseKind.EXPERIMENT_ARM, experiment.name, f"{arm.name} ({model} -> {replacement})")
            for arm in experiment.arms
            for model, replacement in arm.models.items()
            if name in (model, replacement)
        ]
    return uses
