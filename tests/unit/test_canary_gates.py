"""The canary's gates on synthetic figures: each gate passes, fails and waits for data as its settings say, the
verdict never holds a NaN, and a step without enough traffic fails on traffic once max_step_s has passed."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from pydantic import ValidationError

from tierserve.canary_gates import (
    NO_LATENCY,
    ArmFigures,
    CanaryFigures,
    CanarySettings,
    Decision,
    Gate,
    GateState,
    Histogram,
    judge,
    wilson,
)

BOUNDS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # the router's histogram buckets
SETTINGS = CanarySettings(step_s=10, max_step_s=60, min_rows=100, min_calls=20, min_feedback=50, min_shadow_rows=50)


def latency(ms: float, rows: int) -> Histogram:
    """`rows` rows all in the bucket that holds `ms`."""
    index = next((i for i, bound in enumerate(BOUNDS_S) if ms / 1000 <= bound), len(BOUNDS_S))
    return Histogram(BOUNDS_S, tuple(float(rows) if i == index else 0.0 for i in range(len(BOUNDS_S) + 1)))


def arm(
    rows: int = 500,
    ms: float = 4.0,
    calls: int = 200,
    failures: int = 0,
    feedback: int = 0,
    correct: int = 0,
    model_calls: int = 0,
    call_ms: float = 1.0,
) -> ArmFigures:
    counts = [model_calls // 4 + (i < model_calls % 4) for i in range(4)]  # the step's calls over 4 readings
    readings = tuple((count, count * call_ms / 1000) for count in counts)
    return ArmFigures(rows, latency(ms, rows), calls, failures, feedback, correct, readings)


def figures(**changes) -> CanaryFigures:
    healthy = CanaryFigures(weight=5, elapsed_s=20, treatment=arm(), control=arm(rows=5000, calls=2000))
    return replace(healthy, **changes)


def test_a_healthy_step_passes_once_it_lasted_step_s():
    verdict = judge(figures(), SETTINGS)
    assert verdict.decision == Decision.PASS and verdict.failed is None
    assert verdict.reading(Gate.ERRORS).state == GateState.OK
    assert verdict.reading(Gate.LATENCY).state == GateState.OK
    assert verdict.reading(Gate.ACCURACY).state == GateState.NEEDS_DATA  # judged once feedback arrives
    assert judge(figures(elapsed_s=5), SETTINGS).decision == Decision.WAIT


def test_errors_fail_when_even_the_interval_lies_above_the_limit():
    failing = judge(figures(treatment=arm(calls=40, failures=10)), SETTINGS)
    assert failing.decision == Decision.FAIL and failing.failed.gate == Gate.ERRORS
    assert failing.failed.value == pytest.approx(0.25) and failing.failed.limit == pytest.approx(0.005)
    assert "10/40 rows failed on the candidate" in failing.failed.text
    # one failure in 40 calls is 2.5%, but its 95% interval reaches below the limit: not proof of a bad candidate
    assert judge(figures(treatment=arm(calls=40, failures=1)), SETTINGS).decision == Decision.PASS


def test_errors_compare_with_the_baseline_and_either_limit_may_be_off():
    flaky_baseline = figures(treatment=arm(calls=400, failures=20), control=arm(rows=5000, calls=4000, failures=200))
    absolute_only = SETTINGS.model_copy(update={"max_error_rate": 0.1, "max_error_rate_increase": None})
    assert judge(flaky_baseline, absolute_only).decision == Decision.PASS
    relative_only = SETTINGS.model_copy(update={"max_error_rate": None, "max_error_rate_increase": 0.01})
    assert judge(flaky_baseline, relative_only).decision == Decision.PASS  # 5% vs 5%: no worse than the baseline
    worse = replace(flaky_baseline, treatment=arm(calls=400, failures=60))
    assert judge(worse, relative_only).failed.gate == Gate.ERRORS
    off = SETTINGS.model_copy(update={"max_error_rate": None, "max_error_rate_increase": None})
    assert judge(worse, off).reading(Gate.ERRORS).state == GateState.OFF


def test_an_ejected_candidate_fails_the_error_gate_at_once():
    verdict = judge(figures(treatment=arm(calls=3, failures=3), candidate_ejected=True, elapsed_s=1), SETTINGS)
    assert verdict.decision == Decision.FAIL and verdict.failed.gate == Gate.ERRORS
    assert "circuit breaker" in verdict.failed.text and "3/3 rows failed" in verdict.failed.text


def test_errors_wait_for_rows_sent_to_the_candidate_and_an_idle_baseline_counts_as_none_failed():
    few = figures(treatment=arm(calls=5, failures=0), control=arm(rows=5000, calls=0))
    reading = judge(few, SETTINGS).reading(Gate.ERRORS)
    assert reading.state == GateState.NEEDS_DATA and reading.text == f"5/{SETTINGS.min_calls} rows"
    assert judge(replace(few, candidate_ejected=True), SETTINGS).failed.gate == Gate.ERRORS  # the breaker at once
    # the baseline sent no rows: the candidate's failures are held to the increase over none
    assert "baseline sent no rows" in judge(figures(control=arm(rows=5000, calls=0)), SETTINGS).readings[0].text


def test_the_typical_call_is_the_median_of_the_readings_means_weighted_by_their_calls():
    steady = [(40, 0.12)] * 4  # 40 calls of 3 ms a reading
    stalled = ArmFigures(call_readings=(*steady, (40, 0.12 + 1.0)))  # 200 calls, 1.6 s
    assert stalled.mean_call_ms == pytest.approx(8.0) and stalled.typical_call_ms == pytest.approx(3.0)
    slow = ArmFigures(call_readings=((40, 0.12), (40, 0.4), (40, 0.4)))  # slower on most calls: 10 ms
    assert slow.typical_call_ms == pytest.approx(10.0)
    weighted = ArmFigures(call_readings=((1, 0.5), (100, 0.3), (0, 0.0), (1, 0.5)))  # slow calls alone in readings
    assert weighted.typical_call_ms == pytest.approx(3.0)
    # fewer than CALL_READINGS readings with calls: not judged yet (the median of one reading is its mean)
    assert ArmFigures(call_readings=((40, 1.12), (0, 0.0))).typical_call_ms is None


def test_latency_fails_past_the_ratio_and_the_slack():
    slow = judge(figures(treatment=arm(ms=40)), SETTINGS)
    assert slow.decision == Decision.FAIL and slow.failed.gate == Gate.LATENCY
    assert slow.failed.value > slow.failed.limit and "p99" in slow.failed.text
    # 4 ms against 2 ms is twice the control, but within the 5 ms slack the coarse buckets need
    assert judge(figures(treatment=arm(ms=4), control=arm(rows=5000, ms=1.5)), SETTINGS).decision == Decision.PASS
    off = SETTINGS.model_copy(update={"max_latency_ratio": None})
    assert judge(figures(treatment=arm(ms=40)), off).decision == Decision.PASS


def tail(ms: float, rows: int, slow_ms: float, slow: int) -> Histogram:
    """`rows` rows of which `slow` are in the bucket of `slow_ms` and the rest in the bucket of `ms`."""
    counts = [a + b for a, b in zip(latency(ms, rows - slow).counts, latency(slow_ms, slow).counts, strict=True)]
    return Histogram(BOUNDS_S, tuple(counts))


def test_a_few_slow_rows_are_not_proof_of_a_slow_candidate_but_a_slow_tail_is():
    # 2 rows of 100 stalled (a busy box): the p99 is theirs, 150 ms against a 9 ms limit, yet 2% of 100 rows is
    # not more than 1% with 95% confidence. The step passes; the p99 alone rolled such candidates back.
    stalled = figures(treatment=replace(arm(rows=100), latency=tail(4, 100, 155, 2)))
    assert stalled.treatment.p99_ms == pytest.approx(150)
    reading = judge(stalled, SETTINGS).reading(Gate.LATENCY)
    assert reading.state == GateState.OK and reading.value > reading.limit
    assert "2/100 rows above it, at least 0.6%; over 1.0% fails" in reading.text
    # the same 2% of 1,000 rows is: the tail is the candidate's
    slow_tail = judge(figures(treatment=replace(arm(rows=1000), latency=tail(4, 1000, 155, 20))), SETTINGS)
    assert slow_tail.decision == Decision.FAIL and slow_tail.failed.gate == Gate.LATENCY
    assert "20/1000 rows above it, at least 1.3%" in slow_tail.failed.text
    # and 5 of 100 already is
    assert judge(figures(treatment=replace(arm(rows=100), latency=tail(4, 100, 155, 5))), SETTINGS).failed


def test_rows_above_a_latency_agree_with_the_quantile_of_the_same_histogram():
    histograms = [
        Histogram(BOUNDS_S, (0, 0, 0, 99, 0, 1, 0, 0, 0, 0, 0)),
        Histogram(BOUNDS_S, (3, 10, 40, 30, 9, 4, 2, 1, 1, 0, 0)),
        Histogram(BOUNDS_S, (0, 0, 50, 0, 0, 0, 0, 0, 0, 0, 3)),
    ]
    for histogram in histograms:
        for q in (0.5, 0.9, 0.99):
            at = histogram.quantile_ms(q)
            if at < 1000:  # a quantile among the rows above every bound is reported as the last bound
                assert histogram.rows_above(at) == pytest.approx((1 - q) * histogram.total), (histogram, q)
            for ms in (0.5, 3.0, 7.5, 60.0, 999.0):
                above = histogram.rows_above(ms) > (1 - q) * histogram.total + 1e-9
                assert above == (at > ms + 1e-9), (histogram, q, ms)
    assert Histogram(BOUNDS_S, (0,) * 10 + (7,)).rows_above(999) == 7  # above every bound: above any lower latency
    assert Histogram(BOUNDS_S, (0,) * 10 + (7,)).rows_above(1000) == 0  # reported as the last bound, as p99 is
    assert NO_LATENCY.rows_above(5) == 0


def test_a_slow_candidate_fails_on_its_call_durations_even_when_both_arms_are_slow():
    # the router answers an execute's rows together: control rows that shared executes with slow calls are slow too
    both_slow = figures(
        treatment=arm(ms=400, model_calls=50, call_ms=300), control=arm(rows=5000, ms=400, model_calls=900)
    )
    verdict = judge(both_slow, SETTINGS)
    assert verdict.failed.gate == Gate.LATENCY and verdict.failed.value == pytest.approx(300)
    assert verdict.failed.limit == pytest.approx(6.0)  # 1 ms + 5 ms slack
    assert "calls 300.0 ms vs baseline 1.0 ms" in verdict.failed.text
    few_calls = replace(both_slow, treatment=arm(ms=400, model_calls=5, call_ms=300))
    assert judge(few_calls, SETTINGS).decision == Decision.PASS  # too few calls: the p99 alone judges
    early = replace(both_slow, treatment=arm(rows=10, ms=400, model_calls=50, call_ms=300), elapsed_s=1)
    assert judge(early, SETTINGS).failed.gate == Gate.LATENCY  # slow calls fail before the rows are there


def test_latency_says_which_step_its_control_comes_from():
    verdict = judge(figures(weight=100, treatment=arm(ms=40), control_weight=50), SETTINGS)
    assert "control at 50%" in verdict.failed.text


def test_too_little_data_waits_and_then_fails_on_traffic():
    sparse = figures(treatment=arm(rows=30, calls=5))
    waiting = judge(sparse, SETTINGS)
    assert waiting.decision == Decision.WAIT
    assert waiting.reading(Gate.ERRORS).state == GateState.NEEDS_DATA
    assert waiting.reading(Gate.LATENCY).state == GateState.NEEDS_DATA
    verdict = judge(replace(sparse, elapsed_s=60), SETTINGS)
    assert verdict.decision == Decision.FAIL and verdict.failed.gate == Gate.TRAFFIC
    assert "5/20 rows" in verdict.failed.text and "rows 30 treatment, 5000 control, of 100" in verdict.failed.text
    # the control arm too must have its rows
    assert judge(figures(control=arm(rows=10)), SETTINGS).decision == Decision.WAIT


def test_accuracy_is_judged_once_enough_feedback_arrived():
    worse = figures(treatment=arm(feedback=200, correct=150), control=arm(rows=5000, feedback=2000, correct=1900))
    verdict = judge(worse, SETTINGS)
    assert verdict.failed.gate == Gate.ACCURACY and verdict.failed.value == pytest.approx(0.75)
    assert verdict.failed.limit == pytest.approx(0.93)
    early = replace(worse, treatment=arm(feedback=40, correct=20))
    assert judge(early, SETTINGS).decision == Decision.PASS  # too little feedback: not judged, not waited for
    as_good = replace(worse, treatment=arm(feedback=200, correct=188))
    assert judge(as_good, SETTINGS).reading(Gate.ACCURACY).state == GateState.OK


def test_shadow_agreement_is_judged_once_enough_rows_were_compared():
    verdict = judge(figures(shadow_agree=40, shadow_disagree=60), SETTINGS)
    assert verdict.failed.gate == Gate.SHADOW and verdict.failed.value == pytest.approx(0.4)
    assert judge(figures(shadow_agree=10, shadow_disagree=10), SETTINGS).decision == Decision.PASS
    assert judge(figures(shadow_agree=97, shadow_disagree=3), SETTINGS).reading(Gate.SHADOW).state == GateState.OK
    no_shadow = SETTINGS.model_copy(update={"shadow_fraction": 0.0})
    assert judge(figures(shadow_agree=40, shadow_disagree=60), no_shadow).reading(Gate.SHADOW).state == GateState.OFF


def test_no_figure_is_ever_nan_not_even_without_any_data():
    empty = CanaryFigures(weight=1, elapsed_s=0, treatment=ArmFigures(), control=ArmFigures())
    verdict = judge(empty, SETTINGS)
    assert verdict.decision == Decision.WAIT
    for reading in verdict.readings:
        for number in (reading.value, reading.limit):
            assert number is None or math.isfinite(number), reading
    assert ArmFigures().p99_ms is None and ArmFigures().error_rate is None and ArmFigures().accuracy is None
    assert wilson(0, 0) is None
    lost = judge(replace(empty, elapsed_s=60), SETTINGS)
    assert lost.failed.gate == Gate.TRAFFIC and math.isfinite(lost.failed.value)


def test_the_p99_interpolates_within_its_bucket_as_prometheus_does():
    histogram = Histogram(BOUNDS_S, (0, 0, 0, 99, 0, 1, 0, 0, 0, 0, 0))
    assert histogram.quantile_ms(0.5) == pytest.approx(5 + 5 * 50 / 99)
    assert histogram.quantile_ms(0.995) == pytest.approx(20 + 30 * 0.5)
    assert Histogram(BOUNDS_S, (0,) * 10 + (7,)).quantile_ms(0.99) == 1000.0  # above every bound: the last bound
    with pytest.raises(ValueError, match="need 11 counts"):
        Histogram(BOUNDS_S, (1, 2))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"steps": (5, 1, 100)}, "steps must increase"),
        ({"steps": (100,)}, "first step must be below 100%"),
        ({"steps": (0, 50)}, "steps.0"),
        ({"steps": (1, 101)}, "steps.1"),
        ({"max_step_s": 5, "step_s": 10}, "max_step_s (5) must be at least step_s (10)"),
        ({"max_error_rate": 1.5}, "max_error_rate"),
        ({"stpes": (1, 2)}, "stpes"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(changes: dict, named: str):
    with pytest.raises(ValidationError, match=named.replace("(", r"\(").replace(")", r"\)")):
        CanarySettings(**changes)
