"""The experiments file (`experiments.yaml`, beside policy.yaml): A/B splits, canaries, shadow traffic and bandits.

Typed pydantic models, validated when the router loads the file. Checks that need the policy (which models
may be named, which attributes and tiers exist) run when a policy is passed in the validation context, as
`parse_experiments` and `load_experiments` do; every mistake raises ExperimentSpecError naming the dotted key
(`experiments[1].arms[0].weight: ...`). Stopping an experiment is removing it from the file. Which rows land in
which arm is decided by tierserve.assignment.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tierserve.operator_files import OperatorFileError, load_yaml
from tierserve.policy import ESCALATE_WHEN, Policy
from tierserve.signature import TIERS

EXPERIMENTS_FILE = "experiments.yaml"
KINDS = ("split", "canary", "bandit", "shadow")
MIRRORED = "mirrored"  # the arm of a shadow experiment's mirrored rows; no declared arm may take the name
_INT_TEST = re.compile(r"^\s*(<=|>=|<|>|==|!=)\s*(-?[0-9]+)\s*$")

Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
Percent = Annotated[float, Field(ge=0, le=100, strict=True)]
Probability = Annotated[float, Field(ge=0, le=1, strict=True)]
Tier = Literal[TIERS]


class ExperimentSpecError(ValueError):
    """The experiments file is invalid; the message starts with the dotted key of the mistake."""


def _invalid(key: str, message: str) -> PydanticCustomError:
    """A validation error about `key`, relative to what is being validated (e.g. "arms[1].name"; "": itself)."""
    return PydanticCustomError("experiment_spec", "{key}: {message}", {"key": key, "message": message})


def _policy(info: ValidationInfo) -> Policy | None:
    return (info.context or {}).get("policy")


def int_test(text: str) -> tuple[str, int] | None:
    """The comparison and bound of an int attribute's test such as ">= 30", or None when it is not one."""
    match = _INT_TEST.match(text)
    return (match.group(1), int(match.group(2))) if match else None


class _Settings(BaseModel):
    """A part of the experiments file: unknown keys are refused, and nothing changes once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Eligibility(_Settings):
    """Who may enter an experiment: every test must hold. Critical rows never enter unless listed."""

    tiers: tuple[Tier, ...] = Field(("standard", "best_effort"), min_length=1, description="tiers that may enter")
    attributes: dict[str, Any] = Field(
        default_factory=dict,
        description="per request attribute declared in policy.yaml: a list of allowed values, or for a whole-number "
        "attribute a comparison such as '>= 30'; a row that did not send a tested attribute does not enter",
    )

    @field_validator("attributes")
    @classmethod
    def _tests(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, tuple[str, ...] | str]:
        policy = _policy(info)
        tests: dict[str, tuple[str, ...] | str] = {}
        for name, test in value.items():
            if isinstance(test, list) and test and all(isinstance(v, str) for v in test):
                test = tuple(test)
            elif not isinstance(test, str):
                raise _invalid(name, f"expected a list of values or a comparison such as '>= 30', got {test!r}")
            tests[name] = test
            if policy is None:
                continue
            attribute = policy.attributes.get(name)
            if attribute is None:
                declared = ", ".join(policy.attributes) or "none"
                raise _invalid(name, f"not declared under attributes in policy.yaml (declared: {declared})")
            if attribute.values is None:
                if isinstance(test, tuple) or int_test(test) is None:
                    raise _invalid(name, f"a whole-number attribute takes a comparison such as '>= 30', got {test!r}")
            elif not isinstance(test, tuple):
                raise _invalid(name, f"expected a list of values among {', '.join(attribute.values)}, got {test!r}")
            elif bad := [v for v in test if v not in attribute.values]:
                raise _invalid(name, f"{bad[0]!r} is not a declared value (declared: {', '.join(attribute.values)})")
        return tests


class CascadeOverride(_Settings):
    """Partial overrides of the policy's cascade for an arm's rows; what is not set stays as in policy.yaml."""

    thresholds: dict[Tier, Probability] = Field(
        default_factory=dict, description="per tier: escalate when the first model's confidence is below this"
    )
    escalate_when: Literal[ESCALATE_WHEN] | None = Field(None, description="threshold | learned | either | both")

    @field_validator("escalate_when")
    @classmethod
    def _learned_router_configured(cls, value: str | None, info: ValidationInfo) -> str | None:
        policy = _policy(info)
        if value not in (None, "threshold") and policy is not None and policy.cascade.learned_escalate_above is None:
            raise _invalid("", f"{value!r} needs the learned router, and policy.yaml's cascade has no learned_router")
        return value


class Arm(_Settings):
    """One variant of an experiment. An arm that changes nothing is a control: its rows get the policy as is."""

    name: Name = Field(description="unique within the experiment; never 'mirrored'")
    weight: Percent | None = Field(
        None, description="percent of the experiment's units (split and canary: required, summing to 100; bandit: none)"
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="policy model -> the model:version to call instead (from policy.yaml's models or "
        "experiment_models; no other model may be named)",
    )
    cascade: CascadeOverride | None = Field(None, description="overrides of the policy's cascade")

    @property
    def is_control(self) -> bool:
        """Whether the arm changes nothing."""
        cascade = self.cascade
        return not self.models and (cascade is None or (not cascade.thresholds and cascade.escalate_when is None))

    @field_validator("models")
    @classmethod
    def _allowed_models(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        policy = _policy(info)
        if policy is None:
            return value
        allowed = (*policy.models, *policy.experiment_models)
        for model, replacement in value.items():
            if model not in policy.models:
                raise _invalid(model, f"not listed under models in policy.yaml ({', '.join(policy.models)})")
            if replacement not in allowed:
                raise _invalid(
                    model,
                    f"{replacement!r} is not listed under models or experiment_models in policy.yaml "
                    f"({', '.join(allowed)})",
                )
            if replacement == model:
                raise _invalid(model, "replaced by itself; drop the entry")
        return value


class ShadowSettings(_Settings):
    """Mirroring: a fraction of the eligible rows is also sent to a candidate, whose answer is logged, not returned."""

    candidate: str = Field(description="model:version from policy.yaml's models or experiment_models")
    fraction: Probability = Field(description="share of eligible rows mirrored, drawn per row from its seed")

    @field_validator("candidate")
    @classmethod
    def _allowed_candidate(cls, value: str, info: ValidationInfo) -> str:
        policy = _policy(info)
        if policy is not None and value not in (models := (*policy.models, *policy.experiment_models)):
            allowed = ", ".join(models)
            raise _invalid("", f"{value!r} is not listed under models or experiment_models in policy.yaml ({allowed})")
        return value


class BanditSettings(_Settings):
    """How a bandit picks an arm per row from the arms' Beta posteriors of a correct answer."""

    strategy: Literal["thompson", "epsilon_greedy"] = Field(
        description="thompson: the arm with the highest posterior draw; epsilon_greedy: a uniform arm with "
        "probability epsilon, else the arm with the highest posterior mean"
    )
    epsilon: Probability | None = Field(None, description="exploration probability; epsilon_greedy only")

    @model_validator(mode="after")
    def _epsilon_for_epsilon_greedy(self) -> BanditSettings:
        if self.strategy == "epsilon_greedy" and self.epsilon is None:
            raise _invalid("epsilon", "required for strategy epsilon_greedy")
        if self.strategy != "epsilon_greedy" and self.epsilon is not None:
            raise _invalid("epsilon", f"only for strategy epsilon_greedy, not {self.strategy}")
        return self


class ExperimentSpec(_Settings):
    """One experiment: who is eligible, which share of a layer it takes, and its arms (or its shadow)."""

    name: Name = Field(description="unique in the file; logged with every row it assigns")
    kind: Literal[KINDS] = Field(description="split | canary | bandit | shadow")
    layer: Name = Field("default", description="experiments in one layer are mutually exclusive")
    layer_range: tuple[Percent, Percent] = Field(
        (0.0, 100.0), description="[lo, hi): percent of the layer's units this experiment takes; disjoint in a layer"
    )
    unit: Literal["user", "request"] = Field(
        description="what is assigned: a user (sticky; rows without user_id never enter) or a request (by the row "
        "seed); default user, bandit request"
    )
    salt: str = Field(min_length=1, description="hashing salt of the arm buckets; default the name")
    eligible: Eligibility = Field(default_factory=Eligibility, description="who may enter")
    arms: tuple[Arm, ...] = Field(
        (),
        description="split, canary, bandit: 2 or more. Laid out cumulatively over the buckets in this order, so "
        "growing the first arm at the expense of the last only moves units into the first arm (a canary's "
        "treatment comes first for that reason); any other reweighting reshuffles units",
    )
    shadow: ShadowSettings | None = Field(None, description="shadow experiments only (which have no arms)")
    bandit: BanditSettings | None = Field(None, description="bandit experiments only")

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_kind(cls, data: Any) -> Any:
        # defaults that depend on other keys are filled in, so the canonical JSON states them
        if isinstance(data, dict):
            data = dict(data)
            data.setdefault("unit", "request" if data.get("kind") == "bandit" else "user")
            if isinstance(data.get("name"), str):
                data.setdefault("salt", data["name"])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        lo, hi = self.layer_range
        if lo >= hi:
            raise _invalid("layer_range", f"expected [lo, hi) with lo < hi, got [{lo:g}, {hi:g}]")
        for key, kind in (("shadow", "shadow"), ("bandit", "bandit")):
            if (getattr(self, key) is None) == (self.kind == kind):
                raise _invalid(key, f"required for kind {kind}" if self.kind == kind else f"only for kind {kind}")
        if self.kind == "shadow":
            if self.arms:
                raise _invalid("arms", "a shadow experiment has no arms (its rows are labelled 'mirrored')")
            return self
        self._check_arms()
        return self

    def _check_arms(self) -> None:
        if len(self.arms) < 2:
            raise _invalid("arms", f"expected at least 2 arms, got {len(self.arms)}")
        if self.kind == "canary" and len(self.arms) != 2:
            raise _invalid("arms", f"a canary has exactly 2 arms, the treatment then the control; got {len(self.arms)}")
        names: set[str] = set()
        for index, arm in enumerate(self.arms):
            if arm.name == MIRRORED or arm.name in names:
                why = "is reserved for shadow rows" if arm.name == MIRRORED else "is used twice"
                raise _invalid(f"arms[{index}].name", f"{arm.name!r} {why}")
            names.add(arm.name)
            if arm.weight is None and self.kind != "bandit":
                raise _invalid(f"arms[{index}].weight", f"required for a {self.kind}")
            if arm.weight is not None and self.kind == "bandit":
                raise _invalid(f"arms[{index}].weight", "not for a bandit, which picks arms by their posteriors")
        if self.kind == "bandit":
            return
        total = sum(arm.weight or 0.0 for arm in self.arms)
        if abs(total - 100.0) > 1e-9:
            raise _invalid("arms", f"weights sum to {total:g}, expected 100")
        controls = [arm.name for arm in self.arms if arm.is_control]
        if self.kind == "split" and len(controls) != 1:
            raise _invalid("arms", f"a split needs exactly one control arm (no models, no cascade), got {controls}")
        if self.kind == "canary":
            if self.arms[0].is_control:
                raise _invalid("arms[0]", "a canary's first arm is the treatment and must change something")
            if not self.arms[1].is_control:
                raise _invalid("arms[1]", "a canary's second arm is the control and must change nothing")


class ExperimentsFile(_Settings):
    """Every running experiment, in file order (later experiments win where two change the same setting)."""

    experiments: tuple[ExperimentSpec, ...] = Field((), description="the experiments; [] when none runs")
    revision: int = Field(
        0,
        ge=0,
        description="set by `tierserve experiment apply` (microseconds since the epoch, above the revision it "
        "replaces): the routers of every server sharing the state store serve the highest revision they have seen; "
        "a file leaves it out",
    )

    @field_validator("experiments", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return () if value is None else value  # `experiments:` left with every example commented out

    @model_validator(mode="after")
    def _unique_and_disjoint(self) -> ExperimentsFile:
        seen: dict[str, int] = {}
        by_layer: dict[str, list[int]] = {}
        for index, spec in enumerate(self.experiments):
            if spec.name in seen:
                raise _invalid(f"experiments[{index}].name", f"{spec.name!r} is used twice")
            seen[spec.name] = index
            for other in (self.experiments[i] for i in by_layer.get(spec.layer, [])):
                if other.unit != spec.unit:
                    raise _invalid(
                        f"experiments[{index}].unit",
                        f"{spec.unit!r} differs from {other.name!r} ({other.unit}) in layer {spec.layer!r}; "
                        "experiments in one layer share one unit, or they would not be exclusive",
                    )
                (lo, hi), (other_lo, other_hi) = spec.layer_range, other.layer_range
                if lo < other_hi and other_lo < hi:
                    raise _invalid(
                        f"experiments[{index}].layer_range",
                        f"[{lo:g}, {hi:g}) overlaps {other.name!r} [{other_lo:g}, {other_hi:g}) in layer "
                        f"{spec.layer!r}; ranges in one layer must be disjoint",
                    )
            by_layer.setdefault(spec.layer, []).append(index)
        return self


def _dotted(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker of a bad dict key; the key itself is the part before it
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _join(path: str, key: str) -> str:
    if not path or not key:
        return path or key
    return path + key if key.startswith("[") else f"{path}.{key}"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings model that the field path `loc` leads to (for listing a model's keys)."""
    model: type[BaseModel] = ExperimentsFile
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        nested = [t for t in _types_in(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _types_in(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [annotation] if not args else [t for arg in args for t in _types_in(arg)]


def _error_message(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    loc, kind = tuple(first["loc"]), first["type"]
    if kind == "experiment_spec":
        return f"{_join(_dotted(loc), first['ctx']['key'])}: {first['ctx']['message']}"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        expected = f"; expected one of {', '.join(model.model_fields)}" if model else ""
        return f"{_dotted(loc)}: unknown key{expected}"
    if kind == "missing" and isinstance(loc[-1], str):
        return f"{_dotted(loc)}: required key is missing"
    message = first["msg"].replace("valid tuple", "list")
    message = message[0].lower() + message[1:] + f", got {first['input']!r}"[:200]
    return f"{_dotted(loc) or 'experiments file'}: {message}"


def parse_experiments(data: Any, policy: Policy) -> ExperimentsFile:
    """Validate an experiments document (as parsed from YAML or JSON; None is an empty file) against the policy."""
    try:
        return ExperimentsFile.model_validate({} if data is None else data, context={"policy": policy})
    except ValidationError as error:
        raise ExperimentSpecError(_error_message(error)) from None


def load_experiments(path: Path, policy: Policy) -> ExperimentsFile:
    """Read and validate an experiments file; every error message starts with the path."""
    try:
        data = load_yaml(path)
    except OperatorFileError as error:
        raise ExperimentSpecError(f"{path}: cannot read the experiments: {error}") from None
    try:
        return parse_experiments(data, policy)
    except ExperimentSpecError as error:
        raise ExperimentSpecError(f"{path}: {error}") from None


def experiments_json(spec: ExperimentsFile) -> str:
    """Canonical JSON of the experiments (every default stated, keys sorted), e.g. for a model config parameter;
    parse_experiments(json.loads(...), policy) gives the same experiments back."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
