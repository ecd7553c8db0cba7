"""The shipped policy as it was while digits_heavy:2 was the heavy route (before digits_heavy:3 and its TensorRT
variant): the tests of promotions, lifecycle and canaries change digits_heavy's routed version starting from 2,
whatever version ships."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tierserve.policy import Policy, parse_policy
from tierserve.router_files import POLICY_FILE
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.repository_variants import router_folder, shipped_policy

_HEAVY = re.compile(r"(digits_heavy(?:_critical)?):([23])\b")


def heavy_v2_document(source: Path = DEFAULT_REPOSITORY) -> dict[str, Any]:
    """The shipped policy document with digits_heavy versions 2 and 3 swapped and no optional models."""
    text = _HEAVY.sub(lambda m: f"{m.group(1)}:{5 - int(m.group(2))}", yaml.safe_dump(shipped_policy(source)))
    policy = yaml.safe_load(text)
    optional = set(policy.pop("optional_models", []))
    policy["models"] = [m for m in policy["models"] if m not in optional]
    chains = {route: chain for route, chain in policy["fallbacks"].items() if route not in optional}
    policy["fallbacks"] = {route: [m for m in chain if m not in optional] for route, chain in chains.items()}
    if policy["cascade"]["escalate_to"] in optional:
        policy["cascade"]["escalate_to"] = "digits_heavy:2"
    return policy


def heavy_v2_policy() -> Policy:
    return parse_policy(heavy_v2_document())


def heavy_v2_router(target: Path, source: Path = DEFAULT_REPOSITORY) -> Path:
    """`target`'s router folder: `source`'s router with the digits_heavy:2 policy."""
    return router_folder(source, target, {POLICY_FILE: yaml.safe_dump(heavy_v2_document(source), sort_keys=False)})
