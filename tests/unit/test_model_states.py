"""Which models the router serves itself and which optional models it may call, from Triton's own readiness and
configuration of them."""

from __future__ import annotations

import json

import pytest

from tierserve.model_states import ModelStates, TritonState, TritonStateProbe, injects_faults

from .http_stub import http_stub


def _config(**parameters: str) -> bytes:
    values = {key: {"string_value": value} for key, value in parameters.items()}
    return json.dumps({"name": "digits_light", "parameters": values}).encode()


def test_an_in_process_model_is_served_in_process_only_while_ready_and_unfaulted():
    states = ModelStates(in_process=["light:1"], optional=["gpu:1"])
    assert states.watched == ("light:1", "gpu:1")
    assert states.in_process("light:1") and not states.in_process("gpu:1"), "before any reading: in-process"
    assert states.unavailable("gpu:1") and not states.unavailable("light:1"), "an optional model: not until READY"
    for state, served in ((TritonState(ready=False), False), (TritonState(True, faulted=True), False)):
        states.update("light:1", state)
        assert states.in_process("light:1") is served
    states.update("light:1", TritonState(ready=True))
    states.update("gpu:1", TritonState(ready=True))
    assert states.in_process("light:1") and not states.unavailable("gpu:1")
    states.update("gpu:1", TritonState(ready=False))
    assert states.unavailable("gpu:1")


@pytest.mark.parametrize(
    ("body", "faulted"),
    [
        (_config(), False),
        (_config(serves="digits_light", fault_latency_ms="0"), False),
        (_config(fault_latency_ms="50"), True),
        (_config(fault_hard_failure="true"), True),
        (_config(fault_error_rate="2"), True),  # malformed: the server would refuse it; never served in-process
        (b"not json", True),
        (json.dumps({"parameters": {"fault_error_rate": "0.5"}}).encode(), True),  # not Triton's shape
    ],
)
def test_a_configuration_that_injects_or_may_inject_faults_counts_as_faulted(body: bytes, faulted: bool):
    assert injects_faults(body) is faulted


def test_the_probe_reads_readiness_then_configuration_from_the_server():
    replies = {
        "/v2/models/digits_light/versions/1/ready": (200, b""),
        "/v2/models/digits_light/versions/1/config": (200, _config(fault_error_rate="0.5")),
        "/v2/models/digits_heavy/versions/3/ready": (200, b""),
        "/v2/models/digits_heavy/versions/3/config": (200, _config()),
    }
    with http_stub(lambda path: replies.get(path, (400, b'{"error":"unknown"}'))) as (address, _):
        probe = TritonStateProbe(address=address)
        assert probe.read("digits_light:1") == TritonState(ready=True, faulted=True)
        assert probe.read("digits_heavy:3") == TritonState(ready=True, faulted=False)
        assert probe.read("digits_heavy_trt:1") == TritonState(ready=False)
    with pytest.raises(OSError, match="digits_light/versions/1/ready"):
        probe.read("digits_light:1")


def test_every_model_the_router_calls_is_read_for_a_fault_drill_by_name():
    states = ModelStates(called=["digits_heavy:1", "digits_heavy:3", "digits_light_critical:1"])
    assert states.called_names == ("digits_heavy", "digits_light_critical")
    states.update_drill("digits_heavy", True)
    assert states.drilled("digits_heavy:1") and states.drilled("digits_heavy:3")
    assert not states.drilled("digits_light_critical:1")
    states.update_drill("digits_heavy", False)
    assert not states.drilled("digits_heavy:3")
    replies = {
        "/v2/models/digits_heavy/config": (200, _config(fault_latency_ms="100")),
        "/v2/models/digits_light/config": (200, _config()),
    }
    with http_stub(lambda path: replies.get(path, (400, b'{"error":"unknown"}'))) as (address, _):
        probe = TritonStateProbe(address=address)
        assert probe.drilled("digits_heavy") and not probe.drilled("digits_light")
        assert not probe.drilled("digits_missing"), "not loaded: its calls fail, which is a stall anyway"
