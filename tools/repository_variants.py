"""A model repository that links every model of another but gives the router some files of its own (its policy,
its inference log settings)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tierserve.router_files import POLICY_FILE, ROUTER_MODEL


def router_variant(source: Path, target: Path, files: Mapping[str, str]) -> Path:
    """Fill `target` with links to `source`'s models and a router whose files named in `files` (name -> text)
    are written instead of linked; return `target`."""
    for model in source.iterdir():
        if model.is_dir() and model.name != ROUTER_MODEL:
            (target / model.name).symlink_to(model.resolve())
    router_folder(source, target, files)
    return target


def router_folder(source: Path, target: Path, files: Mapping[str, str]) -> Path:
    """`target`'s router folder: links to `source`'s router files but those named in `files` (name -> text), which
    are written instead; return it."""
    router = target / ROUTER_MODEL
    router.mkdir()
    for item in (source / ROUTER_MODEL).iterdir():
        if item.name not in files:
            (router / item.name).symlink_to(item.resolve())
    for name, text in files.items():
        (router / name).write_text(text)
    return router


def policy_variant(source: Path, target: Path, policy: dict[str, Any]) -> Path:
    """Fill `target` with links to `source`'s models and a router whose policy is `policy`; return `target`."""
    return router_variant(source, target, {POLICY_FILE: yaml.safe_dump(policy, sort_keys=False)})


def shipped_policy(source: Path) -> dict[str, Any]:
    """The policy document of `source`'s router, as a dict to modify."""
    return yaml.safe_load((source / ROUTER_MODEL / POLICY_FILE).read_text())
