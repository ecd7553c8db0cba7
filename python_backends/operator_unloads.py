"""What operators unloaded on the server (`tierserve retire`, `tierserve model unload`), kept in the state store so
that it outlives tritonserver: a restarted server loads what its config files list, every version of every model,
and `Lifecycle.reapply_unloads` unloads again what had been unloaded. A load takes what it serves off the record.

The record is in the state store like the promotions, so replicas sharing one store share it: a replica that
restarts unloads what was unloaded on any of them. Pure Python, no Triton.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tierserve.promotions import MODEL_NAME, ModelVersion, first_problem
from tierserve.state_store import StateStore

UNLOADS_KEY = "operator_unloads"  # in the state store (JSON)

ModelName = Annotated[str, StringConstraints(pattern=f"^{MODEL_NAME}$")]


class UnloadsError(ValueError):
    """The stored record is malformed; the message names the key and what is wrong."""


class OperatorUnloads(BaseModel):
    """Models unloaded whole, and versions retired, by an operator and not loaded since."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[ModelName, ...] = Field((), description="models unloaded whole (`tierserve model unload`), sorted")
    versions: dict[ModelName, tuple[Annotated[int, Field(ge=1)], ...]] = Field(
        default_factory=dict, description="model -> its versions retired (`tierserve retire`), sorted"
    )

    def retired(self, version: ModelVersion) -> OperatorUnloads:
        """This record with `version` retired."""
        retired = sorted({*self.versions.get(version.model, ()), version.version})
        return OperatorUnloads(models=self.models, versions={**self.versions, version.model: tuple(retired)})

    def unloaded(self, model: str) -> OperatorUnloads:
        """This record with `model` unloaded whole. Its retired versions go: loading the model again from its
        config file serves what the file lists."""
        versions = {m: v for m, v in self.versions.items() if m != model}
        return OperatorUnloads(models=tuple(sorted({*self.models, model})), versions=versions)

    def serving(self, model: str, versions: Iterable[int]) -> OperatorUnloads:
        """This record once a load left `model` serving `versions`: neither the model (if it serves any) nor those
        versions are unloaded any more."""
        served = set(versions)
        if not served:
            return self
        versions_left = {m: v for m, v in self.versions.items() if m != model}
        if left := tuple(v for v in self.versions.get(model, ()) if v not in served):
            versions_left[model] = left
        return OperatorUnloads(models=tuple(m for m in self.models if m != model), versions=versions_left)

    def targets(self) -> list[str]:
        """What an operator would name to unload it all again: each model unloaded whole, then each 'model:version'
        retired."""
        return [*self.models, *(f"{m}:{v}" for m, versions in sorted(self.versions.items()) for v in versions)]


def stored_unloads(store: StateStore) -> OperatorUnloads:
    """The record in the state store (empty before the first unload); UnloadsError when it is malformed."""
    stored = store.get(UNLOADS_KEY)
    if stored is None:
        return OperatorUnloads()
    try:
        return OperatorUnloads.model_validate_json(stored)
    except ValidationError as error:
        raise UnloadsError(f"state store key {UNLOADS_KEY!r}: {first_problem(error, 'record')}") from None


def store_unloads(store: StateStore, unloads: OperatorUnloads) -> None:
    """Record `unloads` (once the server took the change)."""
    store.set(UNLOADS_KEY, unloads.model_dump_json().encode())
