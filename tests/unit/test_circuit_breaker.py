"""Breakers eject on consecutive failures, failure percentage or slowness, probe when the time is up."""

from __future__ import annotations

import pytest

from tierserve.circuit_breaker import CLOSED, HALF_OPEN, OPEN, BreakerSettings, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _breaker(clock: Clock, **settings) -> CircuitBreaker:
    return CircuitBreaker(
        BreakerSettings(
            **{"consecutive_errors": 3, "base_ejection_time_s": 2.0, "max_ejection_time_s": 5.0, **settings}
        ),
        clock,
    )


def test_consecutive_failures_eject_and_a_success_resets_the_count(clock: Clock):
    breaker = _breaker(clock)
    for ok in (False, False, True, False, False):
        breaker.record(ok, 0.001)
    assert breaker.state == CLOSED
    breaker.record(False, 0.001)
    assert breaker.state == OPEN and not breaker.allow()
    assert breaker.describe() == "breaker open (3 consecutive failed calls; ejection 1, 2.0 s left)"


def test_after_the_ejection_time_one_probe_decides(clock: Clock):
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record(False, 0.001)
    clock.now += 2.0
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow(), "only one probe at a time"
    breaker.record(True, 0.001)
    assert breaker.state == CLOSED and breaker.allow()


def test_repeated_ejections_last_longer_up_to_the_maximum(clock: Clock):
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record(False, 0.001)
    lengths = []
    for _ in range(4):
        start = clock.now
        while not breaker.allow():
            clock.now += 0.5
        lengths.append(clock.now - start)
        breaker.record(False, 0.001)  # the probe fails: ejected again
    assert lengths == [2.0, 4.0, 5.0, 5.0]
    assert breaker.why == "half-open probe failed"


def test_the_multiplier_starts_over_after_a_long_healthy_spell(clock: Clock):
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record(False, 0.001)
    clock.now += 2.0
    breaker.allow()
    breaker.record(True, 0.001)
    clock.now += 60.0
    for _ in range(3):
        breaker.record(False, 0.001)
    assert breaker.ejections == 1


def test_a_failure_percentage_over_the_window_ejects(clock: Clock):
    breaker = _breaker(
        clock,
        consecutive_errors=100,
        failure_percentage_threshold=50,
        failure_percentage_request_volume=10,
        interval_s=10,
    )
    for i in range(9):
        breaker.record(i % 2 == 0, 0.001)  # 4 failures of 9: under the volume
    assert breaker.state == CLOSED
    breaker.record(False, 0.001)  # 5 of 10
    assert breaker.state == OPEN and breaker.why == "5 of 10 calls failed in 10 s"


def test_old_calls_leave_the_window(clock: Clock):
    breaker = _breaker(clock, consecutive_errors=100, failure_percentage_request_volume=4, interval_s=10)
    for _ in range(3):
        breaker.record(False, 0.001)
        breaker.record(True, 0.001)
    clock.now += 11
    breaker.record(False, 0.001)
    assert breaker.state == CLOSED


def test_slow_calls_count_as_failures(clock: Clock):
    breaker = _breaker(clock, latency_threshold_ms=100)
    for _ in range(3):
        breaker.record(True, 0.2)
    assert breaker.state == OPEN
    clock.now += 2
    breaker.allow()
    breaker.record(True, 0.2)
    assert breaker.state == OPEN and breaker.why == "half-open probe was slow"


def test_a_breaker_held_for_a_reload_probes_only_once_released_and_then_at_once(clock: Clock):
    breaker = _breaker(clock)
    breaker.trip("model down: stub gone")
    breaker.hold("reloading digits_heavy")
    clock.now += 10.0  # far past the ejection time: still no probe, the model is loading
    assert breaker.state == OPEN and not breaker.allow()
    assert breaker.describe() == "breaker open (model down: stub gone; ejection 1, until its reload is done)"
    breaker.release()
    assert breaker.allow() and breaker.state == HALF_OPEN, "the reloaded model is probed at once"
    breaker.record(True, 0.001)
    assert breaker.state == CLOSED and breaker.ejections == 1


def test_a_breaker_closed_when_held_closes_again_and_late_outcomes_are_ignored_while_held(clock: Clock):
    breaker = _breaker(clock)
    breaker.hold("digits_heavy is being reloaded elsewhere")  # no failure seen here: the hold alone ejects
    assert breaker.state == OPEN and not breaker.allow() and breaker.why == "digits_heavy is being reloaded elsewhere"
    breaker.record(True, 0.001)  # a late answer of a call sent before the reload: about the old process
    assert breaker.state == OPEN and not breaker.allow()
    breaker.release()
    assert breaker.state == CLOSED and breaker.allow() and breaker.ejections == 0, "no probe needed"


def test_a_held_breaker_whose_probe_fails_after_the_release_ejects_again_for_longer(clock: Clock):
    breaker = _breaker(clock)
    breaker.trip("model down: stub gone")
    breaker.hold("digits_heavy is being reloaded")
    clock.now += 0.5
    breaker.release()
    assert breaker.allow()
    breaker.record(False, 0.001)  # the reload failed: the probe says so, and the next ejection is longer
    assert breaker.state == OPEN and breaker.ejections == 2
    breaker.release()  # a release without a hold changes nothing
    assert not breaker.allow()
