"""perf/locustfile.py run headless by locust against the session's server: users of every tier are answered
without a failure, and locust's statistics have a row per tier and route."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from tierserve.router_files import router_policy
from tierserve.signature import TIERS
from tierserve.tools.paths import DEFAULT_REPOSITORY, PROJECT_ROOT
from tierserve.tools.server import TritonServer

LOCUST = Path(sys.executable).parent / "locust"
LOCUSTFILE = PROJECT_ROOT / "perf" / "locustfile.py"
ROUTE = re.compile(r"[A-Za-z0-9_]+:\d+")  # model:version, as ROUTE names the model that answered


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_headless_run_has_a_row_per_tier_and_route_and_no_failures(triton: TritonServer, tmp_path: Path) -> None:
    command = [
        str(LOCUST),
        *("-f", str(LOCUSTFILE), "--headless", "--only-summary"),
        *("-u", "6", "-r", "6", "--run-time", "5s"),
        *("--host", f"http://{triton.http_url}", "--csv", str(tmp_path / "locust")),
        *("--tier-mix", "critical=1,standard=1,best_effort=1", "--think-ms", "50"),
    ]
    environment = {**os.environ, "TIERSERVE_TIER_KEY": triton.tier_key}  # the critical users' key, as an operator
    result = subprocess.run(command, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-5000:]  # locust exits 1 on any failure, 2 on an exception

    stats = _rows(tmp_path / "locust_stats.csv")
    assert all(row["Failure Count"] == "0" for row in stats), stats
    assert _rows(tmp_path / "locust_failures.csv") == []
    routes_by_tier: dict[str, set[str]] = {}
    for row in stats:
        if row["Name"] != "Aggregated":
            assert ROUTE.fullmatch(row["Name"]) and int(row["Request Count"]) > 0, row
            routes_by_tier.setdefault(row["Type"], set()).add(row["Name"])
    assert set(routes_by_tier) == {f"digits {tier}" for tier in TIERS}
    # perturbed images take their rules' routes: missing pixels to the specialist, pure noise to the rules
    assert {"digits_missing:1", "digits_rules:1"} <= set().union(*routes_by_tier.values())
    # critical rows are served by their lanes (or in-process), never by a model the other tiers share; the lanes
    # serve no other tier
    policy = router_policy(DEFAULT_REPOSITORY)
    lanes = policy.lanes["critical"]
    shared = set(lanes) - set(policy.in_process)
    assert not routes_by_tier["digits critical"] & shared, routes_by_tier
    assert routes_by_tier["digits critical"] & set(lanes.values()), routes_by_tier
    for tier in ("digits standard", "digits best_effort"):
        assert not routes_by_tier[tier] & set(lanes.values()), routes_by_tier
