"""Open-loop HTTP load: prepared KServe requests sent in turn at a fixed rate, whatever the server answers.

A closed loop (N clients, each waiting for its answer) slows down with the server, so it can never
offer more than the server sustains; an open loop keeps sending on schedule. Cheap per request (prepared
byte strings, a minimal HTTP/1.1 reader), so the generator leaves the CPU to the server.
Run it in a process of its own: `run_open_loop` is picklable for multiprocessing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

HEADER_END = b"\r\n\r\n"


def kserve_request(host: str, model: str, images: np.ndarray, parameters: dict[str, object]) -> bytes:
    """An HTTP/1.1 KServe v2 infer request for `images` ([N, H, W] FP32) with request `parameters`
    (Triton takes `priority` from them)."""
    body = json.dumps(
        {
            "parameters": parameters,
            "inputs": [
                {
                    "name": "PIXELS",
                    "datatype": "FP32",
                    "shape": list(images.shape),
                    "data": images.astype(np.float32).ravel().tolist(),
                }
            ],
        }
    ).encode()
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class OpenLoopResult:
    """Latency (s) of every answer by HTTP status, error bodies counted, and sends skipped because every
    connection was busy (the generator, not the server, was the limit)."""

    seconds: float
    latencies: dict[int, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0

    def count(self, status: int | None = None) -> int:
        return sum(len(v) for s, v in self.latencies.items() if status is None or s == status)

    def rate(self, status: int | None = None) -> float:
        return self.count(status) / self.seconds


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, idle: list[_Connection], result: OpenLoopResult) -> None:
        self._idle, self._result = idle, result
        self._buffer = b""
        self._sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> None:
        self._sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(HEADER_END)
        if end < 0:
            return
        head = self._buffer[:end].decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:"))
        if len(self._buffer) < end + 4 + length:
            return
        status = int(head[0].split(" ", 2)[1])
        self._result.latencies.setdefault(status, []).append(time.perf_counter() - self._sent_at)
        if status != 200:
            self._result.errors[self._buffer[end + 4 : end + 4 + length].decode(errors="replace")] += 1
        self._buffer = self._buffer[end + 4 + length :]
        self._idle.append(self)


async def open_loop(
    host: str, port: int, requests: Sequence[bytes], rate: float, seconds: float, max_connections: int = 1024
) -> OpenLoopResult:
    """Send `rate` requests a second for `seconds`, the k-th being `requests`[k % len(requests)], then wait (up to
    10 s) for the answers."""
    if not requests:
        raise ValueError("open_loop needs at least one request to send")
    loop = asyncio.get_running_loop()
    result = OpenLoopResult(seconds)
    idle: list[_Connection] = []
    connections: list[_Connection] = []
    total = round(rate * seconds)
    start = loop.time()
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - start) * rate) + 1)  # the k-th request is due at start + k / rate
        for sent_now in range(due - sent):
            if not idle and len(connections) < max_connections:
                _, connection = await loop.create_connection(lambda: _Connection(idle, result), host, port)
                connections.append(connection)
                idle.append(connection)
            if idle:
                idle.pop().send(requests[(sent + sent_now) % len(requests)])
            else:
                result.skipped += 1
        sent = due
        await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
    drain_until = loop.time() + 10.0
    while len(idle) < len(connections) and loop.time() < drain_until:
        await asyncio.sleep(0.01)
    for connection in connections:
        connection.transport.close()
    return result


def run_open_loop(host: str, port: int, requests: Sequence[bytes], rate: float, seconds: float) -> OpenLoopResult:
    """`open_loop` in a fresh event loop (the entry point of a load process)."""
    return asyncio.run(open_loop(host, port, requests, rate, seconds))
