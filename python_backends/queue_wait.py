"""How long requests queue for a model, as Triton itself measures it.

The router's load signal. Triton counts, per model version, how many requests its scheduler has dispatched
and the nanoseconds they spent queued (statistics extension, `inference_stats.queue`); a Python model is
told neither when a request arrived nor how long it waited. The difference of two readings is the mean
queue wait of the requests dispatched between them: Triton's own figure, which no client can forge (a
client can only make it grow by really loading the server). A request answered with an error is counted
too: the Python backend reports every response it sends as a success.
"""

from __future__ import annotations

import http.client
import json
import os
from dataclasses import dataclass

STATS_URL_ENV = "TIERSERVE_STATS_URL"  # host:port of this server's HTTP endpoint, for its own statistics
DEFAULT_STATS_URL = "127.0.0.1:8000"  # Triton's default HTTP port, for a tritonserver started by hand


@dataclass(frozen=True)
class QueueReading:
    """Triton's cumulative queue statistics of one model version at one moment."""

    dispatched: int
    queued_ns: int


class QueueWaitMeter:
    """The mean queue wait between successive readings."""

    def __init__(self) -> None:
        self._last: QueueReading | None = None

    def mean_wait_ms(self, reading: QueueReading) -> float | None:
        """The mean wait (ms) of the requests dispatched since the previous reading; None when none were, or
        on the first reading, or when the counters went back (the model was reloaded)."""
        last, self._last = self._last, reading
        if last is None or reading.dispatched <= last.dispatched or reading.queued_ns < last.queued_ns:
            return None
        return (reading.queued_ns - last.queued_ns) / (reading.dispatched - last.dispatched) / 1e6


def parse_queue_reading(body: bytes, version: str) -> QueueReading:
    """The queue statistics of `version` in a reply of GET /v2/models/<model>/versions/<version>/stats.

    ValueError when the reply has no statistics for that version."""
    for stats in json.loads(body).get("model_stats", []):
        if str(stats.get("version")) == version:
            queue = stats["inference_stats"]["queue"]
            return QueueReading(int(queue["count"]), int(queue["ns"]))
    raise ValueError(f"the statistics reply has no version {version}")


class QueueProbe:
    """Reads one model version's queue statistics from the server's HTTP endpoint.

    One connection per reading, closed at once: tritonserver waits for open HTTP connections to close before it
    stops (up to its exit timeout, then it exits without unloading its models)."""

    def __init__(self, model: str, version: str, address: str | None = None, timeout_s: float = 1.0) -> None:
        self.address = own_address(address)
        self.path = f"/v2/models/{model}/versions/{version}/stats"
        self.version = version
        self._timeout_s = timeout_s

    def read(self) -> QueueReading:
        """The current reading; OSError or ValueError when the server does not give one."""
        status, body = server_get(self.address, self.path, self._timeout_s)
        if status != 200:
            raise ValueError(f"statistics from {self.address}{self.path}: HTTP {status}")
        return parse_queue_reading(body, self.version)


def own_address(address: str | None = None) -> str:
    """This server's HTTP endpoint (host:port): `address`, else $TIERSERVE_STATS_URL, else Triton's default."""
    return address or os.environ.get(STATS_URL_ENV) or DEFAULT_STATS_URL


def server_get(address: str, path: str, timeout_s: float) -> tuple[int, bytes]:
    """GET `path` from this server's HTTP endpoint: the status and body; OSError when the server does not answer."""
    return server_request(address, "GET", path, timeout_s)


def server_request(
    address: str,
    method: str,
    path: str,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, bytes]:
    """`method` `path` (with `body`) on this server's HTTP endpoint, on a connection of its own, closed at once (a
    kept connection would hold up tritonserver's shutdown): the status and body; OSError when the server does not
    answer."""
    connection = http.client.HTTPConnection(address, timeout=timeout_s)
    try:
        connection.request(method, path, body=body, headers={**(headers or {}), "Connection": "close"})
        reply = connection.getresponse()
        return reply.status, reply.read()
    except (OSError, http.client.HTTPException) as error:
        raise OSError(f"{address}{path}: {error}") from error
    finally:
        connection.close()
