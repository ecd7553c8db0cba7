"""The policy file loads into rules and a cascade, and every mistake in it is named by its key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tierserve.policy import Policy, PolicyError, parse_policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.tools.paths import DEFAULT_REPOSITORY

from .signatures import signature as _signature

VALID = {
    "models": ["digits_light:1", "digits_heavy:2", "digits_rules:1"],
    "rules": [
        {
            "name": "noise",
            "when": {"ood_score": "> 2", "tier": ["standard", "best_effort"]},
            "route": "digits_rules:1",
            "confidence_cap": 0.3,
        }
    ],
    "cascade": {
        "first": "digits_light:1",
        "escalate_to": "digits_heavy:2",
        "escalate_when": "threshold",
        "thresholds": {"critical": 0.99, "standard": 0.9, "best_effort": 0.6},
    },
    "fallback": "digits_rules:1",
}


def _with(path: str, value) -> dict:
    """VALID with the value at a dotted path replaced (a value of ... deletes the key)."""
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return data


def test_the_shipped_policy_loads():
    policy = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
    assert policy.fallback in policy.models
    assert [rule.name for rule in policy.rules][:3] == ["out_of_distribution", "values_out_of_range", "missing_pixels"]


def test_conditions_compare_numbers_and_match_text():
    (rule,) = parse_policy(VALID).rules
    assert rule.matches(_signature(ood_score=2.5))
    assert not rule.matches(_signature(ood_score=2.0))
    assert not rule.matches(_signature(ood_score=2.5, tier="critical"))
    assert rule.when[0].explain(_signature(ood_score=2.5)) == "ood_score=2.50 > 2"


def test_a_condition_on_an_absent_deadline_does_not_hold():
    policy = parse_policy(_with("rules.0.when", {"deadline_ms": "< 5"}))
    assert not policy.rules[0].matches(_signature(deadline_ms=None))
    assert policy.rules[0].matches(_signature(deadline_ms=3))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("models", "digits_light:1", "models: expected a non-empty list"),
        ("models", ["digits_light"], "models[0]: expected 'model:version', got 'digits_light'"),
        ("rules.0.route", "digits_heavy:1", "rules[0].route: 'digits_heavy:1' is not listed under models"),
        ("rules.0.when", {"ood_scor": "> 2"}, "rules[0].when.ood_scor: unknown key"),
        ("rules.0.when", {"ood_score": "big"}, "rules[0].when.ood_score: expected a comparison such as '> 0.5'"),
        ("rules.0.when", {"tier": "gold"}, "rules[0].when.tier: unknown tier 'gold'"),
        ("rules.0.when", {}, "rules[0].when: a rule needs at least one condition"),
        ("rules.0.confidence_cap", 3, "rules[0].confidence_cap: expected a number from 0 to 1, got 3"),
        ("rules.0.colour", "red", "rules[0].colour: unknown key"),
        ("rules.0.name", ..., "rules[0].name: required key is missing"),
        (
            "cascade.thresholds",
            {"critical": 0.9, "standard": 0.8},
            "cascade.thresholds.best_effort: required key is missing",
        ),
        ("cascade.thresholds.standard", "high", "cascade.thresholds.standard: expected a number from 0 to 1"),
        ("cascade.escalate_when", "sometimes", "cascade.escalate_when: expected one of threshold, learned, either"),
        ("cascade.escalate_when", "either", "cascade.learned_router: required when escalate_when is 'either'"),
        ("cascade.first", "digits_missing:1", "cascade.first: 'digits_missing:1' is not listed under models"),
        ("fallback", ..., "policy.fallback: required key is missing"),
        ("default_tier", "gold", "default_tier: unknown tier 'gold'"),
        ("fallbacks", {"digits_heavy:1": []}, "fallbacks.digits_heavy:1: unknown key"),
        ("fallbacks", {"digits_light:1": "digits_rules:1"}, "fallbacks.digits_light:1: expected a list of models"),
        ("fallbacks", {"digits_light:1": ["nope:1"]}, "fallbacks.digits_light:1[0]: 'nope:1' is not listed"),
        ("circuit_breaker", {"consecutive_errorz": 3}, "circuit_breaker.consecutive_errorz: unknown key"),
        ("circuit_breaker", {"consecutive_errors": 0}, "circuit_breaker.consecutive_errors: expected a whole number"),
        (
            "circuit_breaker",
            {"failure_percentage_threshold": 150},
            "circuit_breaker.failure_percentage_threshold: expected a percentage",
        ),
        ("circuit_breaker", {"base_ejection_time_s": -1}, "circuit_breaker.base_ejection_time_s: expected a positive"),
        ("call_timeout_ms", 0, "call_timeout_ms: expected a positive number, got 0"),
        ("self_healing", {"reload_min_interval_s": "often"}, "self_healing.reload_min_interval_s: expected a positive"),
        ("tiers", {"gold": {"slo_ms": 1, "slo_target": 0.9}}, "tiers.gold: unknown key"),
        ("tiers", {"critical": {"slo_ms": 0, "slo_target": 0.9}}, "tiers.critical.slo_ms: expected a positive number"),
        ("tiers", {"critical": {"slo_ms": 50}}, "tiers.critical.slo_target: required key is missing"),
        ("lanes", {"gold": {}}, "lanes.gold: unknown key"),
        ("lanes", {"critical": {"digits_heavy:1": "x:1"}}, "lanes.critical.digits_heavy:1: unknown key"),
        (
            "lanes",
            {"critical": {"digits_light:1": "digits_heavy:2"}},
            "lanes.critical.digits_light:1: expected a lane 'model:version' not listed under models",
        ),
        ("load_shedding", {"shed_best_effort_at_ms": -1}, "load_shedding.shed_best_effort_at_ms: expected a positive"),
        (
            "load_shedding",
            {"shed_best_effort_at_ms": 90, "shed_standard_at_ms": 80},
            "load_shedding: expected degrade_best_effort_at_ms <= shed_best_effort_at_ms <= shed_standard_at_ms",
        ),
        ("adaptation", {"stricter_threshold": 1.5}, "adaptation.stricter_threshold: expected a number from 0 to 1"),
        ("adaptation", {"stricter_threshold": float("nan")}, "adaptation.stricter_threshold: expected a number from 0"),
        ("adaptation", {"stricter_below": True}, "adaptation.stricter_below: expected a number from 0 to 1, got True"),
        ("adaptation", {"stricter_below": "0.8"}, "adaptation.stricter_below: expected a number from 0 to 1"),
        (
            "adaptation",
            {"escalate_all_below": 0.6, "stricter_below": 0.5},
            "adaptation: expected escalate_all_below <= stricter_below <= relax_above, got 0.6 / 0.5 / 0.9",
        ),
        (
            "adaptation",
            {"stricter_below": 0.95},
            "adaptation: expected escalate_all_below <= stricter_below <= relax_above, got 0.5 / 0.95 / 0.9",
        ),
        ("in_process", "digits_light:1", "in_process: expected a list of 'model:version' names"),
        ("in_process", ["nope:1"], "in_process[0]: 'nope:1' is not listed under models"),
        ("optional_models", ["digits_rules:1"], "optional_models: digits_rules:1 is the fallback"),
    ],
)
def test_every_mistake_is_named_by_its_key(path: str, value, message: str):
    with pytest.raises(PolicyError) as caught:
        parse_policy(_with(path, value))
    assert str(caught.value).startswith(message)


def _learned(escalate_above) -> dict:
    data = _with("cascade.escalate_when", "either")
    data["cascade"]["learned_router"] = {"escalate_above": escalate_above}
    return data


def test_the_learned_router_escalates_above_one_number_for_all_tiers_or_one_per_tier():
    assert parse_policy(_learned(0.3)).cascade.learned_escalate_above == {
        "critical": 0.3,
        "standard": 0.3,
        "best_effort": 0.3,
    }
    per_tier = {"critical": 0.3, "standard": 0.15, "best_effort": 0.5}
    assert parse_policy(_learned(per_tier)).cascade.learned_escalate_above == per_tier


@pytest.mark.parametrize(
    ("escalate_above", "message"),
    [
        (1.5, "cascade.learned_router.escalate_above: expected a number from 0 to 1, got 1.5"),
        ("high", "cascade.learned_router.escalate_above: expected a number from 0 to 1, got 'high'"),
        ({"standard": 0.2}, "cascade.learned_router.escalate_above.best_effort: required key is missing"),
        (
            {"critical": 0.3, "standard": 0.2, "best_effort": 0.3, "gold": 0.1},
            "cascade.learned_router.escalate_above.gold: unknown key",
        ),
        (
            {"critical": 0.3, "standard": -0.2, "best_effort": 0.3},
            "cascade.learned_router.escalate_above.standard: expected a number from 0 to 1, got -0.2",
        ),
        (float("nan"), "cascade.learned_router.escalate_above: expected a number from 0 to 1, got nan"),
        (float("inf"), "cascade.learned_router.escalate_above: expected a number from 0 to 1, got inf"),
        (True, "cascade.learned_router.escalate_above: expected a number from 0 to 1, got True"),
        (None, "cascade.learned_router.escalate_above: expected a number from 0 to 1, got None"),
        ([0.3], "cascade.learned_router.escalate_above: expected a number from 0 to 1, got [0.3]"),
        (
            {"critical": float("nan"), "standard": 0.2, "best_effort": 0.3},
            "cascade.learned_router.escalate_above.critical: expected a number from 0 to 1, got nan",
        ),
    ],
)
def test_a_bad_learned_router_threshold_is_named_by_its_key(escalate_above, message: str):
    with pytest.raises(PolicyError) as caught:
        parse_policy(_learned(escalate_above))
    assert str(caught.value).startswith(message)


def test_duplicate_rule_names_are_refused():
    data = copy.deepcopy(VALID)
    data["rules"].append(copy.deepcopy(data["rules"][0]))
    with pytest.raises(PolicyError, match="rule name 'noise' is used twice"):
        parse_policy(data)


def test_load_names_the_file(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(_with("fallback", "nope:1")))
    with pytest.raises(PolicyError, match=f"^{path}: fallback: 'nope:1' is not listed"):
        Policy.load(path)
    path.write_text("models: [unclosed")
    with pytest.raises(PolicyError, match="cannot read the policy"):
        Policy.load(path)


def test_a_chain_lists_the_route_fallbacks_then_the_safe_default():
    policy = parse_policy(
        _with(
            "fallbacks", {"digits_heavy:2": ["digits_light:1", "digits_rules:1"], "digits_light:1": ["digits_light:1"]}
        )
    )
    assert policy.chain("digits_heavy:2") == ("digits_light:1", "digits_rules:1")
    assert policy.chain("digits_light:1") == ("digits_rules:1",), "a route is never its own fallback"
    assert policy.chain("digits_rules:1") == ("digits_rules:1",)


def test_breaker_settings_are_read_with_envoy_names():
    policy = parse_policy(
        _with("circuit_breaker", {"consecutive_errors": 4, "base_ejection_time_s": 3, "latency_threshold_ms": 200})
    )
    assert (
        policy.breaker.consecutive_errors,
        policy.breaker.base_ejection_time_s,
        policy.breaker.latency_threshold_ms,
    ) == (4, 3.0, 200.0)


def test_tiers_default_and_override():
    policy = parse_policy(_with("tiers", {"critical": {"slo_ms": 20, "slo_target": 0.9999}}))
    assert (policy.tiers["critical"].slo_ms, policy.tiers["critical"].target) == (20.0, 0.9999)
    assert policy.tiers["best_effort"].slo_ms == 500.0


def test_lanes_serve_one_tier_and_are_callable():
    policy = parse_policy(_with("lanes", {"critical": {"digits_light:1": "digits_light_critical:1"}}))
    assert policy.lane("digits_light:1", "critical") == "digits_light_critical:1"
    assert policy.lane("digits_light:1", "standard") == "digits_light:1"
    assert "digits_light_critical:1" in policy.callable_models


def test_a_model_is_either_served_in_process_or_optional_never_both():
    data = {**copy.deepcopy(VALID), "in_process": ["digits_light:1"], "optional_models": ["digits_light:1"]}
    with pytest.raises(PolicyError, match="in_process: digits_light:1 is optional"):
        parse_policy(data)
    policy = parse_policy({**data, "optional_models": ["digits_heavy:2"]})
    assert (policy.in_process, policy.optional_models) == (("digits_light:1",), ("digits_heavy:2",))
