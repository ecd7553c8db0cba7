"""A model repository that links every model of another but gives the router its own policy file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tierserve.router_files import POLICY_FILE, ROUTER_MODEL


def policy_variant(source: Path, target: Path, policy: dict[str, Any]) -> Path:
    """Fill `target` with links to `source`'s models and a router whose policy is `policy`; return `target`."""
    for model in source.iterdir():
        if model.is_dir() and model.name != ROUTER_MODEL:
            (target / model.name).symlink_to(model.resolve())
    router = target / ROUTER_MODEL
    router.mkdir()
    for item in (source / ROUTER_MODEL).iterdir():
        if item.name != POLICY_FILE:
            (router / item.name).symlink_to(item.resolve())
    (router / POLICY_FILE).write_text(yaml.safe_dump(policy, sort_keys=False))
    return target


def shipped_policy(source: Path) -> dict[str, Any]:
    """The policy document of `source`'s router, as a dict to modify."""
    return yaml.safe_load((source / ROUTER_MODEL / POLICY_FILE).read_text())
