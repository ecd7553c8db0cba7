"""tierserve's Grafana dashboard, built with Grafana's foundation SDK (grafana-foundation-sdk, the dev extra) over
the recording rules in docker/prometheus/rules/. `python -m tierserve.tools.grafana_dashboard` writes
docker/grafana/dashboards/tierserve.json; tests/unit/test_prometheus_rules.py checks the committed file is what it
writes, and tests/integration/test_prometheus_live.py runs every query on a real Prometheus."""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh

from tierserve.tools.paths import PROJECT_ROOT

DASHBOARD_FILE = PROJECT_ROOT / "docker" / "grafana" / "dashboards" / "tierserve.json"
DASHBOARD_UID = "tierserve"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
TIERS = 'tier=~"$tier"'  # the dashboard's tier variable, in a selector


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a panel and the legend of its series."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Graph:
    """A time series panel (or, with `stat`, the value over the dashboard's time range)."""

    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    stat: bool = False


def tiered(series: str, legend: str) -> Query:
    """A recorded per-tier series, of the tiers the dashboard's variable picks."""
    return Query(f"{series}{{{TIERS}}}", legend)


def rate(metric: str, by: str, selector: str = "") -> str:
    """Per-second rate of counter `metric` (matching `selector`) summed by the labels `by`."""
    series = f"{metric}{{{selector}}}" if selector else metric
    return f"sum by ({by}) (rate({series}[$__rate_interval]))"


def quantile(metric: str, by: str, selector: str = "", q: float = 0.99) -> str:
    """Quantile `q` of histogram `metric` (its `_bucket` counters) by the labels `by`."""
    return f"histogram_quantile({q}, {rate(f'{metric}_bucket', f'{by}, le', selector)})"


SECTIONS: dict[str, tuple[Graph, ...]] = {
    "Tiers": (
        Graph(
            "Requests by tier",
            "Requests the router answered (shed ones are not answered), per second over 5 minutes.",
            "reqps",
            (tiered("tier:tierserve_requests:rate5m", "{{tier}}"),),
        ),
        Graph(
            "Latency by tier",
            "From the router taking a request to its answer (Triton's queue before the router is not in it).",
            "s",
            (
                tiered("tier:tierserve_request_latency_seconds:p50_rate5m", "{{tier}} p50"),
                tiered("tier:tierserve_request_latency_seconds:p99_rate5m", "{{tier}} p99"),
            ),
        ),
        Graph(
            "SLO misses per request",
            "Requests answered after their deadline or their tier's SLO (policy.yaml `tiers`), over 5 minutes.",
            "percentunit",
            (tiered("tier:tierserve_slo_misses_per_request:ratio_rate5m", "{{tier}}"),),
        ),
    ),
    "Error budget": (
        Graph(
            "Error budget burn rate",
            "SLO misses over the budgeted share (1 - slo_target): 1 spends the budget exactly in its period. The "
            "fast-burn alert pages above 14.4 (1 h) or 6 (6 h); the server's own gauge covers the last 60 s.",
            "none",
            (
                tiered("tier:tierserve_slo_burn_rate:rate1h", "{{tier}} 1 h"),
                tiered("tier:tierserve_slo_burn_rate:rate6h", "{{tier}} 6 h"),
                Query(f"max by (tier) (tierserve_error_budget_burn{{{TIERS}}})", "{{tier}} 60 s (server)"),
            ),
        ),
        Graph(
            "Budget burnt over the time range",
            "SLO misses per request over the dashboard's time range, over the tier's budget (1 = on budget).",
            "none",
            (
                Query(
                    f"(sum by (tier) (increase(tierserve_slo_misses_total{{{TIERS}}}[$__range]))"
                    f" or 0 * sum by (tier) (increase(tierserve_request_latency_seconds_count{{{TIERS}}}[$__range])))"
                    f" / sum by (tier) (increase(tierserve_request_latency_seconds_count{{{TIERS}}}[$__range]))"
                    " / tier:tierserve_slo_error_budget:ratio",
                    "{{tier}}",
                ),
            ),
            stat=True,
        ),
    ),
    "Routes": (
        Graph(
            "Rows by route",
            "Rows by the model that answered them (`none`: shed or failed).",
            "rowsps",
            (Query(rate("tierserve_rows_total", "route", TIERS), "{{route}}"),),
        ),
        Graph(
            "Latency p99 by route",
            "By the model that answered a request's first row.",
            "s",
            (Query(quantile("tierserve_request_latency_seconds", "route", TIERS), "{{route}}"),),
        ),
        Graph(
            "Rows served in-process",
            "Rows the router ran through a model itself, by outcome (error: Triton's copy answered instead).",
            "rowsps",
            (Query(rate("tierserve_in_process_rows_total", "model, outcome"), "{{model}} {{outcome}}"),),
        ),
    ),
    "Fallbacks and errors": (
        Graph(
            "Rows by outcome",
            "direct, fallback (a model failed on the way), degraded (by load), shed, failed.",
            "rowsps",
            (Query(f"sum by (outcome) (tier_outcome:tierserve_rows:rate5m{{{TIERS}}})", "{{outcome}}"),),
        ),
        Graph(
            "Rows each model version failed",
            "Rows the router sent to a model version that failed there (error) or got no answer in time (timeout), "
            "rows no model answered included. Triton 2.51 counts a Python model's error responses as successes.",
            "rowsps",
            (
                Query(
                    rate("tierserve_model_rows_total", "model, outcome", 'outcome=~"error|timeout"'),
                    "{{model}} {{outcome}}",
                ),
            ),
        ),
        Graph(
            "Fallback and failed rows per row",
            "Each outcome's share of its tier's rows over 5 minutes.",
            "percentunit",
            (
                Query(
                    f'tier_outcome:tierserve_rows:ratio_rate5m{{{TIERS}, outcome=~"fallback|failed"}}',
                    "{{tier}} {{outcome}}",
                ),
            ),
        ),
    ),
    "Breakers and reloads": (
        Graph(
            "Circuit breakers",
            "Per downstream model, the worst state over router instances: 0 closed, 1 half-open, 2 open.",
            "none",
            (Query("max by (model) (tierserve_breaker_state)", "{{model}}"),),
        ),
        Graph(
            "Model reloads",
            "Models the router reloaded after their Python stub died.",
            "none",
            (Query("sum by (model) (increase(tierserve_model_reloads_total[$__rate_interval]))", "{{model}}"),),
        ),
    ),
    "Load shedding": (
        Graph(
            "Shed and degraded rows by tier",
            "best_effort is degraded, then shed, then standard is shed (policy.yaml `load_shedding`).",
            "rowsps",
            (
                Query(
                    f'tier_outcome:tierserve_rows:rate5m{{{TIERS}, outcome=~"shed|degraded"}}', "{{tier}} {{outcome}}"
                ),
            ),
        ),
        Graph(
            "Router queue wait (the load gauge)",
            "Moving average of the longest wait for the router per execute, the worst router instance.",
            "ms",
            (Query("max(tierserve_router_queue_wait_ms)", "wait"),),
        ),
    ),
    "Experiments": (
        Graph(
            "Rows per experiment arm",
            "Rows answered in each arm (`tierserve experiment list`).",
            "rowsps",
            (Query(rate("tierserve_experiment_rows_total", "experiment, arm"), "{{experiment}} {{arm}}"),),
        ),
        Graph(
            "Latency p99 per experiment arm",
            "Of the requests with rows in the arm.",
            "s",
            (Query(quantile("tierserve_experiment_latency_seconds", "experiment, arm"), "{{experiment}} {{arm}}"),),
        ),
        Graph(
            "Accuracy per experiment arm (feedback)",
            "Fed-back rows whose answer was correct, per arm.",
            "percentunit",
            (
                Query(
                    rate("tierserve_feedback_total", "experiment, arm", 'correct="true"')
                    + " / "
                    + rate("tierserve_feedback_total", "experiment, arm"),
                    "{{experiment}} {{arm}}",
                ),
            ),
        ),
        Graph(
            "Feedback refused",
            "Feedback refused, by why: unknown or expired REQUEST_ID, duplicate, bad LABEL, state store unavailable.",
            "reqps",
            (Query(rate("tierserve_feedback_refused_total", "why"), "{{why}}"),),
        ),
        Graph(
            "Shadow rows by outcome",
            "Rows mirrored to a shadow candidate: agree or disagree with the answer sent, error, dropped.",
            "rowsps",
            (Query(rate("tierserve_shadow_rows_total", "experiment, outcome"), "{{experiment}} {{outcome}}"),),
        ),
    ),
    "Server": (
        Graph(
            "Inference requests by model",
            "Triton's own counts: every model's requests, the router's calls to the models included.",
            "reqps",
            (
                Query(rate("nv_inference_request_success", "model"), "{{model}} ok"),
                Query(rate("nv_inference_request_failure", "model"), "{{model}} failed"),
            ),
        ),
        Graph(
            "Queue time per request by model",
            "Time requests waited in Triton's scheduler queue of each model.",
            "µs",
            (
                Query(
                    rate("nv_inference_queue_duration_us", "model")
                    + " / "
                    + rate("nv_inference_request_success", "model"),
                    "{{model}}",
                ),
            ),
        ),
        Graph(
            "State store",
            "Whether the state store answers every router and feedback instance (1), and calls that failed or were "
            "not made while it was down, by operation.",
            "none",
            (
                Query("min(tierserve_state_store_up)", "up (worst instance)"),
                Query(rate("tierserve_state_store_errors_total", "operation"), "{{operation}} errors/s"),
            ),
        ),
        Graph(
            "Inference log records not written",
            "dropped: the log's queue was full; lost: its sink failed.",
            "none",
            (Query(rate("tierserve_inference_log_records_total", "outcome"), "{{outcome}}"),),
        ),
    ),
}


def _panel(graph: Graph, panel_id: int) -> timeseries.Panel | stat.Panel:
    panel = (stat.Panel() if graph.stat else timeseries.Panel()).id(panel_id).title(graph.title)
    panel = panel.description(graph.description).unit(graph.unit).datasource(DATASOURCE)
    panel = panel.span(24 if graph.stat else 12).height(8)
    for ref_id, query in zip("ABCDEFGH", graph.queries, strict=False):
        target = prometheus.Dataquery().ref_id(ref_id).expr(query.expr).legend_format(query.legend)
        target = target.datasource(DATASOURCE)
        panel = panel.with_target(target.instant() if graph.stat else target.range())
    return panel


def build() -> dashboard.Dashboard:
    """The dashboard: one row per section of SECTIONS, a Prometheus data source and a tier variable."""
    builder = (
        dashboard.Dashboard("tierserve")
        .uid(DASHBOARD_UID)
        .description("Tiers, routes, fallbacks, breakers, shedding, error budget and experiments of tierserve")
        .tags(["tierserve", "triton"])
        .time("now-1h", "now")
        .refresh("30s")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("tier")
            .label("Tier")
            .datasource(DATASOURCE)
            .query("label_values(tierserve_rows_total, tier)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(text="All", value="$__all"))
        )
    )
    panel_ids = itertools.count(1)
    for section, graphs in SECTIONS.items():
        builder = builder.with_row(dashboard.Row(section).id(next(panel_ids)))
        for graph in graphs:
            builder = builder.with_panel(_panel(graph, next(panel_ids)))
    return builder


def dashboard_json() -> str:
    """The dashboard as the JSON Grafana provisions, with a final newline."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the dashboard to `argv[0]`, else to DASHBOARD_FILE."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DASHBOARD_FILE
    path.write_text(dashboard_json())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
