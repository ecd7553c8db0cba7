"""Error-budget burn: the share of SLO misses over the budgeted share, in a sliding window."""

from __future__ import annotations

import pytest

from tierserve.slo import BudgetBurn, TierSlo


def test_burn_is_misses_over_budget_in_the_window():
    now = [0.0]
    burn = BudgetBurn(TierSlo(slo_ms=100, target=0.99), window_s=10, clock=lambda: now[0])
    assert burn.rate() == 0.0
    for i in range(100):
        burn.record(met=int(i >= 2), missed=int(i < 2))
    assert burn.rate() == pytest.approx(2.0), "2% misses burn a 1% budget twice as fast"
    now[0] = 11.0
    assert burn.record(met=1) == 0.0, "old outcomes leave the window"


def test_burn_counts_batches_and_forgets_slice_by_slice():
    now = [0.0]
    burn = BudgetBurn(TierSlo(slo_ms=50, target=0.9), window_s=6, slices=6, clock=lambda: now[0])
    burn.record(missed=3)
    now[0] = 3.5
    assert burn.record(met=27) == pytest.approx(1.0), "3 misses in 30 = the 10% budget"
    now[0] = 6.2
    assert burn.record(met=1) == 0.0, "the slice at t=0 left the 6 s window; 28 met remain"
