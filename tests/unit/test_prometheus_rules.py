"""The Prometheus rules in docker/prometheus/ pass Prometheus's own checks and unit tests (promtool, from Debian's
prometheus package that tools/bootstrap.sh installs), their error budgets are the policy's, and the committed Grafana
dashboard is what its generator writes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tierserve.policy import Policy
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.tools.grafana_dashboard import DASHBOARD_FILE, dashboard_json
from tierserve.tools.paths import DEFAULT_REPOSITORY, PROJECT_ROOT

PROMETHEUS_DIR = PROJECT_ROOT / "docker" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
BUDGET_RULE = "tier:tierserve_slo_error_budget:ratio"


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    assert executable, "promtool is missing: tools/bootstrap.sh installs Debian's prometheus package"
    return subprocess.run(
        [executable, *map(str, args)], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60, check=False
    )


def rules(name: str) -> list[dict]:
    """The rules recording `name` in the rule files."""
    groups = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    return [rule for group in groups for rule in group["rules"] if rule.get("record") == name]


def test_the_rule_files_and_the_scrape_config_pass_promtool_check():
    assert len(RULE_FILES) == 2
    checked = promtool("check", "rules", *RULE_FILES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_alerts_fire_as_their_unit_tests_say():
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_tier_has_the_error_budget_of_its_policy_target():
    policy = Policy.load(DEFAULT_REPOSITORY / ROUTER_MODEL / POLICY_FILE)
    budgets = {}
    for rule in rules(BUDGET_RULE):
        match = re.fullmatch(r"vector\(([0-9.]+)\)", rule["expr"])
        assert match, f"{BUDGET_RULE} for {rule['labels']}: expected vector(<budget>), got {rule['expr']!r}"
        budgets[rule["labels"]["tier"]] = float(match.group(1))
    assert budgets == pytest.approx({tier: 1 - slo.target for tier, slo in policy.tiers.items()})


def test_the_committed_dashboard_is_what_the_generator_writes():
    assert DASHBOARD_FILE.read_text() == dashboard_json(), (
        "docker/grafana/dashboards/tierserve.json is stale: run .venv/bin/python -m tierserve.tools.grafana_dashboard"
    )
