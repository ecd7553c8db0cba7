"""The routing policy: one declarative file, validated when the router loads it.

Rules are tried in order and the first that matches picks the route. Rows no rule claims go through the
confidence cascade: the first model answers, and the row escalates when its confidence is below the
tier's threshold and/or the learned router predicts the first answer is wrong. `fallback` answers rows
that no listed route can serve (e.g. missing pixels) and ends every fallback chain. The file also holds
the circuit breaker settings, call timeout, self-healing interval, per-tier SLOs, reserved lanes and
load-shedding thresholds, the request attributes experiments may test (`attributes`), the models only
experiments may call (`experiment_models`) and per-user adaptation (`adaptation`). Only models listed
under `models` and `experiment_models` (and their lanes) are ever called.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tierserve.circuit_breaker import BreakerSettings
from tierserve.load_shedding import SheddingSettings
from tierserve.operator_files import OperatorFileError, load_yaml
from tierserve.signature import TIERS, Signature
from tierserve.slo import TierSlo

NUMERIC_CUES = ("height", "width", "missing_fraction", "out_of_range_fraction", "sparsity", "ood_score", "deadline_ms")
TEXT_CUES = ("tier", "user_id")
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
    "!=": operator.ne,
}
ESCALATE_WHEN = ("threshold", "learned", "either", "both")
DEFAULT_TIERS = {"critical": TierSlo(50, 0.999), "standard": TierSlo(100, 0.99), "best_effort": TierSlo(500, 0.9)}
_COMPARISON = re.compile(r"^\s*(<=|>=|<|>|==|!=)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


class PolicyError(ValueError):
    """The policy file is invalid; the message names the key."""


@dataclass(frozen=True)
class Condition:
    """One test on a signature cue: a comparison for numbers, membership for text."""

    cue: str
    text: str  # as written in the file, for REASON
    test: Callable[[Any], bool]

    def holds(self, signature: Signature) -> bool:
        value = getattr(signature, self.cue)
        return value is not None and self.test(value)

    def explain(self, signature: Signature) -> str:
        return f"{self.cue}={_show(getattr(signature, self.cue))} {self.text}"


@dataclass(frozen=True)
class Rule:
    name: str
    when: tuple[Condition, ...]
    route: str
    confidence_cap: float | None = None

    def matches(self, signature: Signature) -> bool:
        return all(condition.holds(signature) for condition in self.when)


@dataclass(frozen=True)
class Cascade:
    first: str
    escalate_to: str
    thresholds: Mapping[str, float]  # per tier: escalate when the first model's confidence is below this
    escalate_when: str
    # per tier: the learned router's p(wrong) above which it asks to escalate; None: no learned router
    learned_escalate_above: Mapping[str, float] | None


@dataclass(frozen=True)
class Attribute:
    """A request attribute declared in the policy, sent as a request parameter of its name; experiments test it."""

    name: str
    values: tuple[str, ...] | None  # the allowed values; None: a whole number (e.g. account_age_days)


@dataclass(frozen=True)
class AdaptationSettings:
    """Per-user adaptation of the cascade, learned from each user's feedback on rows the cascade's first model
    answered. Off under load: past the degrade threshold the global policy answers."""

    enabled: bool = False
    min_feedback: int = 5  # fed-back rows of a user before their cascade adapts
    escalate_all_below: float = 0.5  # first model's accuracy on the user's images below which every row escalates
    stricter_below: float = 0.85  # accuracy below which the user's threshold rises to stricter_threshold
    stricter_threshold: float = 0.98
    relax_above: float = 0.9  # accuracy above which the user's threshold drops to relaxed_threshold
    relaxed_threshold: float = 0.8
    max_users: int = 100_000  # users held; the least recently seen are forgotten beyond this


@dataclass(frozen=True)
class Policy:
    models: tuple[str, ...]
    default_tier: str
    rules: tuple[Rule, ...]
    cascade: Cascade
    fallback: str
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per route, tried in order
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    call_timeout_ms: float = 1000.0  # bound on one downstream call
    reload_min_interval_s: float = 10.0  # self-healing: at most one reload per model this often
    tiers: Mapping[str, TierSlo] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    shedding: SheddingSettings = field(default_factory=SheddingSettings)
    lanes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # tier -> {model: its lane for the tier}
    attributes: Mapping[str, Attribute] = field(default_factory=dict)
    experiment_models: tuple[str, ...] = ()  # models only an experiment's arm or shadow may call
    adaptation: AdaptationSettings = field(default_factory=AdaptationSettings)
    in_process: tuple[str, ...] = ()  # models the router serves itself while their Triton model is READY, unfaulted
    optional_models: tuple[str, ...] = ()  # models a server may not load (a GPU variant): skipped while not READY

    def lane(self, model: str, tier: str) -> str:
        """The model:version that serves `model` for `tier`: its reserved lane, or the model itself."""
        return self.lanes.get(tier, {}).get(model, model)

    @property
    def callable_models(self) -> tuple[str, ...]:
        """Every model:version the router may call: the listed models, the experiments' models and their lanes."""
        lanes = [lane for by_model in self.lanes.values() for lane in by_model.values()]
        return tuple(dict.fromkeys([*self.models, *self.experiment_models, *lanes]))

    def chain(self, model: str) -> tuple[str, ...]:
        """What to try, in order, when `model` fails, times out or is ejected: its fallbacks, then `fallback`."""
        chain = [m for m in self.fallbacks.get(model, ()) if m != model]
        return tuple(dict.fromkeys([*chain, self.fallback]))

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            data = load_yaml(path)
        except OperatorFileError as error:
            raise PolicyError(f"{path}: cannot read the policy: {error}") from None
        try:
            return parse_policy(data)
        except PolicyError as error:
            raise PolicyError(f"{path}: {error}") from None


def _show(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _mapping(data: Any, key: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise PolicyError(f"{key}: expected a mapping, got {type(data).__name__}")
    if unknown := sorted(set(data) - allowed):
        raise PolicyError(f"{key}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(allowed))}")
    if missing := sorted(required - set(data)):
        raise PolicyError(f"{key}.{missing[0]}: required key is missing")
    return data


def _model(value: Any, key: str, models: tuple[str, ...]) -> str:
    if value not in models:
        raise PolicyError(f"{key}: {value!r} is not listed under models ({', '.join(models)})")
    return value


def _probability(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"{key}: expected a number from 0 to 1, got {value!r}")
    return float(value)


def _condition(cue: str, spec: Any, key: str) -> Condition:
    if cue in NUMERIC_CUES:
        match = _COMPARISON.match(str(spec))
        if not match:
            raise PolicyError(f"{key}: expected a comparison such as '> 0.5', got {spec!r}")
        compare, bound = COMPARISONS[match.group(1)], float(match.group(2))
        return Condition(cue, f"{match.group(1)} {match.group(2)}", lambda value: compare(value, bound))
    if cue in TEXT_CUES:
        allowed = [spec] if isinstance(spec, str) else spec
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise PolicyError(f"{key}: expected a string or a list of strings, got {spec!r}")
        if cue == "tier" and (bad := [a for a in allowed if a not in TIERS]):
            raise PolicyError(f"{key}: unknown tier {bad[0]!r}; tiers are {', '.join(TIERS)}")
        return Condition(cue, f"in {allowed}", lambda value: value in allowed)
    raise PolicyError(f"{key}: unknown cue; cues are {', '.join(NUMERIC_CUES + TEXT_CUES)}")


def _rule(data: Any, key: str, models: tuple[str, ...]) -> Rule:
    data = _mapping(data, key, {"name", "when", "route", "confidence_cap"}, {"name", "when", "route"})
    when = _mapping(data["when"], f"{key}.when", set(NUMERIC_CUES + TEXT_CUES), set())
    if not when:
        raise PolicyError(f"{key}.when: a rule needs at least one condition")
    cap = data.get("confidence_cap")
    return Rule(
        name=str(data["name"]),
        when=tuple(_condition(cue, spec, f"{key}.when.{cue}") for cue, spec in when.items()),
        route=_model(data["route"], f"{key}.route", models),
        confidence_cap=None if cap is None else _probability(cap, f"{key}.confidence_cap"),
    )


def _per_tier(data: Any, key: str, one_for_all: bool = True) -> dict[str, float]:
    """A probability per tier: a mapping naming every tier or, where `one_for_all`, one number for all of them."""
    if one_for_all and not isinstance(data, dict):
        value = _probability(data, key)
        return dict.fromkeys(TIERS, value)
    values = _mapping(data, key, set(TIERS), set(TIERS))
    return {tier: _probability(values[tier], f"{key}.{tier}") for tier in TIERS}


def _cascade(data: Any, models: tuple[str, ...]) -> Cascade:
    data = _mapping(
        data,
        "cascade",
        {"first", "escalate_to", "thresholds", "escalate_when", "learned_router"},
        {"first", "escalate_to", "thresholds", "escalate_when"},
    )
    escalate_when = data["escalate_when"]
    if escalate_when not in ESCALATE_WHEN:
        raise PolicyError(f"cascade.escalate_when: expected one of {', '.join(ESCALATE_WHEN)}, got {escalate_when!r}")
    learned_above = None
    if escalate_when != "threshold":
        if "learned_router" not in data:
            raise PolicyError(f"cascade.learned_router: required when escalate_when is {escalate_when!r}")
        learned = _mapping(data["learned_router"], "cascade.learned_router", {"escalate_above"}, {"escalate_above"})
        learned_above = _per_tier(learned["escalate_above"], "cascade.learned_router.escalate_above")
    return Cascade(
        first=_model(data["first"], "cascade.first", models),
        escalate_to=_model(data["escalate_to"], "cascade.escalate_to", models),
        thresholds=_per_tier(data["thresholds"], "cascade.thresholds", one_for_all=False),
        escalate_when=escalate_when,
        learned_escalate_above=learned_above,
    )


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise PolicyError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


def _fallbacks(data: Any, models: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    data = _mapping(data, "fallbacks", set(models), set())
    chains = {}
    for route, chain in data.items():
        if not isinstance(chain, list):
            raise PolicyError(f"fallbacks.{route}: expected a list of models, got {chain!r}")
        chains[route] = tuple(_model(m, f"fallbacks.{route}[{i}]", models) for i, m in enumerate(chain))
    return chains


def _breaker(data: Any) -> BreakerSettings:
    names = {f.name for f in fields(BreakerSettings)}
    data = _mapping(data, "circuit_breaker", names, set())
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"circuit_breaker.{name}"
        if name in ("consecutive_errors", "failure_percentage_request_volume"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"{key}: expected a whole number of at least 1, got {value!r}")
            values[name] = value
        elif name == "failure_percentage_threshold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
                raise PolicyError(f"{key}: expected a percentage above 0 and at most 100, got {value!r}")
            values[name] = float(value)
        else:
            values[name] = _positive(value, key)
    return BreakerSettings(**values)


def _tiers(data: Any) -> dict[str, TierSlo]:
    data = _mapping(data, "tiers", set(TIERS), set())
    tiers = dict(DEFAULT_TIERS)
    for tier, spec in data.items():
        spec = _mapping(spec, f"tiers.{tier}", {"slo_ms", "slo_target"}, {"slo_ms", "slo_target"})
        target = _probability(spec["slo_target"], f"tiers.{tier}.slo_target")
        tiers[tier] = TierSlo(_positive(spec["slo_ms"], f"tiers.{tier}.slo_ms"), target)
    return tiers


def _shedding(data: Any) -> SheddingSettings:
    keys = ("degrade_best_effort_at_ms", "shed_best_effort_at_ms", "shed_standard_at_ms")
    data = _mapping(data, "load_shedding", set(keys), set())
    settings = SheddingSettings(**{key: _positive(value, f"load_shedding.{key}") for key, value in data.items()})
    if not settings.degrade_best_effort_at_ms <= settings.shed_best_effort_at_ms <= settings.shed_standard_at_ms:
        raise PolicyError(
            "load_shedding: expected degrade_best_effort_at_ms <= shed_best_effort_at_ms <= shed_standard_at_ms"
        )
    return settings


def _lanes(data: Any, models: tuple[str, ...]) -> dict[str, dict[str, str]]:
    data = _mapping(data, "lanes", set(TIERS), set())
    lanes: dict[str, dict[str, str]] = {}
    for tier, by_model in data.items():
        by_model = _mapping(by_model, f"lanes.{tier}", set(models), set())
        for model, lane in by_model.items():
            if not isinstance(lane, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+:[0-9]+", lane) or lane in models:
                raise PolicyError(
                    f"lanes.{tier}.{model}: expected a lane 'model:version' not listed under models, got {lane!r}"
                )
        lanes[tier] = dict(by_model)
    return lanes


_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
RESERVED_PARAMETERS = ("tier", "user_id", "deadline_ms")


def _attributes(data: Any) -> dict[str, Attribute]:
    if not isinstance(data, dict):
        raise PolicyError(f"attributes: expected a mapping of name to a list of values or 'int', got {data!r}")
    attributes = {}
    for name, values in data.items():
        key = f"attributes.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_PARAMETERS:
            raise PolicyError(f"{key}: expected a lower-case name other than {', '.join(RESERVED_PARAMETERS)}")
        if values == "int":
            attributes[name] = Attribute(name, None)
            continue
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
            raise PolicyError(f"{key}: expected 'int' or a non-empty list of values, got {values!r}")
        attributes[name] = Attribute(name, tuple(values))
    return attributes


def _experiment_models(data: Any, models: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(data, list) or not all(isinstance(m, str) for m in data):
        raise PolicyError("experiment_models: expected a list of 'model:version' names")
    for index, model in enumerate(data):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+:[0-9]+", model) or model in models:
            raise PolicyError(f"experiment_models[{index}]: expected a 'model:version' not under models, got {model!r}")
    return tuple(data)


def _adaptation(data: Any) -> AdaptationSettings:
    data = _mapping(data, "adaptation", {f.name for f in fields(AdaptationSettings)}, set())
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"adaptation.{name}"
        if name == "enabled":
            if not isinstance(value, bool):
                raise PolicyError(f"{key}: expected true or false, got {value!r}")
            values[name] = value
        elif name in ("min_feedback", "max_users"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"{key}: expected a whole number of at least 1, got {value!r}")
            values[name] = value
        else:
            values[name] = _probability(value, key)
    settings = AdaptationSettings(**values)
    if not settings.escalate_all_below <= settings.stricter_below <= settings.relax_above:
        raise PolicyError(
            "adaptation: expected escalate_all_below <= stricter_below <= relax_above, got "
            f"{settings.escalate_all_below} / {settings.stricter_below} / {settings.relax_above}"
        )
    return settings


def _subset(data: Any, key: str, models: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(data, list):
        raise PolicyError(f"{key}: expected a list of 'model:version' names listed under models")
    return tuple(dict.fromkeys(_model(m, f"{key}[{i}]", models) for i, m in enumerate(data)))


def parse_policy(data: Any) -> Policy:
    """Validate a policy document (already parsed from YAML) into a Policy."""
    data = _mapping(
        data,
        "policy",
        {
            "models",
            "default_tier",
            "rules",
            "cascade",
            "fallback",
            "fallbacks",
            "circuit_breaker",
            "call_timeout_ms",
            "self_healing",
            "tiers",
            "load_shedding",
            "lanes",
            "attributes",
            "experiment_models",
            "adaptation",
            "in_process",
            "optional_models",
        },
        {"models", "cascade", "fallback"},
    )
    models = data["models"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise PolicyError("models: expected a non-empty list of 'model:version' names")
    for index, model in enumerate(models):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+:[0-9]+", model):
            raise PolicyError(f"models[{index}]: expected 'model:version', got {model!r}")
    models = tuple(models)
    default_tier = data.get("default_tier", "standard")
    if default_tier not in TIERS:
        raise PolicyError(f"default_tier: unknown tier {default_tier!r}; tiers are {', '.join(TIERS)}")
    rules = data.get("rules") or []
    if not isinstance(rules, list):
        raise PolicyError("rules: expected a list of rules")
    parsed_rules = tuple(_rule(rule, f"rules[{i}]", models) for i, rule in enumerate(rules))
    names = [rule.name for rule in parsed_rules]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise PolicyError(f"rules: rule name {duplicates[0]!r} is used twice")
    experiment_models = _experiment_models(data.get("experiment_models", []), models)
    in_process = _subset(data.get("in_process", []), "in_process", models)
    optional_models = _subset(data.get("optional_models", []), "optional_models", models)
    if both := sorted(set(in_process) & set(optional_models)):
        raise PolicyError(f"in_process: {both[0]} is optional; the router serves in-process only a model it always has")
    if data["fallback"] in optional_models:
        raise PolicyError(f"optional_models: {data['fallback']} is the fallback, which every server must have")
    healing = _mapping(data.get("self_healing", {}), "self_healing", {"reload_min_interval_s"}, set())
    return Policy(
        models,
        default_tier,
        parsed_rules,
        _cascade(data["cascade"], models),
        _model(data["fallback"], "fallback", models),
        fallbacks=_fallbacks(data.get("fallbacks", {}), models),
        breaker=_breaker(data.get("circuit_breaker", {})),
        call_timeout_ms=_positive(data.get("call_timeout_ms", 1000), "call_timeout_ms"),
        reload_min_interval_s=_positive(healing.get("reload_min_interval_s", 10), "self_healing.reload_min_interval_s"),
        tiers=_tiers(data.get("tiers", {})),
        shedding=_shedding(data.get("load_shedding", {})),
        lanes=_lanes(data.get("lanes", {}), models + experiment_models),
        attributes=_attributes(data.get("attributes", {})),
        experiment_models=experiment_models,
        adaptation=_adaptation(data.get("adaptation", {})),
        in_process=in_process,
        optional_models=optional_models,
    )
