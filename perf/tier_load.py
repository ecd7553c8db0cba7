"""What perf/locustfile.py's users send and how their outcomes are named, without locust (which patches the process
with gevent on import), so it is unit-tested in milliseconds."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from tierserve.client import Classification, TierserveError
from tierserve.client.errors import TIMED_OUT, UNREACHABLE
from tierserve.load_shedding import shed_message
from tierserve.policy import Attribute
from tierserve.signature import TIERS
from tierserve.tier_keys import KEYLESS_TIER
from tierserve.tools.paths import TIER_KEY_FILE

Tier = Literal[TIERS]
NAMES_BY = ("route", "path")  # what may name the stats row of an answer (LoadSettings.name_by)
MAX_ACCOUNT_AGE_DAYS = 3650  # an int attribute (account_age_days) is drawn from 0 to this


class LoadSettings(BaseModel):
    """The locustfile's own options (locust's own, users, spawn rate, run time and host, are locust's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier_mix: dict[Tier, NonNegativeInt] = Field(
        min_length=1, description="locust users of each tier, in proportion; a tier left out gets none"
    )
    tier_key: str | None = Field(
        None,
        pattern=r"^[!-~]+$",  # printable ASCII without spaces, as `tierserve tier-key add` prints keys
        description="the key critical users send (tiers above standard need one); the others send none",
    )
    images: PositiveInt = Field(
        400, description="how many images the users draw from: test-split digits varied as `tierserve demo`'s mix"
    )
    seed: int = Field(0, description="seeds the images, and with its number each user's draws and attributes")
    think_ms: NonNegativeFloat = Field(
        100.0, description="each user waits a uniform 0 to think_ms between its requests (0: none)"
    )
    name_by: Literal[NAMES_BY] = Field(
        "route",
        description="what names the stats row of an answer: its ROUTE (the model that answered), or its PATH "
        "(every model tried, with its outcome: fallbacks and passed-over models show)",
    )

    @model_validator(mode="after")
    def _users_and_keys(self) -> LoadSettings:
        if not any(self.tier_mix.values()):
            raise ValueError(f"tier_mix gives no tier any users: {self.tier_mix}")
        if self.tier_key is None and (keyed := [t for t in self.tier_mix if self.tier_mix[t] and needs_key(t)]):
            raise ValueError(
                f"{keyed[0]} users need a tier key: --tier-key, $TIERSERVE_TIER_KEY, or the file {TIER_KEY_FILE} "
                "that `tierserve serve` writes (or leave the tier out of --tier-mix)"
            )
        return self


def option_problems(error: ValidationError) -> str:
    """LoadSettings' complaints as the command-line options they are about: '--tier-mix gold: ...'."""
    problems = []
    for problem in error.errors():
        option = f"--{str(problem['loc'][0]).replace('_', '-')}" if problem["loc"] else "options"
        where = " ".join(str(part) for part in problem["loc"][1:] if part != "[key]")
        problems.append(f"{option}{' ' + where if where else ''}: {problem['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def needs_key(tier: str) -> bool:
    """Whether a request of `tier` needs a tier key (tiers above standard do)."""
    return TIERS.index(tier) < TIERS.index(KEYLESS_TIER)


def parse_tier_mix(text: str) -> dict[str, int]:
    """'critical=1,standard=6,best_effort=3' as {tier: users}; LoadSettings checks the tiers and counts."""
    mix: dict[str, int] = {}
    for part in filter(None, (part.strip() for part in text.split(","))):
        tier, equals, count = part.partition("=")
        if not equals or not count.strip().isdigit():
            raise ValueError(f"--tier-mix: expected tier=count pairs such as critical=1,standard=6, got {part!r}")
        if tier.strip() in mix:
            raise ValueError(f"--tier-mix: tier {tier.strip()!r} given twice")
        mix[tier.strip()] = int(count)
    return mix


def tier_key_from(option: str, key_file: Path = TIER_KEY_FILE) -> str | None:
    """The tier key: the option's (or its environment variable's), else the one `tierserve serve` wrote, else
    None."""
    if option:
        return option
    return key_file.read_text().strip() if key_file.is_file() else None


def http_address(host: str) -> str:
    """The server's HTTP host:port from locust's --host, `http://host:port` or `host:port`."""
    address = host.removeprefix("http://")
    if "://" in address:
        raise ValueError(
            f"--host: expected the server's HTTP address, http://host:port or host:port, got {host!r}; gRPC is not "
            "offered: with gRPC's gevent mode, which locust needs, most runs hung at exit closing their channels "
            "(grpcio 1.85, tried here)"
        )
    name, colon, port = address.rpartition(":")
    if not colon or not name or not port.isdigit() or "/" in address:
        raise ValueError(f"--host: expected http://host:port or host:port, got {host!r}")
    return address


def user_attributes(attributes: Mapping[str, Attribute], rng: np.random.Generator) -> dict[str, str | int]:
    """One user's request attributes, one value of each the policy declares: a listed value, or a whole number."""
    return {
        name: str(rng.choice(attribute.values))
        if attribute.values is not None
        else int(rng.integers(0, MAX_ACCOUNT_AGE_DAYS + 1))
        for name, attribute in attributes.items()
    }


def request_type(tier: str) -> str:
    """The locust request type of a tier's calls: with row_name, what names a row of locust's statistics."""
    return f"digits {tier}"


def row_name(answer: Classification, name_by: str) -> str:
    """The name of an answer's row of locust's statistics, by LoadSettings.name_by."""
    return answer.path if name_by == "path" else answer.route


class Failure(Enum):
    """Why a call failed, as the locust stats row of its failures is named."""

    SHED = "shed"  # the router refused it under load (load_shedding): a retry later, or at a higher tier, is served
    TIMED_OUT = "timed out"  # no answer within the client's timeout
    UNAVAILABLE = "unavailable"  # the server could not be reached, or has not the model ready
    REFUSED = "refused"  # the server refused the request itself (a bad parameter or image, a missing tier key)

    @classmethod
    def of(cls, error: TierserveError, tier: str) -> Failure:
        if error.status in TIMED_OUT.values():
            return cls.TIMED_OUT
        if error.status in UNREACHABLE.values():
            # a shed request is UNAVAILABLE too; only the message tells them apart (Triton 2.51 has no other field)
            return cls.SHED if shed_prefix(tier) in error.message else cls.UNAVAILABLE
        return cls.REFUSED


def shed_prefix(tier: str) -> str:
    """The start of the router's message for a shed request of `tier`, whatever the reason."""
    marker = "\0"
    return shed_message(tier, marker).partition(marker)[0]


class ShedError(Exception):
    """A shed call, as locust's failures table lists it: one row per tier, not one per queue wait measured."""

    def __init__(self, tier: str) -> None:
        super().__init__(f"{tier} request shed by the router under load (HTTP 503, gRPC UNAVAILABLE)")
