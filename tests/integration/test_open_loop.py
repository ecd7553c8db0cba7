"""The open-loop generator of the P3 benchmark against the real server: it keeps its rate, counts every
answer by status, and keeps the server's error bodies."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tierserve.tier_keys import TIER_KEY_HEADER
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.open_loop import kserve_request, open_loop
from tierserve.tools.server import TritonServer


def _send(server: TritonServer, requests: list[bytes], rate: float, seconds: float):
    host, port = server.http_url.rsplit(":", 1)
    return asyncio.run(open_loop(host, int(port), requests, rate, seconds))


def test_every_request_sent_on_schedule_is_answered(triton: TritonServer, split: DigitsSplit):
    request = kserve_request(
        triton.http_url,
        "digits",
        split.test.images[:2],
        {"tier": "critical", "priority": 1, TIER_KEY_HEADER: triton.tier_key},
    )
    result = _send(triton, [request], rate=200, seconds=1.0)
    assert result.count(200) == 200 and result.count() == 200 and result.skipped == 0
    assert result.rate(200) == 200
    assert all(0 < latency < 5 for latency in result.latencies[200])


def test_refusals_are_counted_with_the_servers_message(triton: TritonServer, split: DigitsSplit):
    request = kserve_request(triton.http_url, "digits", split.test.images[:1].astype(np.float32), {"tier": "gold"})
    result = _send(triton, [request], rate=50, seconds=0.2)
    assert result.count(400) == result.count() == 10 and result.count(200) == 0
    (body,) = result.errors
    assert "parameter 'tier' must be one of critical, standard, best_effort, got 'gold'" in body


def test_the_requests_are_sent_in_turn(triton: TritonServer, split: DigitsSplit):
    requests = [
        kserve_request(triton.http_url, "digits", split.test.images[:1], {"tier": tier})
        for tier in ("standard", "gold", "best_effort", "gold")
    ]
    result = _send(triton, requests, rate=40, seconds=0.5)
    assert result.count(200) == result.count(400) == 10
    assert result.errors.total() == 10


def test_no_request_to_send_is_refused_before_any_connection():
    with pytest.raises(ValueError, match="at least one request"):
        asyncio.run(open_loop("127.0.0.1", 9, [], rate=10, seconds=1))  # port 9 (discard): never dialled
