"""The router reloads a model through its server's HTTP model repository API, not through pb_utils.

Triton 2.51's `pb_utils.unload_model` and `load_model` wait for tritonserver while holding the stub's GIL
(python_backend binds them without releasing it), so every thread of the calling stub stops until the load is
done: a router instance that healed a model answered nothing meanwhile (a critical request waited 0.75 s in
test_chaos, against its 50 ms budget). Over HTTP the wait is on a socket, with the GIL released, and Triton does
the same load (TRITONSERVER_ServerLoadModelWithParameters). The model repository API is restricted to the
admin key; the router reads it where tritonserver has it, its command line, which any process of the server's
user may read (README, Threat model).

A reload loads the configuration the model runs with, not its config.pbtxt: a model that a fault drill reconfigured,
or whose versions a promotion or retirement changed, keeps that when its stub dies and is healed. The supervisor
reloads the same way (tools/supervisor.py)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from tierserve.queue_wait import own_address, server_request

RESTRICTED_API_FLAG = "--http-restricted-api"
MODEL_REPOSITORY_API = "model-repository"
LOAD_TIMEOUT_S = 600.0  # a load may take long (a TensorRT engine); the reload thread waits off the hot path
CONFIG_TIMEOUT_S = 5.0
# Triton skips a load whose configuration and files are unchanged, so a reload of the running configuration
# carries this parameter, counting the reloads of the model (models ignore parameters not theirs).
RELOAD_MARK = "tierserve_reloads"
READY = "READY"  # the state of a version the server serves, in the repository index


def reload_config(running: dict, serving: Collection[int]) -> dict:
    """The configuration to load a model again with: `running` (model_config.proto as JSON, as the server reports
    it) with its reload count one higher and, when `serving` names the versions it serves now, a version policy of
    exactly those. Triton 2.51 reports the configuration of a model's last full load: a load that changed only
    its version policy (a retirement's, a promotion's) changes the versions served, not the reported policy. So the
    versions come from the repository index, not from `running`."""
    parameters = dict(running.get("parameters") or {})
    count = int(parameters.get(RELOAD_MARK, {}).get("string_value", "0"))
    parameters[RELOAD_MARK] = {"string_value": str(count + 1)}
    config = {**running, "parameters": parameters}
    if serving:
        config["version_policy"] = {"specific": {"versions": sorted(serving)}}
    return config


def ready_versions(index: Iterable[Mapping[str, str]], model: str) -> set[int]:
    """The versions of `model` that the repository index (POST /v2/repository/index) says are READY."""
    return {
        int(entry["version"])
        for entry in index
        if entry.get("name") == model and entry.get("state") == READY and entry.get("version", "").isdigit()
    }


def restricted_header(argv: Sequence[str], api: str = MODEL_REPOSITORY_API) -> tuple[str, str] | None:
    """The header (name, value) that tritonserver's command line `argv` restricts `api` to, from
    `--http-restricted-api=APIS:KEY=VALUE` (or the flag and its value as two arguments); None when it is not
    restricted."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(RESTRICTED_API_FLAG + "=")]
    values += [value for flag, value in itertools.pairwise(argv) if flag == RESTRICTED_API_FLAG]
    for value in values:
        apis, _, header = value.partition(":")
        name, equals, key = header.partition("=")
        if api in apis.split(",") and name and equals:
            return name, key
    return None


def command_line(pid: int) -> list[str]:
    """Process `pid`'s command line; OSError when it cannot be read."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


class RepositoryError(OSError):
    """The server did not do what was asked: its HTTP status and Triton's error message."""


class NotLoaded(RepositoryError):
    """No version of the model is READY any more (it was unloaded meanwhile): there is nothing to reload."""


class RepositoryApi:
    """The configuration, repository index, loads and readiness of models on this server over its HTTP endpoint,
    with the admin header that tritonserver (process `server_pid`) was started with, if any."""

    def __init__(self, server_pid: int, address: str | None = None, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.address = own_address(address)
        self.timeout_s = timeout_s
        header = restricted_header(command_line(server_pid))
        self._headers = {header[0]: header[1]} if header else {}

    def _call(self, method: str, path: str, timeout_s: float, body: bytes | None = None) -> bytes:
        status, reply = server_request(self.address, method, path, timeout_s, self._headers, body)
        if status != 200:
            try:
                message = json.loads(reply).get("error", "")
            except (ValueError, AttributeError):
                message = reply[:200].decode(errors="replace")
            raise RepositoryError(f"{method} {path}: HTTP {status}: {message}")
        return reply

    def config(self, model: str) -> dict:
        """The configuration the server runs `model` with (model_config.proto as JSON)."""
        reply = self._call("GET", f"/v2/models/{model}/config", CONFIG_TIMEOUT_S)
        try:
            return json.loads(reply)
        except ValueError as error:
            raise RepositoryError(f"GET /v2/models/{model}/config: not JSON: {reply[:200]!r}") from error

    def load(self, model: str, config: dict) -> None:
        """Load `model` with `config` in place of its config.pbtxt; if that fails, the loaded version keeps
        serving."""
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        self._call("POST", f"/v2/repository/models/{model}/load", self.timeout_s, body)

    def index(self) -> list[dict[str, str]]:
        """The repository index: every model version the server knows of, with its state."""
        reply = self._call("POST", "/v2/repository/index", CONFIG_TIMEOUT_S, b"{}")
        try:
            index = json.loads(reply)
        except ValueError:
            index = None
        if not isinstance(index, list) or not all(isinstance(entry, dict) for entry in index):
            raise RepositoryError(f"POST /v2/repository/index: not a JSON list of models: {reply[:200]!r}")
        return index

    def reload(self, model: str) -> None:
        """Load `model` again with the configuration and versions it runs with: Triton starts new instances, then
        ends the old ones (a dead stub's among them). NotLoaded when no version of it is READY: an operator's unload
        is not undone."""
        serving = ready_versions(self.index(), model)
        if not serving:
            raise NotLoaded(f"no version of {model} is READY in the repository index (unloaded meanwhile)")
        self.load(model, reload_config(self.config(model), serving))

    def ready(self, model: str) -> bool:
        status, _ = server_request(self.address, "GET", f"/v2/models/{model}/ready", CONFIG_TIMEOUT_S)
        return status == 200
