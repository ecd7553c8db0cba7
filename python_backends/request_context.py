"""Read a request's KServe parameters (tier, user_id, deadline_ms and the attributes the policy declares) into a
RequestContext, or say what is wrong."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tierserve.policy import Attribute
from tierserve.signature import TIERS, RequestContext
from tierserve.tier_keys import TIER_KEY_HEADER

KNOWN_PARAMETERS = ("tier", "user_id", "deadline_ms")
# Any parameter may come as the HTTP header or gRPC metadata `tierserve-param-NAME` ('-' for '_' in NAME), which
# tritonserver forwards as a request parameter (tools/server.py): for clients that send headers but no parameters,
# such as perf_analyzer over HTTP. The same value as a parameter and as a header is one; two values are refused.
PARAMETER_HEADER_PREFIX = "tierserve-param-"
MAX_DEADLINE_MS = 3_600_000  # an hour: anything longer is a mistake, not a deadline
MAX_USER_ID_CHARS = 256
ECHO_CHARS = 40  # a refused value is echoed at most this long: a client's payload never fills a log line
_DECIMAL = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses
_WHOLE = re.compile(r"-?[0-9]{1,10}")


class ParameterError(ValueError):
    """A request parameter is malformed; the message names it."""


def echo(value: Any) -> str:
    """A client-sent value as an error message shows it: its repr, cut to ECHO_CHARS."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} chars)"


def _deadline_ms(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ParameterError(f"parameter 'deadline_ms' must be a positive integer, got {echo(value)}")
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value.strip()):
            raise ParameterError(f"parameter 'deadline_ms' must be a positive integer, got {echo(value)}")
        value = int(value.strip())
    if not 0 < value <= MAX_DEADLINE_MS:
        raise ParameterError(
            f"parameter 'deadline_ms' must be a positive integer up to {MAX_DEADLINE_MS}, got {echo(value)}"
        )
    return value


def _attribute(attribute: Attribute, value: Any) -> str | int:
    if attribute.values is not None:
        if not isinstance(value, str) or value not in attribute.values:
            raise ParameterError(
                f"parameter {attribute.name!r} must be one of {', '.join(attribute.values)}, got {echo(value)}"
            )
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**10:
        return value
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        return int(value.strip())
    raise ParameterError(f"parameter {attribute.name!r} must be a whole number, got {echo(value)}")


def _with_headers(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters with every `tierserve-param-NAME` header taken as parameter NAME."""
    merged = {str(name): value for name, value in parameters.items()}
    for name, value in parameters.items():
        lowered = str(name).lower()
        if not lowered.startswith(PARAMETER_HEADER_PREFIX):
            continue
        del merged[str(name)]
        key = lowered.removeprefix(PARAMETER_HEADER_PREFIX).replace("-", "_")
        if key in merged and merged[key] != value:
            raise ParameterError(
                f"parameter {echo(key)} was sent twice with different values ({echo(merged[key])} and header "
                f"{echo(str(name))}: {echo(value)}); send one"
            )
        merged[key] = value
    return merged


def parse_context(
    parameters: Mapping[str, Any], default_tier: str, attributes: Mapping[str, Attribute] | None = None
) -> RequestContext:
    """The request's context. Parameters may arrive as strings (HTTP JSON, gRPC string_param) or typed. The tier
    key (forwarded from the tierserve-tier-key header, in any case) is not part of it: tier_keys judges it.
    `attributes` are the policy's declared request attributes; any other parameter is refused."""
    attributes = attributes or {}
    parameters = _with_headers(parameters)
    names = {str(name) for name in parameters if str(name).lower() != TIER_KEY_HEADER}
    if unknown := sorted(names - set(KNOWN_PARAMETERS) - set(attributes)):
        accepted = ", ".join([*KNOWN_PARAMETERS, *attributes])
        raise ParameterError(f"unknown parameter {echo(unknown[0])}; digits accepts {accepted}")
    tier = parameters.get("tier", default_tier)
    if not isinstance(tier, str) or tier not in TIERS:
        raise ParameterError(f"parameter 'tier' must be one of {', '.join(TIERS)}, got {echo(tier)}")
    user_id = parameters.get("user_id", "")
    if not isinstance(user_id, str):
        raise ParameterError(f"parameter 'user_id' must be a string, got {echo(user_id)}")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise ParameterError(f"parameter 'user_id' must be at most {MAX_USER_ID_CHARS} characters, got {len(user_id)}")
    deadline = parameters.get("deadline_ms")
    sent = {name: _attribute(spec, parameters[name]) for name, spec in attributes.items() if name in parameters}
    return RequestContext(tier, user_id, None if deadline is None else _deadline_ms(deadline), sent)
