"""Fault specs are read strictly from model parameters; dead stubs are recognised; reloads are rate-limited."""

from __future__ import annotations

import pytest

from tierserve.faults import FaultConfigError, FaultInjector, FaultSpec
from tierserve.healing import ReloadLimiter, is_dead_stub


def test_no_fault_parameters_means_no_faults():
    spec = FaultSpec.from_parameters({"other": "x"})
    assert spec == FaultSpec() and not spec.active


def test_fault_parameters_round_trip():
    spec = FaultSpec(latency_ms=50, error_rate=0.25, hard_failure=True)
    assert FaultSpec.from_parameters(spec.to_parameters()) == spec


@pytest.mark.parametrize(("parameters", "message"), [
    ({"fault_latency_ms": "slow"}, "parameter fault_latency_ms must be a number, got 'slow'"),
    ({"fault_error_rate": "1.5"}, "parameter fault_error_rate must be from 0 to 1, got '1.5'"),
    ({"fault_latency_ms": "-1"}, "parameter fault_latency_ms must be from 0 to 60000, got '-1'"),
    ({"fault_hard_failure": "yes"}, "parameter fault_hard_failure must be true or false, got 'yes'"),
])
def test_bad_fault_parameters_are_named(parameters, message):
    with pytest.raises(FaultConfigError) as caught:
        FaultSpec.from_parameters(parameters)
    assert str(caught.value) == message


def test_the_error_rate_fails_about_that_share_of_batches_reproducibly():
    injector = FaultInjector(FaultSpec(error_rate=0.3), seed=1)
    failures = [injector.failure() for _ in range(1000)]
    assert 250 < sum(f is not None for f in failures) < 350
    again = FaultInjector(FaultSpec(error_rate=0.3), seed=1)
    assert [again.failure() for _ in range(1000)] == failures


def test_a_hard_failure_fails_every_batch():
    injector = FaultInjector(FaultSpec(hard_failure=True))
    assert all(injector.failure() == "injected fault: hard failure" for _ in range(10))


def test_dead_stub_messages_are_recognised():
    assert is_dead_stub("Failed to process the request(s) for model 'digits_light_0_0', message: "
                        "Stub process 'digits_light_0_0' is not healthy.")
    assert not is_dead_stub("digits_light:1: injected fault: hard failure")


def test_reloads_are_rate_limited_per_model():
    now = [0.0]
    limiter = ReloadLimiter(5.0, clock=lambda: now[0])
    assert limiter.allow("digits_light")
    assert not limiter.allow("digits_light")
    assert limiter.allow("digits_heavy")
    now[0] = 5.0
    assert limiter.allow("digits_light")
