"""TierserveClient and AsyncTierserveClient: `classify` and `feedback` over gRPC or HTTP with the official
tritonclient."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import math
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from tierserve.client.classification import (
    FEEDBACK_MODEL,
    FEEDBACK_OUTPUTS,
    MODEL,
    OUTPUTS,
    Classification,
    as_pixels,
    decode,
    feedback_tensors,
    request_parameters,
    unaccepted,
)
from tierserve.client.errors import TierserveError, call_errors
from tierserve.signature import TIERS, triton_priority
from tierserve.tier_keys import TIER_KEY_HEADER

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 10.0  # far above any answer the router gives (its SLOs are 50-500 ms), far below "hung"


def _module(protocol: str, asyncio: bool) -> ModuleType:
    """tritonclient.grpc, tritonclient.http or their .aio twins, imported only when used."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}{'.aio' if asyncio else ''}")


def _connection_errors(protocol: str, asyncio: bool) -> tuple[type[BaseException], ...]:
    """What the transport raises, raw, for a connection it could not make or lost; gRPC says UNAVAILABLE itself."""
    if protocol == "grpc":
        return ()
    if asyncio:
        import aiohttp

        return (aiohttp.ClientConnectionError, OSError)
    from geventhttpclient.response import HTTPParseError

    return (HTTPParseError, OSError)


def _url(url: str | None, protocol: str) -> str:
    if url and "://" in url:
        raise ValueError(f"url is host:port, without a scheme, got {url!r}")
    return url or DEFAULT_URLS[protocol]


def _positive(timeout_s: float) -> float:
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def _tier_key_headers(tier_key: str | None) -> dict[str, str] | None:
    """The header (HTTP) or metadata (gRPC) that carries a tier key on every call; None without a key."""
    if tier_key is None:
        return None
    if not isinstance(tier_key, str) or not tier_key or not all("!" <= c <= "~" for c in tier_key):
        raise ValueError(
            "tier_key must be a non-empty string of printable ASCII without spaces, as "
            "`tierserve tier-key add` prints it"
        )
    return {TIER_KEY_HEADER: tier_key}


def _request(
    module: ModuleType,
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    headers: dict[str, str] | None,
    parameters: dict[str, Any] | None = None,
    priority: int = 0,
) -> dict[str, Any]:
    """tritonclient's infer() arguments for one call of `model`: each input's Triton type from its numpy dtype."""
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return {
        "model_name": model,
        "inputs": tensors,
        "outputs": [module.InferRequestedOutput(name) for name in outputs],
        "parameters": parameters or None,
        "priority": priority,
        # a dict of the call's own: tritonclient.http's infer() writes the call's Inference-Header-Content-Length
        # into the dict it is given, so calls of several threads sharing one dict sent each other's lengths
        "headers": None if headers is None else dict(headers),
    }


def _accepted(result: Any) -> None:
    """A `feedback` answer; the server refuses bad feedback with an error, so a row it did not accept is a bug."""
    if rows := unaccepted(result):
        raise TierserveError(None, f"feedback for rows {rows} was answered but not accepted")


class _GrpcCalls:
    """One tritonclient.grpc client for every thread: its channel is thread-safe and multiplexes their calls."""

    def __init__(self, module: ModuleType, url: str) -> None:
        self._client = module.InferenceServerClient(url)

    def infer(self, request: dict[str, Any], timeout_s: float) -> Any:
        return self._client.infer(**request, client_timeout=timeout_s)

    def close(self) -> None:
        self._client.close()


@dataclass
class _Connection:
    """One of _HttpCalls' threads: its tritonclient.http client (None until made or after a timeout) and the
    gevent hub that client is bound to."""

    hub: Any
    client: Any = None


class _HttpCalls:
    """HTTP calls run on the client's own threads, each thread with its own tritonclient.http client.

    A tritonclient.http client is bound to the gevent hub of the thread that made it (shared, it hangs), and its
    timeouts apply per socket operation and are fixed at construction. So a gevent.Timeout bounds each call as a
    whole, and a client it interrupts is replaced: its connection is mid-request. Threads of the client's own
    bound the number of connections and let close() release each thread's hub, which a caller's thread that has
    ended would leave open.
    """

    def __init__(self, module: ModuleType, url: str, max_connections: int) -> None:
        self._module = module
        self._url = url
        self._threads = ThreadPoolExecutor(max_connections, thread_name_prefix="tierserve-http")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []

    def _infer(self, request: dict[str, Any], deadline: float) -> Any:
        """On one of the client's threads: the call, through that thread's client, bounded by `deadline`."""
        import gevent  # imported by tritonclient.http already; gRPC users never load it

        connection: _Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = _Connection(gevent.get_hub())
            with self._lock:
                self._connections.append(connection)
        if connection.client is None:
            connection.client = self._module.InferenceServerClient(self._url)
        timeout = gevent.Timeout(max(deadline - time.monotonic(), 0.0))
        try:
            with timeout:
                return connection.client.infer(**request)
        except gevent.Timeout as error:
            if error is not timeout:
                raise
            connection.client.close()
            connection.client = None
            raise TimeoutError from None

    def infer(self, request: dict[str, Any], timeout_s: float) -> Any:
        call = self._threads.submit(self._infer, request, time.monotonic() + timeout_s)
        try:
            return call.result(timeout=timeout_s)  # the whole call, waiting for a free thread included
        except concurrent.futures.TimeoutError:
            call.cancel()  # not started: never sent; started: its own deadline ends it
            raise TimeoutError from None

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:  # their threads have ended: gevent allows releasing the hubs from here
            if connection.client is not None:
                connection.client.close()
            connection.hub.destroy(destroy_loop=True)


class _Client:
    """What the blocking and asyncio clients share: their settings, and the request and bound of a call."""

    def __init__(self, url: str | None, protocol: str, timeout_s: float, tier_key: str | None, asyncio: bool) -> None:
        self._headers = _tier_key_headers(tier_key)
        self._module = _module(protocol, asyncio=asyncio)
        self.url = _url(url, protocol)
        self.protocol = protocol
        self.timeout_s = _positive(timeout_s)
        self._connection_errors = _connection_errors(protocol, asyncio=asyncio)
        self._closed = False

    def _timeout(self, call: str, timeout_s: float | None) -> float:
        """How long a call may take (its own `timeout_s` or the client's); a closed client refuses the call."""
        if self._closed:
            raise ValueError(f"{call} on a closed client")
        return self.timeout_s if timeout_s is None else _positive(timeout_s)

    def _classify_request(
        self,
        images: np.ndarray,
        tier: str | None,
        user_id: str | None,
        deadline_ms: int | None,
        attributes: Mapping[str, str | int] | None,
        timeout_s: float | None,
    ) -> tuple[dict[str, Any], float]:
        """The request `classify` sends, and how long it may take."""
        timeout_s = self._timeout("classify", timeout_s)
        parameters = request_parameters(tier, user_id, deadline_ms, attributes)
        # the tier's Triton priority orders the queues of `digits`' steps; no tier: the default level
        priority = triton_priority(tier) if tier in TIERS else 0
        inputs = {"PIXELS": as_pixels(images)}
        return _request(self._module, MODEL, inputs, OUTPUTS, self._headers, parameters, priority), timeout_s

    def _feedback_request(
        self, request_ids: str | Sequence[str], labels: int | Sequence[int], timeout_s: float | None
    ) -> tuple[dict[str, Any], float]:
        """The request `feedback` sends, and how long it may take."""
        timeout_s = self._timeout("feedback", timeout_s)
        inputs = feedback_tensors(request_ids, labels)
        return _request(self._module, FEEDBACK_MODEL, inputs, FEEDBACK_OUTPUTS, self._headers), timeout_s


class TierserveClient(_Client):
    """Blocking client, safe to share between threads: `TierserveClient("localhost:8001").classify(images)`.

    Every call is bounded by `timeout_s` seconds, and every failure (a refusal, no answer in time, no server)
    raises TierserveError. Over gRPC all calls share one channel; over HTTP at most `max_connections` run at
    once, each on its own connection, and the others wait for one (within their timeout). `tier_key` (from
    `tierserve tier-key add`) goes with every call as the tierserve-tier-key header: tiers above standard need it.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_connections: int = 8,
        tier_key: str | None = None,
    ) -> None:
        super().__init__(url, protocol, timeout_s, tier_key, asyncio=False)
        self._calls = (
            _GrpcCalls(self._module, self.url)
            if protocol == "grpc"
            else _HttpCalls(self._module, self.url, max_connections)
        )

    def classify(
        self,
        images: np.ndarray,
        *,
        tier: str | None = None,
        user_id: str | None = None,
        deadline_ms: int | None = None,
        attributes: Mapping[str, str | int] | None = None,
        timeout_s: float | None = None,
    ) -> list[Classification]:
        """Classify [N, H, W] images (or one [H, W]). `attributes` are request attributes policy.yaml declares
        (region, device, ...), for experiments; `timeout_s` overrides the client's for this call."""
        return decode(self._infer(*self._classify_request(images, tier, user_id, deadline_ms, attributes, timeout_s)))

    def feedback(
        self, request_ids: str | Sequence[str], labels: int | Sequence[int], *, timeout_s: float | None = None
    ) -> None:
        """Say which label each answered image really had, by its Classification.request_id: one call for all.
        The server refuses an unknown or expired id, a second feedback for an id, or a label outside 0-9 with
        INVALID_ARGUMENT (400 over HTTP), which comes out as a TierserveError that is not retryable."""
        _accepted(self._infer(*self._feedback_request(request_ids, labels, timeout_s)))

    def _infer(self, request: dict[str, Any], timeout_s: float) -> Any:
        with call_errors(self.protocol, self.url, timeout_s, self._connection_errors):
            return self._calls.infer(request, timeout_s)

    def close(self) -> None:
        """Close every connection, whichever thread used it; closing again does nothing."""
        if not self._closed:
            self._closed = True
            self._calls.close()

    def __enter__(self) -> TierserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncTierserveClient(_Client):
    """asyncio client: `await AsyncTierserveClient("localhost:8001").classify(images)`; timeouts, errors and
    `tier_key` as TierserveClient's."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tier_key: str | None = None,
    ) -> None:
        super().__init__(url, protocol, timeout_s, tier_key, asyncio=True)
        # HTTP: no session-wide bound (it would cut a longer per-call timeout short); asyncio.wait_for bounds calls
        options = {"conn_timeout": None} if protocol == "http" else {}
        self._client = self._module.InferenceServerClient(self.url, **options)

    async def classify(
        self,
        images: np.ndarray,
        *,
        tier: str | None = None,
        user_id: str | None = None,
        deadline_ms: int | None = None,
        attributes: Mapping[str, str | int] | None = None,
        timeout_s: float | None = None,
    ) -> list[Classification]:
        """Classify [N, H, W] images (or one [H, W]); `attributes` and `timeout_s` as TierserveClient's."""
        request = self._classify_request(images, tier, user_id, deadline_ms, attributes, timeout_s)
        return decode(await self._infer(*request))

    async def feedback(
        self, request_ids: str | Sequence[str], labels: int | Sequence[int], *, timeout_s: float | None = None
    ) -> None:
        """Say which label each answered image really had, as TierserveClient.feedback."""
        _accepted(await self._infer(*self._feedback_request(request_ids, labels, timeout_s)))

    async def _infer(self, request: dict[str, Any], timeout_s: float) -> Any:
        with call_errors(self.protocol, self.url, timeout_s, self._connection_errors):
            if self.protocol == "grpc":
                return await self._client.infer(**request, client_timeout=timeout_s)
            return await asyncio.wait_for(self._client.infer(**request), timeout_s)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.close()

    async def __aenter__(self) -> AsyncTierserveClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
