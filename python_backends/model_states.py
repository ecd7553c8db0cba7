"""Which models the router serves itself, and which it may call, as Triton says of them now.

Two lists of the policy depend on a model's state in Triton, which each router instance reads every POLL_S
from the server's HTTP endpoint (the one its queue statistics come from):
- `in_process`: the router runs the model's own artifact itself, with no hop, while Triton has that version
  READY and its configuration injects no fault. Otherwise the router calls the model through Triton, so an
  operator's unload or fault drill acts on routed traffic as on any other model.
- `optional_models`: models a server may not load (the TensorRT variant on a CPU host). While one is not READY
  the router skips it: PATH says `<model> unavailable` and the next model of its chain answers.
Until the first reading (the HTTP endpoint starts after the models), in-process models are served in-process
and optional models are unavailable.

Every model the router may call is also read every DRILL_POLL_S for a fault drill (`tierserve fault`): time the
router spends waiting on a drilled model's calls is the drill's, not load, so the load gauge leaves it out and a
slow canary candidate under a latency drill does not get healthy traffic shed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from tierserve.faults import FaultSpec
from tierserve.queue_wait import own_address, server_get

POLL_S = 0.25  # how often an instance reads the state of these models; a change takes effect this late at most
DRILL_POLL_S = 1.0  # how often an instance reads whether the models it calls inject faults


@dataclass(frozen=True)
class TritonState:
    """One model version as Triton has it now."""

    ready: bool
    faulted: bool = False  # its configuration injects faults (tierserve fault), or could not be read


class ModelStates:
    """The router's view of its in-process and optional models, updated from Triton's."""

    def __init__(
        self, in_process: Iterable[str] = (), optional: Iterable[str] = (), called: Iterable[str] = ()
    ) -> None:
        self.in_process_models = tuple(in_process)
        self.optional_models = tuple(optional)
        # the names (not versions: a fault drill reloads a whole model) of every model the router may call
        self.called_names = tuple(dict.fromkeys(model.split(":")[0] for model in called))
        self._serving = set(self.in_process_models)
        self._ready: set[str] = set()
        self._drilled: set[str] = set()

    @property
    def watched(self) -> tuple[str, ...]:
        return (*self.in_process_models, *self.optional_models)

    def in_process(self, model: str) -> bool:
        """Whether the router answers for `model` itself now."""
        return model in self._serving

    def unavailable(self, model: str) -> bool:
        """Whether `model` is an optional model this server does not have READY now."""
        return model in self.optional_models and model not in self._ready

    def drilled(self, model: str) -> bool:
        """Whether `model` ('name:version') injects faults now, as of the last reading."""
        return model.split(":")[0] in self._drilled

    def update_drill(self, name: str, drilled: bool) -> None:
        (self._drilled.add if drilled else self._drilled.discard)(name)

    def update(self, model: str, state: TritonState) -> None:
        (self._ready.add if state.ready else self._ready.discard)(model)
        if model in self.in_process_models:
            (self._serving.add if state.ready and not state.faulted else self._serving.discard)(model)


class TritonStateProbe:
    """Reads a model version's readiness and configuration from the server's HTTP endpoint."""

    def __init__(self, address: str | None = None, timeout_s: float = 1.0) -> None:
        self.address = own_address(address)
        self._timeout_s = timeout_s

    def read(self, model: str) -> TritonState:
        """The state of `model` ('name:version'); OSError when the server does not answer."""
        name, version = model.split(":")
        status, _ = server_get(self.address, f"/v2/models/{name}/versions/{version}/ready", self._timeout_s)
        if status != 200:
            return TritonState(ready=False)
        status, body = server_get(self.address, f"/v2/models/{name}/versions/{version}/config", self._timeout_s)
        return TritonState(ready=True, faulted=status != 200 or injects_faults(body))

    def drilled(self, name: str) -> bool:
        """Whether model `name`'s configuration injects faults; a model not loaded is not drilled (its calls fail,
        and failed calls are the router's stalls anyway). OSError when the server does not answer."""
        status, body = server_get(self.address, f"/v2/models/{name}/config", self._timeout_s)
        return status == 200 and injects_faults(body)


def injects_faults(config_body: bytes) -> bool:
    """Whether a model configuration (GET .../config) switches fault injection on; an unreadable one counts as
    faulted: the router then calls the model through Triton, as it would without an in-process copy."""
    try:
        parameters = json.loads(config_body).get("parameters") or {}
        return FaultSpec.from_parameters({k: v.get("string_value", "") for k, v in parameters.items()}).active
    except (ValueError, AttributeError):  # FaultConfigError is a ValueError
        return True
