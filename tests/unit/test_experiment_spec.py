"""The experiments file validates against the policy, and every mistake in it is named by its dotted key."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tierserve.experiment_spec import (
    EXPERIMENTS_FILE,
    ExperimentsFile,
    ExperimentSpecError,
    experiments_json,
    load_experiments,
    parse_experiments,
)
from tierserve.policy import Policy, parse_policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.tools.paths import DEFAULT_REPOSITORY

ROUTER = DEFAULT_REPOSITORY / ROUTER_MODEL
POLICY = Policy.load(ROUTER / POLICY_FILE)


def shipped_examples() -> dict:
    """The commented-out example block of the shipped experiments.yaml, uncommented and parsed."""
    lines = (ROUTER / EXPERIMENTS_FILE).read_text().splitlines()
    start = lines.index("# experiments:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    return yaml.safe_load("\n".join(block))


EXAMPLES = shipped_examples()


def _with(change, data: dict | None = None) -> dict:
    """The examples (or `data`) deep-copied, changed in place by `change`."""
    data = copy.deepcopy(EXAMPLES if data is None else data)
    change(data["experiments"])
    return data


def test_the_shipped_file_runs_no_experiment():
    assert load_experiments(ROUTER / EXPERIMENTS_FILE, POLICY) == ExperimentsFile()


def test_the_shipped_examples_are_valid_and_show_every_kind():
    spec = parse_experiments(EXAMPLES, POLICY)
    assert [e.kind for e in spec.experiments] == ["split", "canary", "shadow", "bandit"]


def test_defaults_are_filled_in():
    split, canary, shadow, bandit = parse_experiments(EXAMPLES, POLICY).experiments
    assert (split.unit, bandit.unit) == ("user", "request")
    assert split.salt == split.name
    assert canary.eligible.tiers == ("standard", "best_effort")
    assert shadow.layer_range == (0.0, 100.0)
    assert split.eligible.attributes == {"region": ("eu", "us"), "account_age_days": ">= 30"}
    assert [arm.is_control for arm in canary.arms] == [False, True]


def test_an_empty_document_has_no_experiments():
    assert parse_experiments(None, POLICY) == ExperimentsFile()
    assert parse_experiments({"experiments": []}, POLICY) == ExperimentsFile()
    assert parse_experiments(yaml.safe_load("experiments:\n# - name: commented_out\n"), POLICY) == ExperimentsFile()


def test_canonical_json_round_trips():
    spec = parse_experiments(EXAMPLES, POLICY)
    text = experiments_json(spec)
    assert parse_experiments(json.loads(text), POLICY) == spec
    assert experiments_json(parse_experiments(json.loads(text), POLICY)) == text


def _arm(i: int, **changes) -> Callable[[list], None]:
    """A change of the first example's arm `i`."""
    return lambda ex: ex[0]["arms"][i].update(changes)


MISTAKES = {
    "unknown key": (
        lambda ex: ex[0].update(colour="blue"),
        "experiments[0].colour: unknown key; expected one of name, kind,",
    ),
    "unknown key of an arm": (
        lambda ex: ex[0]["arms"][1].update(wieght=50),
        "experiments[0].arms[1].wieght: unknown key; expected one of name, weight, models, cascade",
    ),
    "weights not summing to 100": (_arm(0, weight=40), "experiments[0].arms: weights sum to 90, expected 100"),
    "weight out of range": (_arm(0, weight=150), "experiments[0].arms[0].weight: input should be less than"),
    "weight as text": (_arm(0, weight="50"), "experiments[0].arms[0].weight: input should be a valid number"),
    "weight missing in a split": (
        lambda ex: ex[0]["arms"][0].pop("weight"),
        "experiments[0].arms[0].weight: required for a split",
    ),
    "weight on a bandit arm": (
        lambda ex: ex[3]["arms"][0].update(weight=50),
        "experiments[3].arms[0].weight: not for a bandit",
    ),
    "replacement outside the allowlist": (
        lambda ex: ex[0]["arms"][1]["models"].update({"digits_heavy:3": "digits_heavy:7"}),
        "experiments[0].arms[1].models.digits_heavy:3: 'digits_heavy:7' is not listed under models or "
        "experiment_models",
    ),
    "replaced model not in the policy": (
        lambda ex: ex[0]["arms"][1].update(models={"digits_heavy:1": "digits_heavy:3"}),
        "experiments[0].arms[1].models.digits_heavy:1: not listed under models in policy.yaml",
    ),
    "undeclared attribute": (
        lambda ex: ex[0]["eligible"]["attributes"].update(planet=["mars"]),
        "experiments[0].eligible.attributes.planet: not declared under attributes in policy.yaml "
        "(declared: region, device, account_age_days)",
    ),
    "undeclared attribute value": (
        lambda ex: ex[0]["eligible"]["attributes"].update(region=["eu", "mars"]),
        "experiments[0].eligible.attributes.region: 'mars' is not a declared value (declared: eu, us, apac)",
    ),
    "a list for an int attribute": (
        lambda ex: ex[0]["eligible"]["attributes"].update(account_age_days=["30"]),
        "experiments[0].eligible.attributes.account_age_days: a whole-number attribute takes a comparison",
    ),
    "a fractional bound for an int attribute": (
        lambda ex: ex[0]["eligible"]["attributes"].update(account_age_days=">= 2.5"),
        "experiments[0].eligible.attributes.account_age_days: a whole-number attribute takes a comparison",
    ),
    "unknown tier": (
        lambda ex: ex[0]["eligible"].update(tiers=["gold"]),
        "experiments[0].eligible.tiers[0]: input should be 'critical', 'standard' or 'best_effort', got 'gold'",
    ),
    "canary with 3 arms": (
        lambda ex: ex[1]["arms"].insert(1, {"name": "strict_too", "weight": 0, "cascade": {"escalate_when": "both"}}),
        "experiments[1].arms: a canary has exactly 2 arms, the treatment then the control; got 3",
    ),
    "canary with the control first": (
        lambda ex: ex[1]["arms"].reverse(),
        "experiments[1].arms[0]: a canary's first arm is the treatment",
    ),
    "split without a control": (
        lambda ex: ex[0]["arms"][0].update(models={"digits_light:2": "digits_heavy:1"}),
        "experiments[0].arms: a split needs exactly one control arm",
    ),
    "a single arm": (lambda ex: ex[3]["arms"].pop(), "experiments[3].arms: expected at least 2 arms, got 1"),
    "overlapping layer ranges": (
        lambda ex: ex.append({**copy.deepcopy(ex[0]), "name": "second_split", "layer_range": [50, 100]}),
        "experiments[4].layer_range: [50, 100) overlaps 'heavy_v1_vs_v2' [0, 100) in layer 'models'",
    ),
    "a layer with two units": (
        lambda ex: ex[3].update(layer="models", layer_range=[90, 100]) or ex[0].update(layer_range=[0, 90]),
        "experiments[3].unit: 'request' differs from 'heavy_v1_vs_v2' (user) in layer 'models'",
    ),
    "an empty layer range": (
        lambda ex: ex[0].update(layer_range=[50, 50]),
        "experiments[0].layer_range: expected [lo, hi) with lo < hi, got [50, 50]",
    ),
    "duplicate experiment names": (
        lambda ex: ex[2].update(name="heavy_v1_vs_v2"),
        "experiments[2].name: 'heavy_v1_vs_v2' is used twice",
    ),
    "duplicate arm names": (_arm(1, name="control"), "experiments[0].arms[1].name: 'control' is used twice"),
    "an arm named mirrored": (_arm(0, name="mirrored"), "experiments[0].arms[0].name: 'mirrored' is reserved"),
    "a bad name": (lambda ex: ex[0].update(name="Heavy"), "experiments[0].name: string should match pattern"),
    "shadow without candidate": (
        lambda ex: ex[2]["shadow"].pop("candidate"),
        "experiments[2].shadow.candidate: required key is missing",
    ),
    "shadow candidate outside the allowlist": (
        lambda ex: ex[2]["shadow"].update(candidate="digits_giant:1"),
        "experiments[2].shadow.candidate: 'digits_giant:1' is not listed under models or experiment_models",
    ),
    "shadow fraction above 1": (
        lambda ex: ex[2]["shadow"].update(fraction=25),
        "experiments[2].shadow.fraction: input should be less than or equal to 1",
    ),
    "shadow with arms": (
        lambda ex: ex[2].update(arms=ex[0]["arms"]),
        "experiments[2].arms: a shadow experiment has no arms",
    ),
    "shadow settings on a split": (
        lambda ex: ex[0].update(shadow=ex[2]["shadow"]),
        "experiments[0].shadow: only for kind shadow",
    ),
    "bandit without settings": (lambda ex: ex[3].pop("bandit"), "experiments[3].bandit: required for kind bandit"),
    "epsilon for thompson": (
        lambda ex: ex[3]["bandit"].update(epsilon=0.1),
        "experiments[3].bandit.epsilon: only for strategy epsilon_greedy, not thompson",
    ),
    "epsilon_greedy without epsilon": (
        lambda ex: ex[3]["bandit"].update(strategy="epsilon_greedy"),
        "experiments[3].bandit.epsilon: required for strategy epsilon_greedy",
    ),
    "unknown kind": (
        lambda ex: ex[0].update(kind="ab"),
        "experiments[0].kind: input should be 'split', 'canary', 'bandit' or 'shadow', got 'ab'",
    ),
    "threshold above 1": (
        lambda ex: ex[1]["arms"][0]["cascade"]["thresholds"].update(standard=95),
        "experiments[1].arms[0].cascade.thresholds.standard: input should be less than or equal to 1",
    ),
    "threshold for an unknown tier": (
        lambda ex: ex[1]["arms"][0]["cascade"]["thresholds"].update(gold=0.5),
        "experiments[1].arms[0].cascade.thresholds.gold: input should be 'critical', 'standard' or 'best_effort'",
    ),
    "unknown escalate_when": (
        lambda ex: ex[1]["arms"][0]["cascade"].update(escalate_when="sometimes"),
        "experiments[1].arms[0].cascade.escalate_when: input should be 'threshold', 'learned', 'either' or 'both'",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_every_mistake_names_its_key(mistake):
    change, expected = MISTAKES[mistake]
    with pytest.raises(ExperimentSpecError) as raised:
        parse_experiments(_with(change), POLICY)
    assert str(raised.value).startswith(expected), str(raised.value)


def test_the_file_itself_must_be_a_mapping_of_experiments():
    with pytest.raises(ExperimentSpecError, match=r"^experiments: input should be a list"):
        parse_experiments({"experiments": {"name": "x"}}, POLICY)
    with pytest.raises(ExperimentSpecError, match=r"^trials: unknown key; expected one of experiments"):
        parse_experiments({"trials": []}, POLICY)
    with pytest.raises(ExperimentSpecError, match=r"^experiments file: input should be a valid dictionary"):
        parse_experiments(["x"], POLICY)


def test_learned_escalation_needs_the_policys_learned_router():
    data = yaml.safe_load((ROUTER / POLICY_FILE).read_text())
    data["cascade"] = {**data["cascade"], "escalate_when": "threshold"}
    del data["cascade"]["learned_router"]
    without_learned = parse_policy(data)
    change = lambda ex: ex[1]["arms"][0]["cascade"].update(escalate_when="either")  # noqa: E731
    assert parse_experiments(_with(change), POLICY)
    with pytest.raises(ExperimentSpecError, match=r"^experiments\[1\]\.arms\[0\]\.cascade\.escalate_when: 'either'"):
        parse_experiments(_with(change), without_learned)


def test_load_names_the_file(tmp_path: Path):
    path = tmp_path / EXPERIMENTS_FILE
    path.write_text(yaml.safe_dump(_with(lambda ex: ex[0]["arms"][0].update(weight=40))))
    with pytest.raises(ExperimentSpecError, match=rf"^{path}: experiments\[0\]\.arms: weights sum to 90"):
        load_experiments(path, POLICY)
    path.write_text("experiments: [unclosed")
    with pytest.raises(ExperimentSpecError, match=rf"^{path}: cannot read the experiments"):
        load_experiments(path, POLICY)
    with pytest.raises(ExperimentSpecError, match="cannot read the experiments"):
        load_experiments(tmp_path / "missing.yaml", POLICY)


def test_the_models_are_frozen():
    spec = parse_experiments(EXAMPLES, POLICY)
    with pytest.raises(ValueError, match="frozen"):
        spec.experiments[0].name = "other"  # type: ignore[misc]


def test_the_readme_example_has_one_experiment_of_each_kind_and_validates():
    readme = (DEFAULT_REPOSITORY.parent / "README.md").read_text()
    block = re.search(r"```yaml\n(experiments:.*?)```", readme, re.S)
    assert block, "README.md has no experiments example"
    spec = parse_experiments(yaml.safe_load(block.group(1)), POLICY)
    assert sorted(e.kind for e in spec.experiments) == ["bandit", "canary", "shadow", "split"]
