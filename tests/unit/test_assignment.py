"""Rows land in experiment arms deterministically, in the declared shares, and only when eligible."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from scipy import stats

from tierserve.assignment import (
    BUCKETS,
    NO_CHANGES,
    Assigner,
    Assignment,
    Changes,
    Unit,
    beta_sampler,
    bucket,
    first_uniform,
    uniforms,
)
from tierserve.experiment_spec import parse_experiments
from tierserve.policy import Policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.tools.paths import DEFAULT_REPOSITORY

POLICY = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
USERS = [f"user-{i}" for i in range(10_000)]
TOLERANCE = 0.015  # 1.5 percentage points
HEAVY_V1 = {"digits_heavy:3": "digits_heavy:1"}
RNG = random.Random(20261101)
SEEDS = [RNG.getrandbits(64) for _ in range(10_000)]


def assigner(*experiments: dict) -> Assigner:
    return Assigner(parse_experiments({"experiments": list(experiments)}, POLICY))


def split(name: str = "heavy", weights: tuple[float, ...] = (50, 50), **settings) -> dict:
    """A split whose first arm is the control and whose other arms call digits_heavy:1."""
    arms = [{"name": "control", "weight": weights[0]}]
    arms += [{"name": f"v{i}", "weight": w, "models": HEAVY_V1} for i, w in enumerate(weights[1:], 1)]
    return {"name": name, "kind": "split", "arms": arms, **settings}


def canary(weight: float) -> dict:
    return {
        "name": "canary_heavy_v1",
        "kind": "canary",
        "arms": [
            {"name": "treatment", "weight": weight, "models": HEAVY_V1},
            {"name": "control", "weight": 100 - weight},
        ],
    }


def bandit(strategy: dict, **settings) -> dict:
    arms = [{"name": "control"}, {"name": "heavy_v1", "models": HEAVY_V1}]
    return {"name": "heavy_bandit", "kind": "bandit", "bandit": strategy, "arms": arms, **settings}


def shadow(fraction: float, **settings) -> dict:
    return {
        "name": "shadow_v1",
        "kind": "shadow",
        "shadow": {"candidate": "digits_heavy:1", "fraction": fraction},
        **settings,
    }


def unit(user: str = "user-1", tier: str = "standard", seed: int = 7, **attributes) -> Unit:
    return Unit(tier, user, attributes, seed)


def arms_of(a: Assigner, units: list[Unit], experiment: str) -> list[str | None]:
    """Each unit's arm in `experiment`, None when not in it."""
    arms = []
    for u in units:
        arms.append(next((x.arm for x in a.assign(u) if x.experiment == experiment), None))
    return arms


def shares(arms: list[str | None]) -> dict[str | None, float]:
    return {arm: count / len(arms) for arm, count in Counter(arms).items()}


def test_bucket_is_the_documented_hash():
    digest = hashlib.sha256(b"heavy:user-42").digest()
    assert bucket("heavy", "user-42") == int.from_bytes(digest[:8], "big") % BUCKETS
    assert {bucket("heavy", u) for u in USERS[:2000]} <= set(range(BUCKETS))


def test_the_same_user_gets_the_same_arm_from_separately_built_assigners():
    spec = [split(weights=(34, 33, 33)), {**canary(20), "layer": "cascade"}]
    first, second = assigner(*spec), assigner(*spec)
    units = [unit(user, seed=i) for i, user in enumerate(USERS[:2000])]
    other_seeds = [unit(user, seed=i + 1) for i, user in enumerate(USERS[:2000])]
    assert [first.assign(u) for u in units] == [second.assign(u) for u in other_seeds]


@pytest.mark.parametrize("weights", [(50, 50), (20, 30, 50), (90, 10)])
def test_each_arm_gets_its_weight_of_users(weights):
    got = shares(arms_of(assigner(split(weights=weights)), [unit(user) for user in USERS], "heavy"))
    for i, weight in enumerate(weights):
        assert got[f"v{i}" if i else "control"] == pytest.approx(weight / 100, abs=TOLERANCE)


def test_experiments_in_one_layer_are_mutually_exclusive():
    a = assigner(
        split("left", layer="models", layer_range=[0, 50]), split("right", layer="models", layer_range=[50, 100])
    )
    rows = [a.assign(unit(user)) for user in USERS]
    assert not [row for row in rows if len(row) > 1]
    in_left = sum(1 for row in rows if row and row[0].experiment == "left") / len(rows)
    in_right = sum(1 for row in rows if row and row[0].experiment == "right") / len(rows)
    assert in_left == pytest.approx(0.5, abs=TOLERANCE)
    assert in_right == pytest.approx(0.5, abs=TOLERANCE)
    assert in_left + in_right == 1.0


def test_layers_are_independent():
    a = assigner(
        split("models_split", weights=(30, 70), layer="models", layer_range=[0, 60]),
        split("cascade_split", weights=(50, 50), layer="cascade", layer_range=[20, 100]),
    )
    units = [unit(user) for user in USERS]
    table = Counter(zip(arms_of(a, units, "models_split"), arms_of(a, units, "cascade_split"), strict=True))
    rows, columns = [None, "control", "v1"], [None, "control", "v1"]
    observed = [[table[r, c] for c in columns] for r in rows]
    _, p_value, _, _ = stats.chi2_contingency(observed)
    assert p_value > 0.01, observed


def test_critical_is_excluded_unless_listed():
    default, listed = assigner(split()), assigner(split(eligible={"tiers": ["critical"]}))
    assert default.assign(unit(tier="critical")) == []
    assert default.assign(unit(tier="best_effort"))
    assert listed.assign(unit(tier="critical"))
    assert not listed.eligible("heavy", unit(tier="standard"))


def test_attribute_tests_for_lists_and_whole_numbers():
    a = assigner(split(eligible={"attributes": {"region": ["eu", "us"], "account_age_days": ">= 30"}}))
    assert a.eligible("heavy", unit(region="eu", account_age_days=30))
    assert a.eligible("heavy", unit(region="us", account_age_days=400, device="mobile"))
    assert not a.eligible("heavy", unit(region="apac", account_age_days=30))
    assert not a.eligible("heavy", unit(region="eu", account_age_days=29))
    assert not a.eligible("heavy", unit(region="eu", account_age_days="30"))  # an int attribute must be an int
    assert not a.eligible("heavy", unit(region="eu"))  # missing attribute
    assert not a.eligible("heavy", unit(account_age_days=30))
    assert a.assign(unit(region="eu")) == []
    for test, inside, outside in (("< 5", 4, 5), ("== 3", 3, 4), ("!= 3", 4, 3), ("<= -1", -1, 0), ("> 0", 1, 0)):
        b = assigner(split(eligible={"attributes": {"account_age_days": test}}))
        assert b.eligible("heavy", unit(account_age_days=inside)), test
        assert not b.eligible("heavy", unit(account_age_days=outside)), test


def test_without_user_id_a_row_is_never_in_a_user_experiment():
    a = assigner(split(), shadow(1.0, layer="shadow"), bandit({"strategy": "thompson"}, layer="bandit"))
    rows = [a.assign(unit("", seed=seed)) for seed in SEEDS[:1000]]
    assert {x.experiment for row in rows for x in row} == {"heavy_bandit"}  # the bandit's unit is request
    assert not a.eligible("heavy", unit(""))
    assert not a.eligible("shadow_v1", unit(""))


def test_unit_request_spreads_one_user_by_seed():
    a = assigner(split(unit="request"))
    by_seed = arms_of(a, [unit("user-1", seed=seed) for seed in SEEDS], "heavy")
    assert shares(by_seed)["v1"] == pytest.approx(0.5, abs=TOLERANCE)
    assert arms_of(a, [unit("user-2", seed=seed) for seed in SEEDS], "heavy") == by_seed  # the seed alone decides
    assert shares(arms_of(a, [unit("", seed=seed) for seed in SEEDS], "heavy"))["v1"] == pytest.approx(
        0.5, abs=TOLERANCE
    )


def test_growing_a_canary_only_adds_treated_users():
    units = [unit(user) for user in USERS]
    treated_before: set[str] = set()
    for weight in (10, 30, 60):
        arms = arms_of(assigner(canary(weight)), units, "canary_heavy_v1")
        treated = {u.user for u, arm in zip(units, arms, strict=True) if arm == "treatment"}
        assert treated_before <= treated
        assert len(treated) / len(units) == pytest.approx(weight / 100, abs=TOLERANCE)
        treated_before = treated


def test_a_split_changes_only_its_treatment_rows():
    a = assigner(split(weights=(50, 50)))
    for u in (unit(user) for user in USERS[:200]):
        (x,) = a.assign(u)
        assert x.kind == "split" and x.shadow_to is None
        assert x.changes == (NO_CHANGES if x.arm == "control" else Changes(HEAVY_V1))
        assert x.changes.empty == (x.arm == "control")


def test_shadow_mirrors_its_fraction_and_is_replayable():
    a = assigner(shadow(0.25))
    rows = [a.assign(unit(user, seed=seed)) for user, seed in zip(USERS, SEEDS, strict=True)]
    mirrored = [row[0] for row in rows if row]
    assert len(mirrored) / len(rows) == pytest.approx(0.25, abs=TOLERANCE)
    assert {(x.arm, x.kind, x.shadow_to, x.changes.empty) for x in mirrored} == {
        ("mirrored", "shadow", "digits_heavy:1", True)
    }
    assert rows == [
        assigner(shadow(0.25)).assign(unit(user, seed=seed)) for user, seed in zip(USERS, SEEDS, strict=True)
    ]
    assert [bool(a.assign(unit("user-1", seed=seed))) for seed in SEEDS[:500]] == [bool(row) for row in rows[:500]]


FAVOURED = {"heavy_bandit": {"control": (41.0, 61.0), "heavy_v1": (91.0, 11.0)}}  # 40/100 vs 90/100 correct


def test_thompson_sampling_picks_the_clearly_better_arm_and_is_replayable():
    a = assigner(bandit({"strategy": "thompson"}))
    picks = [a.assign(unit(seed=seed), FAVOURED)[0] for seed in SEEDS[:2000]]
    assert sum(x.arm == "heavy_v1" for x in picks) / len(picks) >= 0.95
    assert picks == [
        assigner(bandit({"strategy": "thompson"})).assign(unit(seed=seed), FAVOURED)[0] for seed in SEEDS[:2000]
    ]
    assert picks[0].changes == (Changes(HEAVY_V1) if picks[0].arm == "heavy_v1" else NO_CHANGES)
    assert "posteriors control 40/100, heavy_v1 90/100" in picks[0].reason


def test_thompson_sampling_without_feedback_explores_evenly():
    a = assigner(bandit({"strategy": "thompson"}))
    arms = [a.assign(unit(seed=seed))[0].arm for seed in SEEDS]  # no posteriors: every arm is Beta(1, 1)
    assert shares(arms)["heavy_v1"] == pytest.approx(0.5, abs=TOLERANCE)


def test_epsilon_greedy_explores_about_epsilon_of_the_time():
    a = assigner(bandit({"strategy": "epsilon_greedy", "epsilon": 0.2}))
    arms = [a.assign(unit(seed=seed), FAVOURED)[0].arm for seed in SEEDS]
    # exploring picks a uniform arm, so half of the explored rows land on the worse arm
    assert shares(arms)["control"] == pytest.approx(0.2 / 2, abs=TOLERANCE)


def test_epsilon_greedy_ties_go_to_the_first_declared_arm():
    a = assigner(bandit({"strategy": "epsilon_greedy", "epsilon": 0.0}))
    assert {a.assign(unit(seed=seed))[0].arm for seed in SEEDS[:200]} == {"control"}


@pytest.mark.parametrize("alpha, beta", [(41.0, 61.0), (91.0, 11.0), (1.0, 1.0), (1.0, 6.0), (0.5, 0.5), (0.3, 3.0)])
def test_beta_draws_follow_the_beta_distribution(alpha, beta):
    sample = beta_sampler(alpha, beta)
    draws = [sample(uniforms(seed, "beta")) for seed in range(5000)]
    assert stats.kstest(draws, stats.beta(alpha, beta).cdf).pvalue > 0.01


def test_uniforms_come_from_the_seed_alone():
    assert first_uniform(SEEDS[0], "x") == next(uniforms(SEEDS[0], "x"))
    assert list(zip(range(9), uniforms(1, "x"), strict=False)) == list(zip(range(9), uniforms(1, "x"), strict=False))
    assert next(uniforms(1, "x")) != next(uniforms(1, "y"))
    assert all(0.0 < u < 1.0 for _, u in zip(range(1000), uniforms(2, "x"), strict=False))


def test_assignments_come_in_file_order_and_later_changes_win():
    a = assigner(
        split("models_split", layer="models", weights=(0, 100)),
        {
            "name": "cascade_canary",
            "kind": "canary",
            "layer": "cascade",
            "arms": [
                {
                    "name": "strict",
                    "weight": 100,
                    "models": {"digits_heavy:3": "digits_light:1"},
                    "cascade": {"thresholds": {"standard": 0.95}},
                },
                {"name": "control", "weight": 0},
            ],
        },
        shadow(1.0, layer="shadow"),
    )
    row = a.assign(unit())
    assert [(x.experiment, x.arm) for x in row] == [
        ("models_split", "v1"),
        ("cascade_canary", "strict"),
        ("shadow_v1", "mirrored"),
    ]
    assert Assigner.changes(row) == Changes({"digits_heavy:3": "digits_light:1"}, {"standard": 0.95})
    assert Assigner.changes(row[:1]) == Changes(HEAVY_V1)
    assert Assigner.changes([]).empty


def test_changes_merge_with_the_other_winning():
    base = Changes({"a:1": "b:1"}, {"standard": 0.9}, "either")
    other = Changes({"a:1": "c:1", "d:1": "e:1"}, {}, None)
    merged = base.merged(other)
    assert merged == Changes({"a:1": "c:1", "d:1": "e:1"}, {"standard": 0.9}, "either")
    assert base.merged(Changes()) is base and Changes().merged(base) is base
    assert Changes(escalate_when="threshold").merged(Changes(escalate_when="both")).escalate_when == "both"
    assert Changes().empty and not merged.empty


def test_reasons_say_why():
    (x,) = assigner(split()).assign(unit("user-42"))
    b = bucket("heavy", "user-42")
    assert x.reason.startswith(f"split heavy arm {x.arm} (user bucket {b} in [")
    (y,) = assigner(shadow(1.0)).assign(unit())
    assert y.reason == "shadow shadow_v1 mirrored to digits_heavy:1"


def test_eligible_names_an_unknown_experiment():
    with pytest.raises(KeyError, match="no experiment named 'nope'"):
        assigner(split()).eligible("nope", unit())


def test_no_experiments_assign_nothing():
    assert assigner().assign(unit()) == []
    assert isinstance(Assignment("e", "a", "split", NO_CHANGES, "r"), Assignment)
