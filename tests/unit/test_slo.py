"""Error-budget burn: the share of SLO misses over the budgeted share, in a sliding window."""

from __future__ import annotations

import pytest

from tierserve.slo import BudgetBurn, TierSlo


def test_burn_is_misses_over_budget_in_the_window():
    now = [0.0]
    burn = BudgetBurn(TierSlo(slo_ms=100, target=0.99), window_s=10, clock=lambda: now[0])
    assert burn.rate() == 0.0
    for i in range(100):
        burn.record(missed=i < 2)
    assert burn.rate() == pytest.approx(2.0), "2% misses burn a 1% budget twice as fast"
    now[0] = 11.0
    assert burn.record(missed=False) == 0.0, "old outcomes leave the window"
