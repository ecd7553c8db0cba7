"""Read a request's KServe parameters (tier, user_id, deadline_ms) into a RequestContext, or say what is wrong."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tierserve.signature import TIERS, RequestContext

KNOWN_PARAMETERS = ("tier", "user_id", "deadline_ms")


class ParameterError(ValueError):
    """A request parameter is malformed; the message names it."""


def parse_context(parameters: Mapping[str, Any], default_tier: str) -> RequestContext:
    """The request's context. Parameters may arrive as strings (HTTP JSON, gRPC string_param) or typed."""
    if unknown := sorted(set(parameters) - set(KNOWN_PARAMETERS)):
        raise ParameterError(f"unknown parameter {unknown[0]!r}; digits accepts {', '.join(KNOWN_PARAMETERS)}")
    tier = parameters.get("tier", default_tier)
    if tier not in TIERS:
        raise ParameterError(f"parameter 'tier' must be one of {', '.join(TIERS)}, got {tier!r}")
    user_id = parameters.get("user_id", "")
    if not isinstance(user_id, str):
        raise ParameterError(f"parameter 'user_id' must be a string, got {user_id!r}")
    deadline = parameters.get("deadline_ms")
    if deadline is not None:
        if isinstance(deadline, bool) or not (isinstance(deadline, int) or
                                             (isinstance(deadline, str) and deadline.strip().isdigit())):
            raise ParameterError(f"parameter 'deadline_ms' must be a positive integer, got {deadline!r}")
        deadline = int(deadline)
        if deadline <= 0:
            raise ParameterError(f"parameter 'deadline_ms' must be a positive integer, got {deadline}")
    return RequestContext(tier, user_id, deadline)
