"""The router's custom metrics on Triton's metrics port: breaker states, answers per route and outcome, reloads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import triton_python_backend_utils as pb_utils

from tierserve.circuit_breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from tierserve.routing import Answer

BREAKER_VALUES = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}


class RouterMetrics:
    """tierserve_breaker_state (0 closed, 1 half-open, 2 open), tierserve_answers_total and
    tierserve_model_reloads_total."""

    def __init__(self, models: Iterable[str]) -> None:
        breaker = pb_utils.MetricFamily("tierserve_breaker_state",
                                        "Circuit breaker per downstream model: 0 closed, 1 half-open, 2 open",
                                        pb_utils.MetricFamily.GAUGE)
        answers = pb_utils.MetricFamily("tierserve_answers_total",
                                        "Rows answered by the router, by the model that answered and whether the "
                                        "first choice answered (direct) or a fallback did",
                                        pb_utils.MetricFamily.COUNTER)
        reloads = pb_utils.MetricFamily("tierserve_model_reloads_total",
                                        "Models reloaded by the router after their stub died",
                                        pb_utils.MetricFamily.COUNTER)
        self._families = (breaker, answers, reloads)  # a family must outlive its metrics
        self._breaker = {m: breaker.Metric(labels={"model": m}) for m in models}
        self._answers_family = answers
        self._answers: dict[tuple[str, str], object] = {}
        self._reloads_family = reloads
        self._reloads: dict[str, object] = {}

    def observe(self, breakers: Mapping[str, CircuitBreaker], answers: list[Answer | str]) -> None:
        for model, breaker in breakers.items():
            self._breaker[model].set(BREAKER_VALUES[breaker.state])
        for answer in answers:
            if isinstance(answer, str):
                key = ("none", "failed")
            else:
                key = (answer.route, "fallback" if " error" in answer.path or " timeout" in answer.path
                       or " ejected" in answer.path else "direct")
            if key not in self._answers:
                self._answers[key] = self._answers_family.Metric(labels={"model": key[0], "outcome": key[1]})
            self._answers[key].increment(1)

    def reloaded(self, name: str) -> None:
        if name not in self._reloads:
            self._reloads[name] = self._reloads_family.Metric(labels={"model": name})
        self._reloads[name].increment(1)
