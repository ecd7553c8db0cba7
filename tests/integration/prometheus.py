"""Read a server's metrics the way Prometheus would."""

from __future__ import annotations

import re
import time
import urllib.request

from tierserve.tools.server import TritonServer


def metric_values(server: TritonServer, name: str, **labels: str) -> list[float]:
    """Values of the series of metric `name` whose labels include `labels` (one per router instance, ...), once what
    was recorded until now has been sent: the router sends its metrics every 0.1 s (METRICS_FLUSH_S)."""
    time.sleep(0.3)
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
