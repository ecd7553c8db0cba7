"""The learned router's artifact: what it reads, how it is stored, and what happens to one from an older build."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from tierserve.learned_router import ALTERNATES_KEY, INPUTS, LearnedRouter, escalation_inputs, load_learned_routers
from tierserve.resize import source_stats
from tierserve.router_files import LEARNED_ROUTER_FILE, POLICY_FILE, ROUTER_MODEL, STATS_FILE, router_policy
from tierserve.signature import RequestContext, TrainingStats, signatures
from tierserve.tools.build_router import RECIPE, router_artifacts_missing
from tierserve.tools.paths import DEFAULT_REPOSITORY


def _router(hidden: int = 3, seed: int = 0) -> LearnedRouter:
    rng = np.random.default_rng(seed)
    return LearnedRouter(
        rng.normal(size=len(INPUTS)).astype(np.float32),
        rng.uniform(0.5, 2.0, len(INPUTS)).astype(np.float32),
        rng.normal(size=(len(INPUTS), hidden)).astype(np.float32),
        rng.normal(size=hidden).astype(np.float32),
        rng.normal(size=hidden).astype(np.float32),
        0.25,
    )


def _inputs(count: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 16, (count, 8, 8)).astype(np.float32)
    images[0, 0, 0] = np.nan  # a missing pixel reads as blank
    stats = TrainingStats.fit(images, images)
    rows = signatures(images, source_stats(images), [RequestContext()] * count, stats)
    probs = rng.dirichlet(np.ones(10), count).astype(np.float32)
    return escalation_inputs(rows, probs, images)


def test_inputs_are_the_features_the_probabilities_and_the_scaled_pixels() -> None:
    inputs = _inputs(4)
    assert inputs.shape == (4, len(INPUTS))
    assert np.isfinite(inputs).all()
    pixels = inputs[:, INPUTS.index("pixel_0") :]
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels[0, 0] == 0.0


def test_a_stored_router_answers_as_the_one_that_was_stored(tmp_path: Path) -> None:
    learned, inputs = replace(_router(), judges="digits_light:2"), _inputs(5)
    path = tmp_path / LEARNED_ROUTER_FILE
    path.write_text(json.dumps(learned.to_dict()))
    loaded = LearnedRouter.load(path)
    assert loaded.judges == "digits_light:2"
    np.testing.assert_allclose(loaded.wrong_probability(inputs), learned.wrong_probability(inputs), rtol=1e-6)
    probabilities = loaded.wrong_probability(inputs)
    assert probabilities.shape == (5,) and ((probabilities > 0) & (probabilities < 1)).all()


def test_alternates_are_stored_beside_the_router_and_read_back(tmp_path: Path) -> None:
    learned, alternate = replace(_router(), judges="digits_light:2"), replace(_router(seed=1), judges="digits_light:1")
    path = tmp_path / LEARNED_ROUTER_FILE
    path.write_text(json.dumps({**learned.to_dict(), ALTERNATES_KEY: [alternate.to_dict()]}))
    loaded, alternates = load_learned_routers(path)
    assert (loaded.judges, [a.judges for a in alternates]) == ("digits_light:2", ["digits_light:1"])
    inputs = _inputs(4)
    np.testing.assert_allclose(alternates[0].wrong_probability(inputs), alternate.wrong_probability(inputs), rtol=1e-6)
    path.write_text(json.dumps({**learned.to_dict(), ALTERNATES_KEY: {"digits_light:1": alternate.to_dict()}}))
    with pytest.raises(ValueError, match="alternates must be a list: rebuild"):
        load_learned_routers(path)
    path.write_text(json.dumps({**learned.to_dict(), ALTERNATES_KEY: ["digits_light:1"]}))
    with pytest.raises(ValueError, match=r"alternates\[0\] is not a stored learned router: rebuild"):
        load_learned_routers(path)
    path.write_text(json.dumps([learned.to_dict()]))
    with pytest.raises(ValueError, match="is not a stored learned router: rebuild"):
        load_learned_routers(path)
    path.write_text(json.dumps(learned.to_dict()))  # an older build: no alternates
    assert load_learned_routers(path)[1] == ()


def test_the_hidden_layer_is_rectified() -> None:
    # one hidden unit with a weight of -1 on confidence: a positive pre-activation passes, a negative one is cut to 0
    hidden = np.zeros((len(INPUTS), 1), np.float32)
    hidden[INPUTS.index("confidence")] = -1.0
    ones = np.ones(len(INPUTS), np.float32)
    learned = LearnedRouter(0 * ones, ones, hidden, np.zeros(1, np.float32), np.ones(1, np.float32), 0.0)
    inputs = np.zeros((2, len(INPUTS)), np.float32)
    inputs[:, INPUTS.index("confidence")] = [-2.0, 2.0]
    np.testing.assert_allclose(learned.wrong_probability(inputs), [1 / (1 + np.exp(-2.0)), 0.5], rtol=1e-6)


def test_a_router_from_an_older_build_or_recipe_is_refused_and_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / ROUTER_MODEL / "1"
    folder.mkdir(parents=True)
    (folder / STATS_FILE).write_text("{}")
    old = {"features": ["confidence"], "mean": [0.0], "scale": [1.0], "coef": [1.0], "intercept": 0.0}
    (folder / LEARNED_ROUTER_FILE).write_text(json.dumps(old))
    with pytest.raises(ValueError, match="rebuild"):
        LearnedRouter.load(folder / LEARNED_ROUTER_FILE)
    assert router_artifacts_missing(tmp_path)
    shutil.copy(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE, tmp_path / ROUTER_MODEL / POLICY_FILE)
    first = router_policy(tmp_path).cascade.first
    current = replace(_router(), judges=first).to_dict()
    (folder / LEARNED_ROUTER_FILE).write_text(json.dumps({**current, "recipe": asdict(RECIPE)}))
    assert not router_artifacts_missing(tmp_path)
    # the same inputs trained by another recipe (say, more rounds): trained again
    other = asdict(replace(RECIPE, rounds=RECIPE.rounds + 1))
    (folder / LEARNED_ROUTER_FILE).write_text(json.dumps({**current, "recipe": other}))
    assert router_artifacts_missing(tmp_path)
    # trained to judge another first model than the policy's cascade names: trained again
    (folder / LEARNED_ROUTER_FILE).write_text(
        json.dumps({**current, "recipe": asdict(RECIPE), "first_model": "digits_light:1"})
    )
    assert router_artifacts_missing(tmp_path)
    # an older build that did not say which model it judges: refused by the router, trained again by the build
    unsaid = {key: value for key, value in current.items() if key != "first_model"}
    (folder / LEARNED_ROUTER_FILE).write_text(json.dumps({**unsaid, "recipe": asdict(RECIPE)}))
    with pytest.raises(ValueError, match="does not say which first model it judges: rebuild"):
        LearnedRouter.load(folder / LEARNED_ROUTER_FILE)
    assert router_artifacts_missing(tmp_path)
