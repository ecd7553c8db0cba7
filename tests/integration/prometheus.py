"""Read a server's metrics the way Prometheus would."""

from __future__ import annotations

import re
import time
import urllib.request

from tierserve.tools.server import TritonServer


def metric_values(server: TritonServer, name: str, settle_s: float = 0.3, **labels: str) -> list[float]:
    """Values of the series of metric `name` whose labels include `labels` (one per router instance, ...), once what
    was recorded until now has been sent: the router sends its metrics every 0.1 s (METRICS_FLUSH_S), so this waits
    `settle_s` first. Triton's own metrics (nv_*) are current at once: settle_s=0 reads them now."""
    time.sleep(settle_s)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = []
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        series = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if labels.items() <= series.items():
            values.append(float(match.group(3)))
    return values
