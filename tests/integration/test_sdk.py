"""The client SDK keeps faults local: shared between threads it answers every call, every call ends within its
timeout, and every failure (a refusal, a peer that never answers, no server) is a TierserveError with a typed
status, over gRPC and HTTP, sync and asyncio."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus

import numpy as np
import pytest
from grpc import StatusCode

from tierserve.client import AsyncTierserveClient, Classification, TierserveClient, TierserveError
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.server import TritonServer
from tierserve.tools.workload import upscaled

PROTOCOLS = ["grpc", "http"]
TIMED_OUT = {"grpc": StatusCode.DEADLINE_EXCEEDED, "http": HTTPStatus.GATEWAY_TIMEOUT}
UNREACHABLE = {"grpc": StatusCode.UNAVAILABLE, "http": HTTPStatus.SERVICE_UNAVAILABLE}
SLACK_S = 1.5  # how late past its timeout a call may end on a busy 2-core machine


def _url(triton: TritonServer, protocol: str) -> str:
    return triton.grpc_url if protocol == "grpc" else triton.http_url


@pytest.fixture
def silent_peer() -> Iterator[str]:
    """host:port of a socket that accepts connections and never answers: a server that hangs, not a mock."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the handshakes; nothing ever reads or writes
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def nothing_listening() -> str:
    """host:port where nothing listens: a server that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _classify_async(url: str, protocol: str, images: np.ndarray, **options: float) -> list[Classification]:
    """One call of a fresh AsyncTierserveClient; `options` split into the client's timeout and the call's."""

    async def run() -> list[Classification]:
        async with AsyncTierserveClient(url, protocol, timeout_s=options.get("client_timeout_s", 10.0)) as client:
            return await client.classify(images, timeout_s=options.get("timeout_s"))

    return asyncio.run(run())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_client_shared_by_8_threads_answers_every_call(triton: TritonServer, split: DigitsSplit, protocol: str):
    """Each thread sends its own image size and batch sizes, so an answer that went to the wrong thread shows. (The
    threads once shared tritonclient.http's headers dict, into which it writes each call's JSON length: under load,
    a few calls in a thousand sent another's length and were refused as unparseable.)"""
    calls_per_thread = 24
    answered: dict[int, list[tuple[int, list[Classification]]]] = {thread: [] for thread in range(8)}
    failed: list[tuple[int, str]] = []
    start = threading.Barrier(8)

    def work(thread: int, client: TierserveClient) -> None:
        start.wait()
        for call in range(calls_per_thread):
            first = (thread * calls_per_thread + call) * 4 % (len(split.test.images) - 4)
            images = upscaled(split.test.images[first : first + 1 + call % 4], thread + 1)
            try:
                answered[thread].append((first, client.classify(images, tier="critical", user_id=f"t{thread}")))
            except TierserveError as error:
                failed.append((thread, str(error)))

    with TierserveClient(_url(triton, protocol), protocol, tier_key=triton.tier_key) as client:
        threads = [threading.Thread(target=work, args=(t, client), daemon=True) for t in range(8)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(60 - (time.monotonic() - began), 0))
        assert not any(thread.is_alive() for thread in threads), "every call ended within 60 s"

    assert failed == [], "no call failed"
    labels, expected = [], []
    for thread, calls in answered.items():
        assert len(calls) == calls_per_thread, f"thread {thread} got an answer to each of its calls"
        size = 8 * (thread + 1)
        for call, (first, answers) in enumerate(calls):
            assert len(answers) == 1 + call % 4, "one answer per image sent, in that call"
            assert all(f"size={size}x{size}" in answer.reason for answer in answers), "the thread's own images"
            labels += [answer.label for answer in answers]
            expected += split.test.labels[first : first + len(answers)].tolist()
    assert np.mean(np.array(labels) == np.array(expected)) >= 0.9


def test_closing_a_shared_http_client_ends_its_threads(triton: TritonServer, split: DigitsSplit):
    client = TierserveClient(triton.http_url, "http", max_connections=4)
    threads = [threading.Thread(target=client.classify, args=(split.test.images[i],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert any(t.name.startswith("tierserve-http") for t in threading.enumerate())
    client.close()
    assert not any(t.name.startswith("tierserve-http") for t in threading.enumerate())


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "timeouts",
    [{"client_timeout_s": 0.3}, {"client_timeout_s": 30.0, "timeout_s": 0.3}],
    ids=["client_timeout", "call_timeout"],
)
def test_a_call_to_a_server_that_never_answers_ends_at_its_timeout(
    silent_peer: str, protocol: str, timeouts: dict[str, float]
):
    image = np.zeros((8, 8), np.float32)
    with TierserveClient(silent_peer, protocol, timeout_s=timeouts["client_timeout_s"]) as client:
        began = time.monotonic()
        with pytest.raises(TierserveError) as caught:
            client.classify(image, timeout_s=timeouts.get("timeout_s"))
        took = time.monotonic() - began
    assert caught.value.status == TIMED_OUT[protocol] and caught.value.retryable
    assert 0.3 <= took < 0.3 + SLACK_S

    began = time.monotonic()
    with pytest.raises(TierserveError) as caught:
        _classify_async(silent_peer, protocol, image, **timeouts)
    assert caught.value.status == TIMED_OUT[protocol]
    assert 0.3 <= time.monotonic() - began < 0.3 + SLACK_S


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_call_that_runs_out_of_time_does_not_spoil_the_next(triton: TritonServer, split: DigitsSplit, protocol: str):
    """Timeouts from 0.1 ms (before the request is out) to 10 ms (while the server works on it): whatever state
    an interrupted call left its connection in, the next call on the same single connection is answered."""
    timed_out = 0
    with TierserveClient(_url(triton, protocol), protocol, max_connections=1, tier_key=triton.tier_key) as client:
        for timeout_s in (0.0001, 0.001, 0.003, 0.01) * 3:
            try:
                client.classify(split.test.images[:64], tier="critical", timeout_s=timeout_s)
            except TierserveError as error:
                assert error.status == TIMED_OUT[protocol], error
                timed_out += 1
            (answer,) = client.classify(split.test.images[0], tier="critical")
            assert answer.label == split.test.labels[0]
    assert timed_out >= 3, "a call of 64 images is not answered within 0.1 ms"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_is_down_is_a_tierserve_error(nothing_listening: str, protocol: str):
    image = np.zeros((8, 8), np.float32)
    with TierserveClient(nothing_listening, protocol) as client, pytest.raises(TierserveError) as caught:
        client.classify(image)
    assert caught.value.status == UNREACHABLE[protocol] and caught.value.retryable
    assert caught.value.message

    with pytest.raises(TierserveError) as caught:
        _classify_async(nothing_listening, protocol, image)
    assert caught.value.status == UNREACHABLE[protocol] and caught.value.retryable


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refusal_has_the_typed_status_of_its_protocol_and_is_not_retryable(
    triton: TritonServer, split: DigitsSplit, protocol: str
):
    with TierserveClient(_url(triton, protocol), protocol) as client, pytest.raises(TierserveError) as caught:
        client.classify(split.test.images[:1], tier="gold")
    expected = StatusCode.INVALID_ARGUMENT if protocol == "grpc" else HTTPStatus.BAD_REQUEST
    assert caught.value.status == expected and type(caught.value.status) is type(expected)
    assert not caught.value.retryable
    assert "parameter 'tier'" in caught.value.message and str(caught.value).startswith(
        "INVALID_ARGUMENT: " if protocol == "grpc" else "400 Bad Request: "
    )

    with pytest.raises(TierserveError) as caught:
        _classify_async(_url(triton, protocol), protocol, np.full((1, 8, 8), np.inf, np.float32))
    assert caught.value.status == expected and "infinite" in caught.value.message
