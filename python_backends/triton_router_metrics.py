"""The router's custom metrics on Triton's metrics port, per tier and route, plus breakers and reloads; and the
opening of an inference log, which the router and `feedback` share."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.circuit_breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from tierserve.experiment_stats import ShadowOutcome
from tierserve.experimenter import RowPlan
from tierserve.guarded_store import GuardedStore
from tierserve.inference_log import InferenceLog, InferenceLogSettings
from tierserve.model_states import ModelStates
from tierserve.routing import Answer, Hop, RowResult, Shed
from tierserve.slo import BudgetBurn, TierSlo

BREAKER_VALUES = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}
LATENCY_BUCKETS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


class MetricBatch:
    """Metric updates gathered in memory, sent to tritonserver by flush() from a thread of their own. Each update is a
    message to tritonserver (~0.15 ms, measured with py-spy: five per execute were half of the router's time), so the
    hot path only adds to a counter, sets a gauge or keeps an observation here; a flush sends one message per series
    that changed (per histogram bucket that grew). Scrapes see an update once the next flush has sent it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[_Series, float | list[float]] = {}

    def add(self, series: _Series, value: float) -> None:
        with self._lock:
            self._pending[series] = series.combine(self._pending.get(series), value)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for series, value in pending.items():
            series.send(value)


class _Series:
    """One labelled series of a family; `combine` folds an update into what is pending, `send` sends it."""

    def __init__(self, batch: MetricBatch, metrics: list) -> None:
        self._batch = batch
        self._metrics = metrics

    def combine(self, pending, value: float):
        raise NotImplementedError

    def send(self, value) -> None:
        raise NotImplementedError


class _Counter(_Series):
    def increment(self, value: float) -> None:
        self._batch.add(self, value)

    def combine(self, pending: float | None, value: float) -> float:
        return (pending or 0.0) + value

    def send(self, value: float) -> None:
        self._metrics[0].increment(value)


class _Gauge(_Series):
    """Sent only when its value changed: Triton 2.51's python_backend waits for a gauge's `set` holding the stub's
    GIL (unlike a counter's `increment`), so every thread of the stub, executes included, stops for each one sent;
    the router sets its gauges (breakers, load) on every execute and every queue reading, mostly to the same value."""

    def __init__(self, batch: MetricBatch, metrics: list) -> None:
        super().__init__(batch, metrics)
        self._sent: float | None = None

    def set(self, value: float) -> None:
        self._batch.add(self, value)

    def combine(self, pending: float | None, value: float) -> float:
        return value

    def send(self, value: float) -> None:
        if value != self._sent:
            self._metrics[0].set(value)
            self._sent = value


class _Histogram(_Series):
    """Prometheus's histogram as counters (`<name>_bucket{le}`, `<name>_sum`, `<name>_count`): Triton's own
    histogram takes one message per observation, these one per bucket that grew per flush."""

    def __init__(self, batch: MetricBatch, metrics: list, bounds: list[float]) -> None:
        super().__init__(batch, metrics)
        self._bounds = bounds

    def observe(self, value: float) -> None:
        self._batch.add(self, value)

    def combine(self, pending: list[float] | None, value: float) -> list[float]:
        observed = pending if pending is not None else []
        observed.append(value)  # in place: a copy per observation grew with the flush interval's traffic
        return observed

    def send(self, values: list[float]) -> None:
        *buckets, total, count = self._metrics
        observed = np.sort(np.asarray(values))
        for bucket, grew in zip(buckets, np.searchsorted(observed, [*self._bounds, np.inf], side="right"), strict=True):
            if grew:
                bucket.increment(float(grew))
        total.increment(float(observed.sum()))
        count.increment(float(len(observed)))


class LabelledFamily:
    """A metric family whose labelled series are created on first use; updates go through `batch` (MetricBatch)."""

    def __init__(
        self,
        name: str,
        description: str,
        kind: object,
        instance: str,
        batch: MetricBatch,
        buckets: list[float] | None = None,
    ) -> None:
        self._kind, self._instance, self._batch, self._buckets = kind, instance, batch, buckets
        if buckets is None:
            self._families = [pb_utils.MetricFamily(name, description, kind)]
        else:  # a histogram, as counters
            counter = pb_utils.MetricFamily.COUNTER
            self._families = [
                pb_utils.MetricFamily(f"{name}_bucket", f"{description} (histogram buckets)", counter),
                pb_utils.MetricFamily(f"{name}_sum", f"{description} (sum)", counter),
                pb_utils.MetricFamily(f"{name}_count", f"{description} (count)", counter),
            ]
        self._series: dict[tuple[tuple[str, str], ...], _Series] = {}

    def __call__(self, **labels: str):
        key = tuple(sorted(labels.items()))
        if key not in self._series:
            labels = {**labels, "instance": self._instance}
            if self._buckets is not None:
                bucket, total, count = self._families
                les = [*(f"{bound:g}" for bound in self._buckets), "+Inf"]
                metrics = [bucket.Metric(labels={**labels, "le": le}) for le in les]
                series = _Histogram(
                    self._batch, [*metrics, total.Metric(labels=labels), count.Metric(labels=labels)], self._buckets
                )
            else:
                metric = self._families[0].Metric(labels=labels)
                series = (_Gauge if self._kind == pb_utils.MetricFamily.GAUGE else _Counter)(self._batch, [metric])
            self._series[key] = series
        return self._series[key]


class StateStoreMetrics:
    """tierserve_state_store_up (1 while the state store answers this instance) and
    tierserve_state_store_errors_total{operation} (calls that failed, or were not made because the store was
    down), from a GuardedStore; the router and `feedback` both report them."""

    def __init__(self, instance: str, batch: MetricBatch) -> None:
        kind = pb_utils.MetricFamily
        self.up = LabelledFamily(
            "tierserve_state_store_up",
            "1 while the state store answers, 0 from a failed call until it answers again",
            kind.GAUGE,
            instance,
            batch,
        )
        self.errors = LabelledFamily(
            "tierserve_state_store_errors_total",
            "State store calls that failed, or were not made because the store was down, by operation",
            kind.COUNTER,
            instance,
            batch,
        )
        self._sent: Counter[str] = Counter()
        self._up: bool | None = None

    def update(self, store: GuardedStore) -> None:
        """Send what grew since the last update, and the gauge when it changed."""
        for operation, total in store.errors().items():
            if total > self._sent[operation]:
                self.errors(operation=operation).increment(total - self._sent[operation])
                self._sent[operation] = total
        if store.up != self._up:
            self._up = store.up
            self.up().set(1.0 if store.up else 0.0)


def open_inference_log(settings: InferenceLogSettings, model: str) -> InferenceLog | None:
    """The model's inference log, or None when it is off or cannot be opened (a log that cannot be written costs
    its records, said in the server log, never the model's load or a request)."""
    if not settings.enabled:
        return None
    try:
        return InferenceLog(settings, on_error=lambda why: pb_utils.Logger.log_error(f"{model}: inference log: {why}"))
    except (OSError, ImportError) as error:
        pb_utils.Logger.log_error(f"{model}: no inference log: {error}")
        return None


class RouterMetrics:
    """tierserve_rows_total{tier,route,outcome}, tierserve_model_rows_total{model,outcome},
    tierserve_request_latency_seconds{tier,route},
    tierserve_slo_misses_total{tier}, tierserve_error_budget_burn{tier}, tierserve_router_queue_wait_ms,
    tierserve_breaker_state{model} (0 closed, 1 half-open, 2 open), tierserve_model_reloads_total{model};
    per experiment: tierserve_experiment_rows_total{experiment,arm}, tierserve_experiment_latency_seconds{experiment,
    arm}, tierserve_shadow_rows_total{experiment,outcome} (agree, disagree, error, dropped),
    tierserve_shadow_latency_seconds{experiment}; tierserve_inference_log_records_total{outcome} (dropped, lost);
    tierserve_in_process_rows_total{model,outcome} and tierserve_in_process{model} (1: the router serves it itself);
    tierserve_state_store_up and tierserve_state_store_errors_total{operation} (StateStoreMetrics);
    every series also carries `instance`, the router instance (each keeps its own breakers and signals). Feedback
    counts come from the `feedback` model."""

    def __init__(self, models: Iterable[str], tiers: Mapping[str, TierSlo], instance: str) -> None:
        kind = pb_utils.MetricFamily
        self.batch = MetricBatch()  # flush() sends what the hot path recorded
        self.rows = LabelledFamily(
            "tierserve_rows_total",
            "Rows by tier, the model that answered, and outcome (direct, fallback, degraded, shed, failed)",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.model_rows = LabelledFamily(
            "tierserve_model_rows_total",
            "Rows the router sent to each model version (in process or through Triton), by outcome: ok, "
            "low_confidence (escalated past, on confidence or the learned router's doubt), error, timeout; counted "
            "for every row not shed, answered or not. Triton 2.51 counts a Python model's error responses as "
            "successes, so a version's failures show here",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.latency = LabelledFamily(
            "tierserve_request_latency_seconds",
            "Time per request from the router taking it to its answer, by tier and the model that answered its "
            "first row (the queue before the router is Triton's nv_inference_queue_duration_us)",
            kind.HISTOGRAM,
            instance,
            self.batch,
            LATENCY_BUCKETS_S,
        )
        self.misses = LabelledFamily(
            "tierserve_slo_misses_total",
            "Requests answered after their deadline or tier SLO",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.burn = LabelledFamily(
            "tierserve_error_budget_burn",
            "SLO misses over the budgeted share in the last 60 s (1 = on budget)",
            kind.GAUGE,
            instance,
            self.batch,
        )
        self.load = LabelledFamily(
            "tierserve_router_queue_wait_ms",
            "Moving average of the longest wait for the router "
            "per execute (the load gauge; shedding judges each request by its own wait)",
            kind.GAUGE,
            instance,
            self.batch,
        )
        self.breaker = LabelledFamily(
            "tierserve_breaker_state",
            "Circuit breaker per downstream model: 0 closed, 1 half-open, 2 open",
            kind.GAUGE,
            instance,
            self.batch,
        )
        self.reloads = LabelledFamily(
            "tierserve_model_reloads_total",
            "Models reloaded by the router after their stub died",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.arm_rows = LabelledFamily(
            "tierserve_experiment_rows_total",
            "Rows answered in each experiment arm",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.arm_latency = LabelledFamily(
            "tierserve_experiment_latency_seconds",
            "Time per request from the router taking it to its answer, per experiment arm of its rows",
            kind.HISTOGRAM,
            instance,
            self.batch,
            LATENCY_BUCKETS_S,
        )
        self.shadow_rows = LabelledFamily(
            "tierserve_shadow_rows_total",
            "Rows mirrored to a shadow candidate, by outcome: agree or disagree with the answer sent, error, dropped",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.shadow_latency = LabelledFamily(
            "tierserve_shadow_latency_seconds",
            "Time per shadow call (one call carries the rows queued for a candidate)",
            kind.HISTOGRAM,
            instance,
            self.batch,
            LATENCY_BUCKETS_S,
        )
        self.log_records = LabelledFamily(
            "tierserve_inference_log_records_total",
            "Inference log records not written, by why: dropped (the queue was full) or lost (the sink failed)",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.in_process_rows_total = LabelledFamily(
            "tierserve_in_process_rows_total",
            "Rows the router ran through a model itself (no Triton call), by outcome: ok, or error (then Triton's copy "
            "of the model was called)",
            kind.COUNTER,
            instance,
            self.batch,
        )
        self.in_process = LabelledFamily(
            "tierserve_in_process",
            "1 while the router serves the model itself, 0 while it calls it through Triton (the model is not READY "
            "or injects faults)",
            kind.GAUGE,
            instance,
            self.batch,
        )
        self.state_store = StateStoreMetrics(instance, self.batch)
        self._in_process_states: dict[str, bool] = {}
        self._log_counts = {"dropped": 0, "lost": 0}
        self._burns = {tier: BudgetBurn(slo) for tier, slo in tiers.items()}
        self._breaker_states = {model: CLOSED for model in models}
        for model in models:
            self.breaker(model=model).set(BREAKER_VALUES[CLOSED])

    def requests(self, outcomes: Iterable[tuple[str, list[RowResult], float, float]]) -> None:
        """One execute's requests as (tier, answers, budget_ms, seconds since the server started on it: the
        wait for the router included). Counts are summed per series first (each metric update is a message to
        tritonserver); a shed request counts as shed, not as an SLO miss."""
        rows: Counter[tuple[str, str, str]] = Counter()
        model_rows: Counter[Hop] = Counter()
        met: Counter[str] = Counter()
        missed: Counter[str] = Counter()
        for tier, answers, budget_ms, seconds in outcomes:
            for answer in answers:
                if isinstance(answer, Answer):
                    rows[tier, answer.route, answer.outcome] += 1
                else:
                    rows[tier, "none", "shed" if isinstance(answer, Shed) else "failed"] += 1
                if not isinstance(answer, Shed):  # an unanswered row's hops count too: its models' failures
                    model_rows.update(hop for hop in answer.hops if hop.outcome.called)
            if isinstance(answers[0], Shed):
                continue
            route = answers[0].route if isinstance(answers[0], Answer) else "none"
            self.latency(tier=tier, route=route).observe(seconds)
            (missed if seconds * 1000 > budget_ms else met)[tier] += 1
        for (tier, route, outcome), count in rows.items():
            self.rows(tier=tier, route=route, outcome=outcome).increment(count)
        for hop, count in model_rows.items():
            self.model_rows(model=hop.model, outcome=hop.outcome.value).increment(count)
        for tier in missed:
            self.misses(tier=tier).increment(missed[tier])
        for tier in met | missed:
            self.burn(tier=tier).set(self._burns[tier].record(met=met[tier], missed=missed[tier]))

    def state(self, breakers: Mapping[str, CircuitBreaker], queue_wait_ms: float) -> None:
        """Breaker gauges (sent only when a state changed) and the load signal."""
        for model, breaker in breakers.items():
            if self._breaker_states.get(model) != breaker.state:
                self._breaker_states[model] = breaker.state
                self.breaker(model=model).set(BREAKER_VALUES[breaker.state])
        self.load().set(queue_wait_ms)

    def experiments(self, plans: Iterable[RowPlan], latency_s: float) -> None:
        """One request's rows in experiment arms (shadow experiments are counted by `shadowed`)."""
        arms = Counter((a.experiment, a.arm) for plan in plans for a in plan.assignments if not a.shadow_to)
        for (experiment, arm), count in arms.items():
            self.arm_rows(experiment=experiment, arm=arm).increment(count)
            self.arm_latency(experiment=experiment, arm=arm).observe(latency_s)

    def shadowed(self, experiment: str, outcomes: Iterable[ShadowOutcome], latency_s: float | None) -> None:
        """Mirrored rows of one experiment by outcome, and the latency of the call that carried them (None: none)."""
        for outcome, count in Counter(outcomes).items():
            self.shadow_rows(experiment=experiment, outcome=outcome.value).increment(count)
        if latency_s is not None:
            self.shadow_latency(experiment=experiment).observe(latency_s)

    def inference_log(self, dropped: int, lost: int) -> None:
        """The inference log's running totals of records dropped and lost; sends only what grew."""
        for outcome, total in (("dropped", dropped), ("lost", lost)):
            if total > self._log_counts[outcome]:
                self.log_records(outcome=outcome).increment(total - self._log_counts[outcome])
                self._log_counts[outcome] = total

    def in_process_rows(self, model: str, outcome: str, rows: int) -> None:
        self.in_process_rows_total(model=model, outcome=outcome).increment(rows)

    def in_process_state(self, states: ModelStates) -> None:
        """The in-process gauge of each in-process model (sent only when it changed)."""
        for model in states.in_process_models:
            if self._in_process_states.get(model) != (serving := states.in_process(model)):
                self._in_process_states[model] = serving
                self.in_process(model=model).set(1.0 if serving else 0.0)

    def reloaded(self, name: str) -> None:
        self.reloads(model=name).increment(1)
