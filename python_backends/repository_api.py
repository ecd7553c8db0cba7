"""The router reloads a model through its server's HTTP model repository API, not through pb_utils.

Triton 2.51's `pb_utils.unload_model` and `load_model` wait for tritonserver while holding the stub's GIL
(python_backend binds them without releasing it), so every thread of the calling stub stops until the load is
done: a router instance that healed a model answered nothing meanwhile (a critical request waited 0.75 s in
test_chaos, against its 50 ms budget). Over HTTP the wait is on a socket, with the GIL released, and Triton does
the same (TRITONSERVER_ServerUnloadModel, then ServerLoadModel). The model repository API is restricted to the
admin key; the router reads it where tritonserver has it, its command line, which any process of the server's
user may read (README, Threat model)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from tierserve.queue_wait import own_address, server_request

RESTRICTED_API_FLAG = "--http-restricted-api"
MODEL_REPOSITORY_API = "model-repository"
LOAD_TIMEOUT_S = 600.0  # a load may take long (a TensorRT engine); the reload thread waits off the hot path


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


class RepositoryApi:
    """Unload, load and readiness of models on this server over its HTTP endpoint, with the admin header that
    tritonserver (process `server_pid`) was started with, if any."""

    def __init__(self, server_pid: int, address: str | None = None, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.address = own_address(address)
        self.timeout_s = timeout_s
        header = restricted_header(command_line(server_pid))
        self._headers = {header[0]: header[1]} if header else {}

    def _post(self, path: str) -> None:
        status, body = server_request(self.address, "POST", path, self.timeout_s, self._headers)
        if status != 200:
            try:
                message = json.loads(body).get("error", "")
            except (ValueError, AttributeError):
                message = body[:200].decode(errors="replace")
            raise RepositoryError(f"POST {path}: HTTP {status}: {message}")

    def unload(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/unload")

    def load(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/load")

    def ready(self, model: str) -> bool:
        status, _ = server_request(self.address, "GET", f"/v2/models/{model}/ready", 5.0)
        return status == 200
