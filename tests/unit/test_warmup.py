"""The first executes of an instance, as many as the config's warm-up samples add up to, are warm-up."""

from __future__ import annotations

from tierserve.warmup import WarmUp


def test_warm_up_executes_are_counted_from_the_config():
    warm_up = WarmUp({"model_warmup": [{"name": "a", "count": 2}, {"name": "b"}]})
    assert [warm_up.take() for _ in range(5)] == [True, True, True, False, False]


def test_a_model_without_warm_up_samples_is_never_warming_up():
    assert WarmUp({}).take() is False
