"""Replay: an operator re-sends logged rows, and the router decides each one as it did the first time.

A row's randomized decisions (bandit draws, shadow sampling, request-unit buckets) come from its seed, and its
user-unit buckets from the user's keyed hash; the inference log keeps both. `tierserve replay` sends them back in
the request parameter `tierserve_replay`, one token per row, each signed with the state store's secret (the one
behind REQUEST_IDs and user hashes), so only someone who holds the server's state can choose a row's seed or pose
as a user's hash. A replayed row is answered as any other but counts for no experiment, mirrors nothing to a
shadow and is not logged again.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

REPLAY_PARAMETER = "tierserve_replay"
_TAG_BYTES = 16
_TOKEN = re.compile(r"^(?P<seed>[0-9]{1,20})\.(?P<user>[0-9a-f]{0,64})\.(?P<tag>[0-9a-f]{32})$")


class ReplayTokenError(ValueError):
    """A tierserve_replay parameter that is malformed, forged, or does not match the request's rows."""


@dataclass(frozen=True)
class ReplayRow:
    """What a replayed row's decision is drawn from: the seed it was answered with and its user's keyed hash."""

    seed: int
    user: str  # the user's keyed hash as logged ("" for no user)


def _tag(secret: bytes, seed: int, user: str) -> str:
    return hmac.digest(secret, f"replay:{seed}.{user}".encode(), "sha256")[:_TAG_BYTES].hex()


def replay_token(secret: bytes, row: ReplayRow) -> str:
    """One row's token: `seed.user.tag`."""
    return f"{row.seed}.{row.user}.{_tag(secret, row.seed, row.user)}"


def replay_parameter(secret: bytes, rows: list[ReplayRow]) -> str:
    """The tierserve_replay value for a request of these rows, in order."""
    return ",".join(replay_token(secret, row) for row in rows)


def parse_replay(secret: bytes, value: object, rows: int) -> list[ReplayRow]:
    """The rows a tierserve_replay value stands for; ReplayTokenError when it is malformed, when any tag is not the
    server's own (compared in constant time), or when it does not hold one token per row of the request."""
    if not isinstance(value, str):
        raise ReplayTokenError(f"parameter {REPLAY_PARAMETER} must be a string")
    tokens = value.split(",")
    if len(tokens) != rows:
        raise ReplayTokenError(f"parameter {REPLAY_PARAMETER} must hold one token per image: {rows}")
    parsed = []
    for token in tokens:
        match = _TOKEN.match(token)
        if match is None or int(match["seed"]) >= 2**64:
            raise ReplayTokenError(f"parameter {REPLAY_PARAMETER} holds a malformed token")
        row = ReplayRow(int(match["seed"]), match["user"])
        if not hmac.compare_digest(match["tag"], _tag(secret, row.seed, row.user)):
            raise ReplayTokenError(
                f"parameter {REPLAY_PARAMETER} is not signed by this server's state: only `tierserve replay` sends it"
            )
        parsed.append(row)
    return parsed
