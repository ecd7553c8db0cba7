"""Manifests round-trip and say what to do when they are missing or incomplete."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tierserve.manifest import Manifest, ManifestError

EXAMPLE = Manifest(
    model="digits_light",
    version=1,
    runtime="onnxruntime",
    artifact="model.onnx",
    artifact_sha256="ab" * 32,
    accepts_missing=False,
    seed=0,
    recipe={"trainer": "distilled_logistic"},
    split={"seed": 1},
    test_accuracy=0.96,
    ops_per_sample=640,
    us_per_sample=0.5,
    libraries={"numpy": "1.26.4"},
)


def test_a_manifest_round_trips(tmp_path: Path):
    EXAMPLE.write(tmp_path)
    assert Manifest.read(tmp_path) == EXAMPLE


def test_a_missing_manifest_says_how_to_build_it(tmp_path: Path):
    with pytest.raises(ManifestError, match="tierserve build"):
        Manifest.read(tmp_path)


def test_missing_keys_are_named(tmp_path: Path):
    data = dataclasses.asdict(EXAMPLE)
    del data["test_accuracy"], data["seed"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="lacks seed, test_accuracy"):
        Manifest.read(tmp_path)


def test_unknown_keys_are_named(tmp_path: Path):
    (tmp_path / "manifest.json").write_text(json.dumps({**dataclasses.asdict(EXAMPLE), "colour": "blue"}))
    with pytest.raises(ManifestError, match="unknown keys colour"):
        Manifest.read(tmp_path)


def test_invalid_json_is_reported(tmp_path: Path):
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(tmp_path)
