"""`tierserve canary` against a stand-in server (the model repository API of test_lifecycle, a router that writes
what it serves to the state store, and a metrics page made from a scenario): the checks refuse naming the problem and
change nothing; a healthy candidate is promoted step by step; a failed gate, Ctrl-C and a lost server each put the
traffic back on the baseline and leave the candidate loaded; every step and outcome is in the audit trail. Also the
Prometheus text it reads, counters across resets, and the command-line options."""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from tritonclient.utils import InferenceServerException

from tierserve.canary_gates import CanarySettings, Gate
from tierserve.experiment_spec import ExperimentsFile, experiments_json, parse_experiments
from tierserve.experimenter import EXPERIMENTS_KEY, EXPERIMENTS_PARAMETER
from tierserve.promotions import ModelVersion, stored_promotions
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL, router_policy
from tierserve.state_store import MemoryStore
from tierserve.tools.audit import Action, Outcome, read_audit
from tierserve.tools.canary import (
    CONTROL,
    TREATMENT,
    CanaryOutcome,
    CanaryProblem,
    CanaryRefused,
    Increases,
    add_canary_options,
    arm_figures,
    canary_settings,
    experiment_names,
    model_calls,
    parse_metrics,
    run_canary,
)
from tierserve.tools.lifecycle import Lifecycle, Problem
from tierserve.tools.paths import AUDIT_ENV

from .test_lifecycle import FakeControl, repository  # noqa: F401  (the repository fixture)

CANDIDATE = "digits_heavy:1"
EXPERIMENT, SHADOW = experiment_names(ModelVersion.parse(CANDIDATE))
BOUNDS = ("0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "+Inf")
SETTINGS = CanarySettings(steps=(10, 50, 100), step_s=2, max_step_s=10, poll_s=0.5, min_rows=50, min_calls=10)


@dataclass
class Scenario:
    """How the stand-in server behaves: rows per reading, each arm's latency, the candidate's share of failed rows,
    and what the metrics page does at a given reading (None: answers)."""

    rows: int = 200
    candidate_ms: float = 3.0
    baseline_ms: float = 3.0
    candidate_fails: float = 0.0
    lost_from: int | None = None  # from this reading on, the server answers nothing
    back_after_s: float | None = None  # ... until this long after it was lost (None: never)
    interrupt_at: int | None = None  # Ctrl-C during this reading's wait
    stall_at: int | None = None  # at this reading one of the candidate's calls took a second more


@dataclass
class Server(FakeControl):
    """FakeControl whose router writes the experiments it is loaded with to the state store (as the real one does),
    with a metrics page that grows by the scenario at each reading, and a fake clock."""

    repository: Path = Path()
    store: MemoryStore = field(default_factory=MemoryStore)
    scenario: Scenario = field(default_factory=Scenario)

    def __post_init__(self) -> None:
        FakeControl.__init__(self, self.repository)
        self.weights: list[float | None] = []  # the canary's treatment weight at each router load (None: stopped)
        self.counters: dict[str, float] = {}
        self.readings = 0
        self.now = 0.0
        self.down_since: float | None = None
        self.stored_when_back: list[str] | None = None  # the experiments in the store when the server came back

    def load_with(self, model: str, config: dict) -> None:
        if self.down_since is not None:
            back = self.scenario.back_after_s
            if back is None or self.now < self.down_since + back:
                raise InferenceServerException("failed to connect to all addresses; Connection refused")
            self.down_since, self.stored_when_back = None, _running(self)
        super().load_with(model, config)
        parameter = config.get("parameters", {}).get(EXPERIMENTS_PARAMETER)
        if model == ROUTER_MODEL and parameter is not None:
            self.store.set(EXPERIMENTS_KEY, parameter["string_value"].encode())
            served = {e["name"]: e for e in json.loads(parameter["string_value"])["experiments"]}
            self.weights.append(served[EXPERIMENT]["arms"][0]["weight"] if EXPERIMENT in served else None)

    def metrics(self) -> str:
        self.readings += 1
        if self.scenario.lost_from is not None and self.readings >= self.scenario.lost_from:
            self.down_since = self.now if self.down_since is None else self.down_since
            raise ConnectionRefusedError(111, "Connection refused")
        weight = self.weights[-1] if self.weights and self.weights[-1] is not None else 0.0
        s, treated = self.scenario, round(self.scenario.rows * weight / 100)
        for arm, rows, ms in ((TREATMENT, treated, s.candidate_ms), (CONTROL, s.rows - treated, s.baseline_ms)):
            labels = f'arm="{arm}",experiment="{EXPERIMENT}",instance="router_0_0"'
            self._grow(f"tierserve_experiment_rows_total{{{labels}}}", rows)
            for bound in BOUNDS:
                if bound == "+Inf" or ms / 1000 <= float(bound):
                    self._grow(f'tierserve_experiment_latency_seconds_bucket{{{labels},le="{bound}"}}', rows)
        failed = round(20 * s.candidate_fails)
        for outcome, rows in (("agree", 20 - failed), ("error", failed)):
            self._grow(
                f'tierserve_shadow_rows_total{{experiment="{SHADOW}",instance="router_0_0",outcome="{outcome}"}}', rows
            )
        stall_us = 1_000_000 if self.readings == s.stall_at else 0
        for version, calls, us in (
            ("1", treated + 20, (treated + 20) * s.candidate_ms * 1000 + stall_us),
            ("2", s.rows - treated, (s.rows - treated) * s.baseline_ms * 1000),
        ):
            labels = f'model="digits_heavy",version="{version}"'
            self._grow(f"nv_inference_request_success{{{labels}}}", calls)
            self._grow(f"nv_inference_request_duration_us{{{labels}}}", us)
        ejected = 2 if s.candidate_fails >= 0.5 and weight > 0 else 0
        lines = [f"{series} {value:g}" for series, value in self.counters.items()]
        lines.append(f'tierserve_breaker_state{{instance="router_0_0",model="digits_heavy:1"}} {ejected}')
        return "# HELP ...\n# TYPE ...\n" + "\n".join(lines) + "\n"

    def _grow(self, series: str, by: float) -> None:
        self.counters[series] = self.counters.get(series, 0.0) + by

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.scenario.interrupt_at is not None and self.readings == self.scenario.interrupt_at:
            raise KeyboardInterrupt


@pytest.fixture
def audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "audit.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(path))
    return path


@pytest.fixture
def server(repository: Path) -> Server:  # noqa: F811
    return Server(repository=repository)


@pytest.fixture
def console() -> Console:
    return Console(file=io.StringIO(), width=200)


def _run(server: Server, console: Console, settings: CanarySettings = SETTINGS, target: str = CANDIDATE):
    lifecycle = Lifecycle(server, server.store, server.repository)  # type: ignore[arg-type]
    return run_canary(
        target,
        lifecycle,
        settings=settings,
        console=console,
        metrics=server.metrics,
        clock=lambda: server.now,
        sleep=server.sleep,
    )


def _audit(path: Path) -> list[tuple[Action, str, str, str, Outcome]]:
    return [(e.action, e.target, e.before, e.after, e.outcome) for e in read_audit(path).entries]


def _running(server: Server) -> list[str]:
    stored = server.store.get(EXPERIMENTS_KEY)
    return [] if stored is None else [e.name for e in ExperimentsFile.model_validate_json(stored).experiments]


def test_a_healthy_candidate_is_promoted_step_by_step(server: Server, console: Console, audit: Path):
    result = _run(server, console)
    assert result.outcome == CanaryOutcome.PROMOTED and result.promoted, result.message
    assert result.passed == (10, 50, 100)
    assert server.weights == [10, 50, 100, None, None]  # each step, stopped, then the promotion's router
    assert stored_promotions(server.store).models["digits_heavy"].version == 1
    assert _running(server) == []
    assert _audit(audit) == [
        (Action.CANARY_STEP, CANDIDATE, "0%", "10%", Outcome.OK),
        (Action.CANARY_STEP, CANDIDATE, "10%", "50%", Outcome.OK),
        (Action.CANARY_STEP, CANDIDATE, "50%", "100%", Outcome.OK),
        (Action.PROMOTE, CANDIDATE, "digits_heavy:2", CANDIDATE, Outcome.OK),
        (Action.CANARY_STEP, CANDIDATE, "100%", "promoted", Outcome.OK),
    ]
    # at 100% no user is in the control arm: the latency gate compares with the control of the 50% step
    assert "control at 50%" in result.verdict.reading(Gate.LATENCY).text
    assert "step 3/3: 100%" in console.file.getvalue()  # type: ignore[attr-defined]


def test_a_candidate_not_loaded_is_loaded_first(server: Server, console: Console, audit: Path):
    server.ready["digits_heavy"] = {2}
    assert _run(server, console).promoted
    assert server.calls[0] == ("load", "digits_heavy", (1, 2))
    assert _audit(audit)[0] == (
        Action.LOAD,
        CANDIDATE,
        "digits_heavy versions 2",
        "digits_heavy versions 1, 2",
        Outcome.OK,
    )


def test_a_failed_gate_returns_the_traffic_at_once_and_leaves_the_candidate_loaded(
    server: Server, console: Console, audit: Path
):
    server.scenario.candidate_ms = 60.0
    result = _run(server, console)
    assert result.outcome == CanaryOutcome.ROLLED_BACK
    assert result.verdict.failed.gate == Gate.LATENCY and result.weight == 10 and result.passed == ()
    assert server.weights == [10, None] and _running(server) == []
    assert 1 in server.ready_versions("digits_heavy")
    assert stored_promotions(server.store).models == {}
    *_, last = read_audit(audit).entries
    assert (last.action, last.before, last.after, last.outcome) == (Action.CANARY_STEP, "10%", "0%", Outcome.FAILED)
    assert "gate latency failed at 10%" in last.message and "traffic back on digits_heavy:2" in last.message
    assert "calls 60.0 ms vs baseline 3.0 ms" in last.message  # the figures of the failed gate


def test_one_stalled_call_does_not_roll_back_a_healthy_candidate(server: Server, console: Console, audit: Path):
    """One call of a second among the first step's ~160 of 3 ms (a busy box) moved the step's mean call duration
    to ~9 ms, past its limit of 3 + 5 ms; the median of the readings' means stays at 3 ms."""
    server.scenario.stall_at = 3
    result = _run(server, console)
    assert result.outcome == CanaryOutcome.PROMOTED, result.message
    assert server.readings > 3


def test_failing_rows_roll_back_on_the_error_gate(server: Server, console: Console, audit: Path):
    server.scenario.candidate_fails = 0.3
    result = _run(server, console)
    assert result.verdict.failed.gate == Gate.ERRORS and server.weights == [10, None]
    assert "rows failed on the candidate" in result.message


def test_ctrl_c_returns_the_traffic(server: Server, console: Console, audit: Path):
    server.scenario.interrupt_at = 4
    result = _run(server, console)
    assert result.outcome == CanaryOutcome.INTERRUPTED and server.weights[-1] is None and _running(server) == []
    assert "interrupted: Ctrl-C at 10%" in read_audit(audit).entries[-1].message


def test_a_lost_server_is_asked_to_stop_until_it_gives_up_and_the_state_store_forgets_the_canary(
    server: Server, console: Console, audit: Path
):
    server.scenario.lost_from = 5
    result = _run(server, console)
    assert result.outcome == CanaryOutcome.SERVER_LOST
    assert server.now >= 30  # asked again for STOP_RETRY_S
    assert _running(server) == []  # a restarted server serves the baseline
    assert "removed from the state store" in result.message and f"experiment stop {EXPERIMENT}" in result.message
    assert read_audit(audit).entries[-1].outcome == Outcome.FAILED


def test_a_lost_server_that_comes_back_is_stopped_through_it_and_restarts_with_the_baseline(
    server: Server, console: Console, audit: Path
):
    server.scenario.lost_from, server.scenario.back_after_s = 5, 8.0
    result = _run(server, console)
    assert result.outcome == CanaryOutcome.SERVER_LOST and "traffic back on digits_heavy:2" in result.message
    assert server.stored_when_back == []  # dropped from the store before the server came back
    assert server.weights[-1] is None and _running(server) == []


def test_other_running_experiments_keep_running(server: Server, console: Console, repository: Path):  # noqa: F811
    other = {
        "name": "strict",
        "kind": "split",
        "arms": [
            {"name": "control", "weight": 50},
            {"name": "s", "weight": 50, "cascade": {"thresholds": {"standard": 0.99}}},
        ],
    }
    spec = parse_experiments({"experiments": [other]}, router_policy(repository))
    server.store.set(EXPERIMENTS_KEY, experiments_json(spec).encode())
    server.scenario.candidate_ms = 60.0
    _run(server, console)
    assert _running(server) == ["strict"]


@pytest.mark.parametrize(
    ("target", "problem", "named"),
    [
        ("digits_heavy", Problem.MALFORMED, "expected MODEL:VERSION"),
        ("digits_huge:3", Problem.UNKNOWN_MODEL, "no model 'digits_huge'"),
        (f"{ROUTER_MODEL}:1", Problem.ROUTER, "is the router"),
        ("digits_heavy:9", Problem.UNKNOWN_VERSION, "digits_heavy:9 does not exist"),
        ("digits_heavy:7", Problem.NO_MANIFEST, "digits_heavy:7 has no usable manifest"),
        ("digits_heavy:2", Problem.ALREADY, "digits_heavy:2 is already the version the policy routes to"),
        ("digits_heavy_critical:3", Problem.LANE, "digits_heavy_critical is a lane of digits_heavy"),
        ("preprocess:1", Problem.NOT_ROUTED, "the policy does not route to preprocess"),
        ("digits_heavy:8", Problem.UNKNOWN_VERSION, "lane digits_heavy_critical:8 does not exist"),
    ],
)
def test_a_refused_canary_names_the_problem_changes_nothing_and_is_audited(
    server: Server, console: Console, audit: Path, target: str, problem, named: str
):
    with pytest.raises(CanaryRefused) as refused:
        _run(server, console, target=target)
    assert refused.value.problem == problem and named in str(refused.value)
    assert server.calls == [] and server.weights == []
    assert _audit(audit) == [(Action.CANARY_STEP, target, "", "", Outcome.REFUSED)]


def test_a_candidate_the_policy_does_not_allow_experiments_to_call_is_refused(
    server: Server, console: Console, audit: Path
):
    policy_file = server.repository / ROUTER_MODEL / POLICY_FILE
    policy = yaml.safe_load(policy_file.read_text())
    assert policy["experiment_models"] == ["digits_light:1", "digits_heavy:1", "digits_heavy:3"]
    policy["experiment_models"].remove("digits_heavy:3")
    policy_file.write_text(yaml.safe_dump(policy))
    with pytest.raises(CanaryRefused) as refused:
        _run(server, console, target="digits_heavy:3")
    assert refused.value.problem == CanaryProblem.NOT_ALLOWED
    assert "digits_heavy:3 is not listed under experiment_models" in str(refused.value)
    assert server.calls == [] and server.weights == []
    assert _audit(audit) == [(Action.CANARY_STEP, "digits_heavy:3", "", "", Outcome.REFUSED)]


def test_a_canary_is_refused_while_an_experiment_changes_the_baseline_or_one_runs_already(
    server: Server,
    console: Console,
    audit: Path,
    repository: Path,  # noqa: F811
):
    split = {
        "name": "heavy_versions",
        "kind": "split",
        "arms": [
            {"name": "control", "weight": 50},
            {"name": "v1", "weight": 50, "models": {"digits_heavy:2": CANDIDATE}},
        ],
    }
    policy = router_policy(repository)
    server.store.set(EXPERIMENTS_KEY, experiments_json(parse_experiments({"experiments": [split]}, policy)).encode())
    with pytest.raises(CanaryRefused) as refused:
        _run(server, console)
    assert refused.value.problem == Problem.IN_USE and "experiment heavy_versions arm v1" in str(refused.value)
    canary = {**split, "name": EXPERIMENT, "kind": "canary", "arms": [split["arms"][1], split["arms"][0]]}
    server.store.set(EXPERIMENTS_KEY, experiments_json(parse_experiments({"experiments": [canary]}, policy)).encode())
    with pytest.raises(CanaryRefused, match="is running already"):
        _run(server, console)
    assert server.calls == []


def test_prometheus_text_is_parsed_with_escapes_and_without_nan():
    text = "\n".join(
        [
            "# HELP a_total something",
            'a_total{x="1",y="say \\"hi\\"\\\\"} 3 1700000000000',
            'a_total{x="2"} NaN',
            "b 7",
            "c_total 1",
        ]
    )
    assert parse_metrics(text, {"a_total", "b"}) == {
        ("a_total", (("x", "1"), ("y", 'say "hi"\\'))): 3.0,
        ("b", ()): 7.0,
    }


def test_increases_count_across_resets_and_from_series_that_appear_later():
    increases = Increases()
    a, b = ("a", ()), ("b", ())
    increases.add({a: 100.0})  # the first reading: where counting starts
    mark = dict(increases.total)
    increases.add({a: 110.0, b: 4.0})  # b appeared: it grew from 0
    increases.add({a: 5.0, b: 6.0})  # a went down: its model was reloaded, it grew from 0 to 5
    assert increases.total == {a: 15.0, b: 6.0}
    increases.add({a: 7.0})
    assert increases.since(mark) == {a: 17.0, b: 6.0}


def test_arm_figures_sum_instances_and_turn_cumulative_buckets_into_counts():
    lines = []
    for instance, counts in (("router_0_0", (10, 50, 100)), ("router_0_1", (0, 30, 50))):
        labels = f'arm="{TREATMENT}",experiment="e",instance="{instance}"'
        lines.append(f"tierserve_experiment_rows_total{{{labels}}} {counts[-1]}")
        for bound, count in zip(("0.01", "0.1", "+Inf"), counts, strict=True):
            lines.append(f'tierserve_experiment_latency_seconds_bucket{{{labels},le="{bound}"}} {count}')
    lines += [
        'tierserve_feedback_total{arm="candidate",correct="true",experiment="e",instance="feedback_0_0"} 8',
        'tierserve_feedback_total{arm="candidate",correct="false",experiment="e",instance="feedback_0_0"} 2',
        'nv_inference_request_success{model="m",version="1"} 40',
        'nv_inference_request_duration_us{model="m",version="1"} 80000',
        # rows the routers sent to m:1 and its lane, by outcome; m:2 is another version, not the arm's
        'tierserve_model_rows_total{instance="router_0_0",model="m:1",outcome="ok"} 30',
        'tierserve_model_rows_total{instance="router_0_1",model="m:1",outcome="low_confidence"} 5',
        'tierserve_model_rows_total{instance="router_0_0",model="m:1",outcome="error"} 3',
        'tierserve_model_rows_total{instance="router_0_0",model="m:1",outcome="timeout"} 2',
        'tierserve_model_rows_total{instance="router_0_1",model="m_lane:1",outcome="error"} 1',
        'tierserve_model_rows_total{instance="router_0_0",model="m:2",outcome="error"} 50',
        'tierserve_shadow_rows_total{experiment="e_shadow",instance="router_0_0",outcome="agree"} 7',
        'tierserve_shadow_rows_total{experiment="e_shadow",instance="router_0_0",outcome="error"} 2',
        'tierserve_shadow_rows_total{experiment="e_shadow",instance="router_0_0",outcome="dropped"} 4',
    ]
    increases = Increases()
    increases.add({})
    increases.add(parse_metrics("\n".join(lines), {*(line.split("{")[0] for line in lines)}))
    figures = arm_figures(
        increases.total, increases.total, "e", TREATMENT, ["m:1"], call_readings=[model_calls(increases.total, ["m:1"])]
    )
    assert figures.rows == 150 and figures.latency.counts == (10, 70, 70)
    assert figures.latency.bounds_s == (0.01, 0.1) and figures.p99_ms == 100.0
    assert (figures.feedback, figures.correct, figures.accuracy) == (10, 8, 0.8)
    assert figures.model_calls == 40 and figures.mean_call_ms == pytest.approx(2.0)
    # the rows sent to m:1 (and its lane) whatever their outcome; failed there: errors (a timeout is latency's)
    assert (figures.calls, figures.failures) == (30 + 5 + 3 + 2, 3)
    with_lane = arm_figures(increases.total, increases.total, "e", TREATMENT, ["m:1", "m_lane:1"], "e_shadow")
    assert (with_lane.calls, with_lane.failures) == (41 + 7 + 2, 4 + 2)  # plus the shadow's sent (not dropped)
    empty = arm_figures({}, {}, "e", CONTROL, [])
    assert empty.rows == 0 and empty.p99_ms is None and empty.mean_call_ms is None


def test_experiment_names_are_valid_for_any_model_name():
    for model in ("digits_heavy", "Digits-Heavy.v2", "m" * 120):
        name, shadow = experiment_names(ModelVersion(model, 123456789))
        assert len(shadow) <= 40 and name.startswith("canary_") and name.endswith("_123456789")
        assert shadow == f"{name}_shadow"


def test_options_come_from_the_settings_and_bad_values_name_the_option():
    parser = argparse.ArgumentParser()
    add_canary_options(parser)
    args = parser.parse_args(["--steps", "1,5,50", "--step-s", "2", "--max-error-rate", "off", "--min-rows", "7"])
    settings = canary_settings(vars(args))
    assert settings.steps == (1, 5, 50) and settings.step_s == 2 and settings.max_error_rate is None
    assert settings.min_rows == 7 and settings.poll_s == CanarySettings().poll_s
    assert args.metrics_url == "http://localhost:8002/metrics"
    help_text = parser.format_help()
    assert "--max-latency-ratio" in help_text and "none (off): latency not judged" in help_text
    with pytest.raises(CanaryRefused, match=r"^steps must increase, got 5, 1$") as refused:
        canary_settings(vars(parser.parse_args(["--steps", "5,1"])))
    assert refused.value.problem == CanaryProblem.SETTINGS
    with pytest.raises(CanaryRefused, match=r"^--max-error-rate: "):
        canary_settings(vars(parser.parse_args(["--max-error-rate", "2"])))
    assert math.isclose(canary_settings({}).max_step_s, 600)
