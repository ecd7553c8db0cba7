"""Operator actions on a running server through Triton's model repository API (needs the admin key)."""

from __future__ import annotations

import json

import tritonclient.http as httpclient

from tierserve.faults import FAULT_KEYS, FaultSpec
from tierserve.tools.server import ADMIN_HEADER


class ModelControl:
    """Load, unload and reconfigure models on one server over HTTP."""

    def __init__(self, http_url: str, admin_key: str) -> None:
        self._client = httpclient.InferenceServerClient(http_url)
        self._headers = {ADMIN_HEADER: admin_key}

    def config(self, model: str) -> dict:
        """The model's configuration as the server holds it (model_config.proto as JSON)."""
        return self._client.get_model_config(model)

    def load_with(self, model: str, config: dict) -> None:
        """Reload `model` with a config override; on failure the loaded version keeps serving."""
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
        self._client.unload_model(model, headers=self._headers)

    def load(self, model: str) -> None:
        self._client.load_model(model, headers=self._headers)

    def close(self) -> None:
        self._client.close()
