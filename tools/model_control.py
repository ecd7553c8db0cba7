"""Operator actions on a running server through Triton's model repository API (needs the admin key)."""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tritonclient.utils import InferenceServerException

from tierserve.client.errors import is_restricted_refusal
from tierserve.faults import FAULT_KEYS, FaultConfigError, FaultSpec
from tierserve.repository_api import READY
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


@dataclass(frozen=True)
class VersionState:
    """One entry of the server's repository index: a model version and its state."""

    model: str
    version: str  # "" for a model the server lists without versions (never loaded, or unloaded)
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str  # why it is not READY, when Triton says


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
        """Reload `model` with its config plus these fault parameters (FaultSpec() switches faults off), serving the
        versions it serves (Triton 2.51 reports the version policy of the model's last full load, not a later
        retirement's). FaultConfigError for an ensemble, which runs no code of its own to fault (a Python model
        without an injector refuses the load itself: tierserve.faults.refuse_faults)."""
        config = self.config(model)
        if config.get("platform") == "ensemble":
            steps = sorted({step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])})
            raise FaultConfigError(f"{model} is an ensemble: drill one of its steps' models ({', '.join(steps)})")
        parameters = {k: v for k, v in config.get("parameters", {}).items() if k not in FAULT_KEYS}
        if spec.active:
            parameters.update({k: {"string_value": v} for k, v in spec.to_parameters().items()})
        config["parameters"] = parameters
        if serving := self.ready_versions(model):
            self.load_versions(model, serving, config)
        else:
            self.load_with(model, config)

    def index(self) -> list[VersionState]:
        """Every model version the server knows of, loaded or not, with its state (the repository index)."""
        with _admin_call("repository index"):
            if self.protocol == "grpc":
                entries = self._client.get_model_repository_index(headers=self._headers, as_json=True).get("models", [])
            else:
                entries = self._client.get_model_repository_index(headers=self._headers)
        return [VersionState(e["name"], e.get("version", ""), e.get("state", ""), e.get("reason", "")) for e in entries]

    def ready_versions(self, model: str) -> set[int]:
        """The versions of `model` the server serves now."""
        return {int(v.version) for v in self.index() if v.model == model and v.state == READY and v.version}

    def load_versions(self, model: str, versions: Iterable[int], config: dict | None = None) -> None:
        """Reload `model` (with `config`, default its running one) serving exactly `versions`: those it did not
        serve are loaded, those it served and are not listed are unloaded once the new ones are ready."""
        config = dict(self.config(model) if config is None else config)
        config["version_policy"] = {"specific": {"versions": sorted(versions)}}
        self.load_with(model, config)

    def unload(self, model: str) -> None:
        with _admin_call(f"unload {model}"):
            self._client.unload_model(model, headers=self._headers)

    def load(self, model: str) -> None:
        with _admin_call(f"load {model}"):
            self._client.load_model(model, headers=self._headers)

    def close(self) -> None:
        self._client.close()
