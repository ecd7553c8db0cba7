"""A real Prometheus (Debian's, which tools/bootstrap.sh installs) scrapes the session's server every second with the
project's rule files: after requests of every tier, each recording rule has series, and every query of the Grafana
dashboard runs without error."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tierserve.client import TierserveClient
from tierserve.signature import TIERS
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.grafana_dashboard import DASHBOARD_FILE
from tierserve.tools.paths import PROJECT_ROOT
from tierserve.tools.server import TritonServer

RULE_FILES = sorted((PROJECT_ROOT / "docker" / "prometheus" / "rules").glob("*.yml"))
# What Grafana puts in place of the dashboard's variables: a 1 s scrape makes any rate window of a minute full.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$tier": ".*"}
READY_TIMEOUT_S = 20.0
DATA_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query(prometheus: str, expr: str) -> dict:
    """Prometheus's answer to an instant query (its JSON: status, data or error), whether or not it failed."""
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 400 and 422 carry the error as JSON
        return json.load(error)


@pytest.fixture(scope="module")
def prometheus(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a Prometheus on a free loopback port scraping `triton` and evaluating the rules each second."""
    executable = shutil.which("prometheus")
    assert executable, "prometheus is missing: tools/bootstrap.sh installs Debian's prometheus package"
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": "tierserve",
                "static_configs": [{"targets": [urllib.parse.urlsplit(triton.metrics_url).netloc]}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{_free_port()}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                executable,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_scraping(f"http://{address}", process, log_path)
        yield f"http://{address}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_scraping(url: str, process: subprocess.Popen, log_path: Path) -> None:
    """Until Prometheus has scraped the server once (its first scrape comes seconds after it is ready: target
    discovery sends its first targets after a delay), so the traffic after it is seen as counters that grow."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if query(url, 'up{job="tierserve"} == 1')["data"]["result"]:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    log = log_path.read_text(errors="replace").splitlines()[-20:]
    pytest.fail(f"prometheus at {url} has not scraped the server (exit {process.poll()}):\n" + "\n".join(log))


def recorded_names() -> list[str]:
    groups = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    return sorted({rule["record"] for group in groups for rule in group["rules"] if "record" in rule})


def dashboard_queries() -> list[str]:
    """Every panel's PromQL in the generated dashboard, with Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: a Grafana variable the test does not fill: {expr}"
            queries.append(expr)
    return queries


@pytest.fixture(scope="module")
def traffic(prometheus: str, triton: TritonServer, split: DigitsSplit) -> None:
    """Requests of every tier spread over a few scrapes, then until Prometheus has recorded them (or a timeout)."""
    images = split.test.images[:8]
    with TierserveClient(triton.grpc_url, tier_key=triton.tier_key) as client:
        for _ in range(6):
            for tier in TIERS:
                client.classify(images, tier=tier)
            time.sleep(0.5)
    deadline = time.monotonic() + DATA_TIMEOUT_S
    names = recorded_names()
    while time.monotonic() < deadline:
        if all(query(prometheus, name)["data"]["result"] for name in names) and _all_tiers_requested(prometheus):
            return
        time.sleep(1.0)


def _all_tiers_requested(prometheus: str) -> bool:
    result = query(prometheus, "tier:tierserve_requests:rate5m > 0")["data"]["result"]
    return {series["metric"]["tier"] for series in result} == set(TIERS)


@pytest.mark.usefixtures("traffic")
def test_every_recording_rule_has_series_of_every_tier(prometheus: str):
    empty = [name for name in recorded_names() if not query(prometheus, name)["data"]["result"]]
    assert not empty, f"recording rules without series: {empty}"
    for name in ("tier:tierserve_requests:rate5m", "tier:tierserve_slo_misses_per_request:ratio_rate5m"):
        tiers = {series["metric"]["tier"] for series in query(prometheus, name)["data"]["result"]}
        assert tiers == set(TIERS), name
    assert _all_tiers_requested(prometheus)


@pytest.mark.usefixtures("traffic")
def test_every_dashboard_query_runs(prometheus: str):
    queries = dashboard_queries()
    assert len(queries) > 20
    failed = {
        expr: answer.get("error") for expr in queries if (answer := query(prometheus, expr))["status"] != "success"
    }
    assert not failed, failed
    (p50,) = [expr for expr in queries if expr.startswith("tier:tierserve_request_latency_seconds:p50")]
    assert {series["metric"]["tier"] for series in query(prometheus, p50)["data"]["result"]} == set(TIERS)
