"""Fault specs are read strictly from model parameters; dead stubs are recognised; reloads are rate-limited."""

from __future__ import annotations

import pytest

from tierserve.faults import FaultConfigError, FaultInjector, FaultSpec, refuse_faults
from tierserve.healing import Healer, ReloadLog, is_dead_stub


def test_no_fault_parameters_means_no_faults():
    spec = FaultSpec.from_parameters({"other": "x"})
    assert spec == FaultSpec() and not spec.active


def test_fault_parameters_round_trip():
    spec = FaultSpec(latency_ms=50, error_rate=0.25, hard_failure=True)
    assert FaultSpec.from_parameters(spec.to_parameters()) == spec


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"fault_latency_ms": "slow"}, "parameter fault_latency_ms must be a number, got 'slow'"),
        ({"fault_error_rate": "1.5"}, "parameter fault_error_rate must be from 0 to 1, got '1.5'"),
        ({"fault_latency_ms": "-1"}, "parameter fault_latency_ms must be from 0 to 60000, got '-1'"),
        ({"fault_hard_failure": "yes"}, "parameter fault_hard_failure must be true or false, got 'yes'"),
    ],
)
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
    assert is_dead_stub(
        "Failed to process the request(s) for model 'digits_light_0_0', message: "
        "Stub process 'digits_light_0_0' is not healthy."
    )
    assert not is_dead_stub("digits_light:1: injected fault: hard failure")


DEAD = "Stub process 'digits_light_0_0' is not healthy."


@pytest.fixture
def healing(tmp_path) -> tuple[Healer, list, list, list]:
    now = [10.0]
    trips, reloads = [], []
    healer = Healer(
        5.0,
        ReloadLog(tmp_path),
        trip=lambda model, why: trips.append((model, why)),
        reload=reloads.append,
        clock=lambda: now[0],
    )
    return healer, trips, reloads, now


def test_a_dead_stub_ejects_the_model_and_reloads_it(healing):
    healer, trips, reloads, _ = healing
    assert healer.model_down("digits_light:1", DEAD, sent_at=9.9)
    assert trips == [("digits_light:1", f"model down: {DEAD}")]
    assert reloads == ["digits_light"]


def test_other_errors_are_not_a_dead_stub(healing):
    healer, trips, reloads, _ = healing
    assert not healer.model_down("digits_light:1", "injected fault: hard failure", sent_at=9.9)
    assert trips == [] and reloads == []


def test_errors_from_calls_sent_before_the_reload_are_stale(healing):
    healer, trips, reloads, now = healing
    healer.model_down("digits_light:1", DEAD, sent_at=9.9)
    now[0] = 10.5
    assert not healer.model_down("digits_light:1", DEAD, sent_at=9.95), "about the old stub"
    assert len(trips) == 1 and reloads == ["digits_light"]


def test_reloads_are_rate_limited_per_model_but_a_new_death_still_ejects(healing):
    healer, trips, reloads, now = healing
    healer.model_down("digits_light:1", DEAD, sent_at=9.9)
    now[0] = 12.0
    assert healer.model_down("digits_light:1", DEAD, sent_at=11.0)
    assert len(trips) == 2 and reloads == ["digits_light"], "ejected again, but no second reload yet"
    healer.model_down("digits_heavy:2", DEAD, sent_at=11.0)
    assert reloads == ["digits_light", "digits_heavy"]
    now[0] = 15.0
    healer.model_down("digits_light:1", DEAD, sent_at=14.0)
    assert reloads == ["digits_light", "digits_heavy", "digits_light"]


def test_two_router_instances_sharing_the_log_reload_a_dead_model_once(tmp_path):
    """Each router instance has its own Healer; the log they share makes one reload of a death."""
    reloads: list[str] = []
    instances = [
        Healer(5.0, ReloadLog(tmp_path), trip=lambda model, why: None, reload=reloads.append, clock=lambda: 10.0)
        for _ in range(2)
    ]
    assert instances[0].model_down("digits_light:1", DEAD, sent_at=9.0)
    assert not instances[1].model_down("digits_light:1", DEAD, sent_at=9.5), "stale for the second instance"
    assert reloads == ["digits_light"]


def test_the_reload_log_says_whether_a_reload_runs_until_its_reloader_says_it_ended(tmp_path):
    log = ReloadLog(tmp_path)
    assert not log.in_progress("digits_heavy", 10.0, 30.0), "never reloaded"
    assert log.claim("digits_heavy", sent_at=9.0, now=10.0, min_interval_s=5.0) == "reload"
    assert log.in_progress("digits_heavy", 11.0, 30.0)
    assert not log.in_progress("digits_heavy", 41.0, 30.0), "a reloader that never said it ended is waited 30 s"
    log.finish("digits_heavy", 12.0)
    assert not log.in_progress("digits_heavy", 12.5, 30.0)
    # the record still rate-limits and still tells stale errors apart after it ended
    assert log.claim("digits_heavy", sent_at=9.5, now=13.0, min_interval_s=5.0) == "stale"
    assert log.claim("digits_heavy", sent_at=12.8, now=13.0, min_interval_s=5.0) == "recent"
    assert log.claim("digits_heavy", sent_at=16.0, now=16.0, min_interval_s=5.0) == "reload"
    assert log.in_progress("digits_heavy", 16.5, 30.0), "a new reload runs until it ends in turn"


def test_a_dead_stub_met_during_someone_elses_reload_waits_for_it(tmp_path):
    log, awaited, reloads = ReloadLog(tmp_path), [], []
    assert log.claim("digits_heavy", sent_at=9.0, now=10.0, min_interval_s=5.0) == "reload"  # another instance's
    healer = Healer(5.0, log, lambda model, why: None, reloads.append, clock=lambda: 10.5, await_reload=awaited.append)
    assert healer.model_down("digits_heavy:3", "Stub process 'digits_heavy_0_0' is not healthy.", sent_at=10.2)
    assert reloads == [] and awaited == ["digits_heavy"]
    assert not healer.model_down("digits_heavy:3", "Stub process 'x' is not healthy.", sent_at=9.5)  # stale
    assert awaited == ["digits_heavy", "digits_heavy"], "a stale error during the reload waits for it too"
    log.finish("digits_heavy", 11.0)
    healer.model_down("digits_heavy:3", "Stub process 'x' is not healthy.", sent_at=10.8)
    assert len(awaited) == 2, "once the reload ended there is nothing to wait for"


def test_a_model_without_an_injector_refuses_fault_parameters_naming_them():
    refuse_faults("router", {"parameters": {"promotions": {"string_value": "{}"}}})  # no fault_* key: taken
    refuse_faults("router", {})
    with pytest.raises(FaultConfigError, match=r"^router takes no fault injection \(fault_error_rate\): drills are"):
        refuse_faults("router", {"parameters": {"fault_error_rate": {"string_value": "0"}}})
