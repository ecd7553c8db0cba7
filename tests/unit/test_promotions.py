"""Promotions route the policy to another version of a model everywhere it is named (lanes included), keep a
history for rollback, round-trip through JSON, and say where a version is used."""

from __future__ import annotations

import json

import pytest

from tierserve.experiment_spec import ExperimentsFile, parse_experiments
from tierserve.promotions import (
    MAX_HISTORY,
    PROMOTIONS_PARAMETER,
    ModelVersion,
    Promotion,
    PromotionError,
    Promotions,
    UseKind,
    describe,
    promoted_policy,
    served_promotions,
    store_promotions,
    stored_promotions,
    version_uses,
)
from tierserve.router_files import ROUTER_MODEL, load_router, router_policy
from tierserve.state_store import MemoryStore
from tierserve.tools.paths import DEFAULT_REPOSITORY

from .heavy_v2 import heavy_v2_policy

POLICY = heavy_v2_policy()
HEAVY_3 = Promotions().promoted(ModelVersion("digits_heavy", 3), serving=2)


def _uses(name: str, policy=POLICY, experiments: ExperimentsFile | None = None) -> list[tuple[UseKind, str, str]]:
    return [(u.kind, u.where, u.detail) for u in version_uses(policy, experiments or ExperimentsFile(), name)]


@pytest.mark.parametrize(
    "text", ["digits_heavy", "digits_heavy:0", "digits_heavy:x", "digits heavy:3", ":3", "..:3", "", "a:1:2"]
)
def test_a_malformed_model_version_is_refused_naming_it(text: str):
    with pytest.raises(PromotionError, match="expected MODEL:VERSION") as error:
        ModelVersion.parse(text)
    assert repr(text) in str(error.value)


def test_a_model_version_parses_and_prints_back():
    assert ModelVersion.parse("digits_heavy:12") == ("digits_heavy", 12)
    assert str(ModelVersion.parse("digits_heavy:12")) == "digits_heavy:12"


def test_a_promotion_replaces_the_version_everywhere_the_policy_names_it():
    promoted = promoted_policy(POLICY, HEAVY_3)
    assert "digits_heavy:3" in promoted.models and "digits_heavy:2" not in promoted.models
    assert promoted.cascade.escalate_to == "digits_heavy:3"
    assert promoted.chain("digits_light:2") == ("digits_heavy:3", "digits_rules:1")
    assert promoted.chain("digits_heavy:3") == ("digits_light:2", "digits_rules:1")
    # the lane moves with it: the lane model at the promoted version serves the promoted artifacts
    assert promoted.lane("digits_heavy:3", "critical") == "digits_heavy_critical:3"
    assert promoted.lane("digits_light:2", "critical") == "digits_light_critical:2"
    assert "digits_heavy_critical:2" not in promoted.callable_models
    # nothing else changes
    assert promoted.cascade.first == POLICY.cascade.first and promoted.fallback == POLICY.fallback
    # the promoted version is routed now, no longer only an experiment's
    assert promoted.experiment_models == tuple(m for m in POLICY.experiment_models if m != "digits_heavy:3")
    assert promoted.rules == POLICY.rules
    assert (promoted.breaker, promoted.tiers, promoted.adaptation) == (POLICY.breaker, POLICY.tiers, POLICY.adaptation)


def test_a_promoted_rule_route_and_fallback_are_renamed():
    promoted = promoted_policy(POLICY, Promotions().promoted(ModelVersion("digits_rules", 4), serving=1))
    assert {rule.name: rule.route for rule in promoted.rules} == {
        "out_of_distribution": "digits_rules:4",
        "values_out_of_range": "digits_rules:4",
        "missing_pixels": "digits_missing:1",
        "tight_deadline": "digits_light:2",
    }
    assert promoted.fallback == "digits_rules:4" and promoted.chain("digits_missing:1") == ("digits_rules:4",)


def test_promoting_an_experiment_model_takes_it_off_experiment_models():
    promoted = promoted_policy(POLICY, Promotions().promoted(ModelVersion("digits_heavy", 1), serving=2))
    assert promoted.cascade.escalate_to == "digits_heavy:1"
    assert "digits_heavy:1" not in promoted.experiment_models
    assert len(promoted.callable_models) == len(set(promoted.callable_models))


def test_a_promotion_renames_the_version_under_in_process_and_optional_models():
    shipped = router_policy(DEFAULT_REPOSITORY)  # digits_light:2 served in-process, digits_heavy_trt:1 optional
    light = promoted_policy(shipped, Promotions().promoted(ModelVersion("digits_light", 2), serving=1))
    assert light.in_process == ("digits_light:2",) and light.cascade.first == "digits_light:2"
    trt = promoted_policy(shipped, Promotions().promoted(ModelVersion("digits_heavy_trt", 2), serving=1))
    assert trt.optional_models == ("digits_heavy_trt:2",) and trt.cascade.escalate_to == "digits_heavy_trt:2"
    assert trt.chain("digits_heavy_trt:2") == ("digits_heavy:3", "digits_light:2", "digits_rules:1")


def test_no_promotion_and_a_promotion_of_an_unrouted_model_leave_the_policy_as_it_is():
    assert promoted_policy(POLICY, Promotions()) is POLICY
    stale = Promotions(models={"digits_gone": Promotion(version=2, history=(1,))})
    assert promoted_policy(POLICY, stale) is POLICY
    back_to_the_file = Promotions(models={"digits_heavy": Promotion(version=2, history=(2, 3))})
    assert promoted_policy(POLICY, back_to_the_file) is POLICY


def test_promote_then_rollback_walks_the_history_back():
    twice = HEAVY_3.promoted(ModelVersion("digits_heavy", 1), serving=3)
    assert twice.models["digits_heavy"] == Promotion(version=1, history=(2, 3))
    once = twice.rolled_back("digits_heavy")
    assert once.models["digits_heavy"] == Promotion(version=3, history=(2,))
    back = once.rolled_back("digits_heavy")
    assert back.models["digits_heavy"] == Promotion(version=2, history=())
    assert promoted_policy(POLICY, back) is POLICY
    with pytest.raises(PromotionError, match="digits_heavy has no earlier version"):
        back.rolled_back("digits_heavy")
    with pytest.raises(PromotionError, match="digits_light has no earlier version"):
        twice.rolled_back("digits_light")


def test_promoting_the_version_already_routed_is_refused():
    with pytest.raises(PromotionError, match="digits_heavy:3 is already the version routed to"):
        HEAVY_3.promoted(ModelVersion("digits_heavy", 3), serving=3)


def test_the_history_is_bounded():
    promotions = Promotions()
    for version in range(1, MAX_HISTORY + 5):
        promotions = promotions.promoted(ModelVersion("digits_heavy", version + 1), serving=version)
    history = promotions.models["digits_heavy"].history
    assert len(history) == MAX_HISTORY and history[-1] == MAX_HISTORY + 4


def test_promotions_round_trip_through_json_and_describe_themselves():
    twice = HEAVY_3.promoted(ModelVersion("digits_rules", 2), serving=1)
    assert Promotions.from_json(twice.to_json(), "test") == twice
    assert describe(twice) == "digits_heavy:3 (was 2), digits_rules:2 (was 1)"
    assert describe(Promotions()) == "none"


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ("not json", "promotions"),
        (json.dumps({"models": {"digits_heavy": {"version": 0}}}), "models.digits_heavy.version"),
        (json.dumps({"models": {"digits_heavy": {"version": 3, "history": [0]}}}), "models.digits_heavy.history.0"),
        (json.dumps({"models": {"digits_heavy": {"version": 3, "owner": "x"}}}), "models.digits_heavy.owner"),
        (json.dumps({"versions": {}}), "versions"),
    ],
)
def test_malformed_promotions_are_refused_naming_the_source_and_key(document: str, named: str):
    with pytest.raises(PromotionError) as error:
        Promotions.from_json(document, "somewhere")
    assert str(error.value).startswith(f"somewhere: {named}:")


def test_the_router_serves_its_parameter_else_the_store_else_none():
    store = MemoryStore()
    assert served_promotions(store, {}) == Promotions()
    store_promotions(store, HEAVY_3)
    assert served_promotions(store, {"parameters": {}}) == HEAVY_3 == stored_promotions(store)
    rolled_back = HEAVY_3.rolled_back("digits_heavy")
    config = {"parameters": {PROMOTIONS_PARAMETER: {"string_value": rolled_back.to_json()}}}
    assert served_promotions(store, config) == rolled_back
    with pytest.raises(PromotionError, match="router config parameter 'promotions'"):
        served_promotions(store, {"parameters": {PROMOTIONS_PARAMETER: {"string_value": "{"}}})
    store.set("promotions", b"[]")
    with pytest.raises(PromotionError, match="state store key 'promotions'"):
        stored_promotions(store)


def test_load_router_applies_promotions_to_the_shipped_policy():
    router, _ = load_router(
        DEFAULT_REPOSITORY / ROUTER_MODEL, "1", Promotions().promoted(ModelVersion("digits_heavy", 1), serving=3)
    )
    assert router.policy.cascade.escalate_to == "digits_heavy_trt:1"  # the GPU variant, not built on this host
    assert router.policy.chain("digits_heavy_trt:1") == ("digits_heavy:1", "digits_light:2", "digits_rules:1")
    assert "digits_heavy:1" in router.breakers and "digits_heavy:3" not in router.breakers
    assert router.policy.lane("digits_heavy:1", "critical") == "digits_heavy_critical:1"
    assert router.accepts_missing["digits_heavy_trt:1"] is False


def test_uses_of_a_routed_version_name_every_place():
    assert _uses("digits_heavy:2") == [
        (UseKind.LISTED, "", ""),
        (UseKind.CASCADE_ESCALATION, "", ""),
        (UseKind.FALLBACK_CHAIN, "digits_light:2", ""),
    ]
    assert _uses("digits_rules:1") == [
        (UseKind.LISTED, "", ""),
        (UseKind.RULE, "out_of_distribution", ""),
        (UseKind.RULE, "values_out_of_range", ""),
        (UseKind.FALLBACK, "", ""),
    ]
    assert _uses("digits_heavy_critical:2") == [(UseKind.LANE, "critical", "digits_heavy:2")]
    assert [str(u) for u in version_uses(POLICY, ExperimentsFile(), "digits_light:2")] == [
        "policy models",
        "route of rule tight_deadline",
        "cascade first",
        "fallback chain of digits_heavy:2",
    ]


def test_an_unused_version_has_no_uses_until_an_experiment_names_it():
    assert _uses("digits_heavy:1") == []
    assert _uses("digits_heavy:9") == []
    experiments = parse_experiments(
        {
            "experiments": [
                {
                    "name": "heavy_versions",
                    "kind": "split",
                    "arms": [
                        {"name": "control", "weight": 50},
                        {"name": "v1", "weight": 50, "models": {"digits_heavy:2": "digits_heavy:1"}},
                    ],
                },
                {
                    "name": "shadow_v1",
                    "kind": "shadow",
                    "layer": "shadows",
                    "shadow": {"candidate": "digits_heavy:1", "fraction": 0.5},
                },
            ]
        },
        POLICY,
    )
    assert _uses("digits_heavy:1", experiments=experiments) == [
        (UseKind.EXPERIMENT_ARM, "heavy_versions", "v1 (digits_heavy:2 -> digits_heavy:1)"),
        (UseKind.SHADOW, "shadow_v1", ""),
    ]
    assert (UseKind.EXPERIMENT_ARM, "heavy_versions", "v1 (digits_heavy:2 -> digits_heavy:1)") in _uses(
        "digits_heavy:2", experiments=experiments
    )
    texts = [str(u) for u in version_uses(POLICY, experiments, "digits_heavy:1")]
    assert texts == [
        "experiment heavy_versions arm v1 (digits_heavy:2 -> digits_heavy:1)",
        "experiment shadow_v1 shadow candidate",
    ]


def test_uses_follow_the_promotion():
    promoted = promoted_policy(POLICY, HEAVY_3)
    assert _uses("digits_heavy:2", promoted) == []
    assert _uses("digits_heavy_critical:2", promoted) == []
    assert _uses("digits_heavy_critical:3", promoted) == [(UseKind.LANE, "critical", "digits_heavy:3")]
    assert (UseKind.CASCADE_ESCALATION, "", "") in _uses("digits_heavy:3", promoted)
