"""The manifest written beside every built model version: what it is, how it was made, how good it is."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"


class ManifestError(ValueError):
    """A model version folder has no usable manifest."""


@dataclass(frozen=True)
class Manifest:
    """Provenance and quality of one model version, as written by `tierserve build`."""

    model: str
    version: int
    runtime: str  # which Runner serves the artifact: "onnxruntime" or "centroids"
    artifact: str  # file name inside the version folder
    artifact_sha256: str
    accepts_missing: bool  # whether the model handles NaN pixels itself
    seed: int
    recipe: dict[str, Any]  # trainer and hyperparameters; a changed recipe forces a rebuild
    split: dict[str, Any]  # fingerprint of the train/validation/test split it was trained and scored on
    test_accuracy: float  # on the held-out test split
    ops_per_sample: int  # multiply-adds (networks) or node visits (trees) for one image
    us_per_sample: float  # measured at batch 64 on one CPU thread, on the building machine
    libraries: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)  # further held-out measurements

    def write(self, version_dir: Path) -> None:
        (version_dir / MANIFEST_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, version_dir: Path) -> Manifest:
        path = version_dir / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path} is missing: run `tierserve build` to build the models") from None
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path} is not valid JSON: {error}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if missing := sorted(required - data.keys()):
            raise ManifestError(f"{path} lacks {', '.join(missing)}: rebuild with `tierserve build --force`")
        if unknown := sorted(data.keys() - names):
            raise ManifestError(f"{path} has unknown keys {', '.join(unknown)}")
        return cls(**data)


def version_dir(repository: Path, model: str) -> Path:
    """The folder of a 'name:version' model in a model repository."""
    name, version = model.split(":")
    return repository / name / version
