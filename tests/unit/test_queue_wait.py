"""The router's load signal: Triton's queue statistics, read over HTTP and turned into a mean wait."""

from __future__ import annotations

import json

import pytest

from tierserve.queue_wait import QueueProbe, QueueReading, QueueWaitMeter, parse_queue_reading

from .http_stub import http_stub


def _stats(version: str, count: int, ns: int) -> bytes:
    queue = {"count": count, "ns": ns}
    return json.dumps(
        {"model_stats": [{"name": "router", "version": version, "inference_stats": {"queue": queue}}]}
    ).encode()


def test_the_mean_wait_is_of_the_requests_dispatched_between_readings():
    meter = QueueWaitMeter()
    assert meter.mean_wait_ms(QueueReading(10, 50_000_000)) is None, "the first reading has nothing to compare"
    assert meter.mean_wait_ms(QueueReading(14, 90_000_000)) == pytest.approx(10.0)  # 40 ms over 4 requests
    assert meter.mean_wait_ms(QueueReading(14, 90_000_000)) is None, "nothing dispatched: no figure, not zero"
    assert meter.mean_wait_ms(QueueReading(2, 1_000_000)) is None, "counters that went back: the model reloaded"
    assert meter.mean_wait_ms(QueueReading(3, 1_500_000)) == pytest.approx(0.5), "and it counts on from there"


def test_a_reading_is_taken_from_its_own_version_only():
    body = json.dumps(
        {
            "model_stats": [
                json.loads(_stats("1", 5, 7))["model_stats"][0],
                json.loads(_stats("2", 9, 9))["model_stats"][0],
            ]
        }
    ).encode()
    assert parse_queue_reading(body, "2") == QueueReading(9, 9)
    with pytest.raises(ValueError, match="no version 3"):
        parse_queue_reading(body, "3")


def test_the_probe_reads_the_servers_statistics_and_says_when_it_cannot():
    replies = [(200, _stats("1", 3, 6_000_000)), (400, b'{"error":"no such model"}')]
    with http_stub(lambda path: replies.pop(0)) as (address, paths):
        probe = QueueProbe("router", "1", address=address)
        assert probe.read() == QueueReading(3, 6_000_000)
        with pytest.raises(ValueError, match="HTTP 400"):
            probe.read()
        assert paths == ["/v2/models/router/versions/1/stats"] * 2
    with pytest.raises(OSError, match="/v2/models/router/versions/1/stats"):
        probe.read()  # nobody listens there any more
