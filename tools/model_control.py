"""Operator actions on a running server through Triton's model repository API (needs the admin key)."""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator

from tritonclient.utils import InferenceServerException

from tierserve.client.errors import is_restricted_refusal
from tierserve.faults import FAULT_KEYS, FaultSpec
from tierserve.tools.server import ADMIN_HEADER, GRPC_ADMIN_HEADER, admin_headers


class AdminKeyRefused(PermissionError):
    """The server refused an admin call: no admin key was sent, or not the one it runs with."""


@contextlib.contextmanager
def _admin_call(action: str) -> Iterator[None]:
    """A refusal for want of the admin key becomes AdminKeyRefused. Triton 2.51 answers it with 403 over HTTP and
    with UNAVAILABLE over gRPC, which reads as "retry later"; it is not."""
    try:
        yield
    except InferenceServerException as error:
        if is_restricted_refusal(error.message() or ""):
            raise AdminKeyRefused(
                f"{action}: the server refused the admin key ({error.message()}); use the key it "
                f"runs with ($TIERSERVE_ADMIN_KEY or .tierserve/admin_key), sent as "
                f"{ADMIN_HEADER} over HTTP or {GRPC_ADMIN_HEADER} over gRPC"
            ) from None
        raise


class ModelControl:
    """Load, unload and reconfigure models on one server, over HTTP (`url` its HTTP port) or gRPC."""

    def __init__(self, url: str, admin_key: str, protocol: str = "http") -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.protocol = protocol
        self._client = importlib.import_module(f"tritonclient.{protocol}").InferenceServerClient(url)
        self._headers = admin_headers(protocol, admin_key)

    def config(self, model: str) -> dict:
        """The model's configuration as the server holds it (model_config.proto as JSON)."""
        if self.protocol == "grpc":
            return self._client.get_model_config(model, as_json=True)["config"]
        return self._client.get_model_config(model)

    def load_with(self, model: str, config: dict) -> None:
        """Reload `model` with a config override; on failure the loaded version keeps serving."""
        with _admin_call(f"load {model}"):
            self._client.load_model(model, config=json.dumps(config), headers=self._headers)

    def set_fault(self, model: str, spec: FaultSpec) -> None:
        """Reload `model` with its config plus these fault parameters (FaultSpec() switches faults off)."""
        config = self.config(model)
        parameters = {k: v for k, v in config.get("parameters", {}).items() if k not in FAULT_KEYS}
        if spec.active:
            parameters.update({k: {"string_value": v} for k, v in spec.to_parameters().items()})
        config["parameters"] = parameters
        self.load_with(model, config)

    def unload(self, model: str) -> None:
        with _admin_call(f"unload {model}"):
            self._client.unload_model(model, headers=self._headers)

    def load(self, model: str) -> None:
        with _admin_call(f"load {model}"):
            self._client.load_model(model, headers=self._headers)

    def close(self) -> None:
        self._client.close()
