"""Request parameters are read strictly: a malformed one is named, an unknown one is refused."""

from __future__ import annotations

import pytest

from tierserve.policy import Attribute
from tierserve.request_context import ParameterError, parse_context
from tierserve.signature import RequestContext


def test_defaults_when_no_parameters_are_sent():
    assert parse_context({}, "standard") == RequestContext("standard", "", None)


def test_all_parameters_typed_or_as_strings():
    expected = RequestContext("critical", "u-7", 25)
    assert parse_context({"tier": "critical", "user_id": "u-7", "deadline_ms": 25}, "standard") == expected
    assert parse_context({"tier": "critical", "user_id": "u-7", "deadline_ms": "25"}, "standard") == expected


def test_the_forwarded_tier_key_is_not_an_unknown_parameter():
    """Triton forwards the tierserve-tier-key header into the parameters, named as the client spelled it."""
    for name in ("tierserve-tier-key", "TierServe-Tier-Key"):
        assert parse_context({"tier": "critical", name: "k"}, "standard") == RequestContext("critical", "", None)


def test_parameters_sent_as_tierserve_param_headers_are_read_as_parameters():
    """For clients that send headers but no parameters (perf_analyzer over HTTP); Triton forwards them as sent."""
    attributes = {"region": Attribute("region", ("eu", "us"))}
    headers = {
        "Tierserve-Param-Tier": "best_effort",
        "tierserve-param-deadline-ms": "40",
        "tierserve-param-region": "eu",
    }
    context = parse_context(headers, "standard", attributes)
    assert context == RequestContext("best_effort", "", 40, {"region": "eu"})
    both = parse_context({"tier": "best_effort", "tierserve-param-tier": "best_effort"}, "standard")
    assert both.tier == "best_effort", "the same value twice is one"
    with pytest.raises(ParameterError, match="'tier' was sent twice with different values"):
        parse_context({"tier": "critical", "tierserve-param-tier": "best_effort"}, "standard")
    with pytest.raises(ParameterError, match="unknown parameter 'colour'"):
        parse_context({"tierserve-param-colour": "red"}, "standard")
    # a header cannot smuggle in what only the router sends downstream (the lanes' token) or the tier key
    with pytest.raises(ParameterError, match="unknown parameter 'tierserve_lane_token'"):
        parse_context({"tierserve-param-tierserve-lane-token": "forged"}, "standard")
    with pytest.raises(ParameterError, match="unknown parameter 'tierserve_tier_key'"):
        parse_context({"tierserve-param-tierserve-tier-key": "forged"}, "standard")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"tier": "gold"}, "parameter 'tier' must be one of critical, standard, best_effort, got 'gold'"),
        ({"deadline_ms": "soon"}, "parameter 'deadline_ms' must be a positive integer, got 'soon'"),
        ({"deadline_ms": 0}, "parameter 'deadline_ms' must be a positive integer up to 3600000, got 0"),
        ({"deadline_ms": -5}, "parameter 'deadline_ms' must be a positive integer up to 3600000, got -5"),
        ({"deadline_ms": "²"}, "parameter 'deadline_ms' must be a positive integer, got '²'"),
        ({"deadline_ms": "٣"}, "parameter 'deadline_ms' must be a positive integer, got '٣'"),
        (
            {"deadline_ms": "99999999999999999999"},
            "parameter 'deadline_ms' must be a positive integer, got '99999999999999999999'",
        ),
        (
            {"deadline_ms": 10**30},
            "parameter 'deadline_ms' must be a positive integer up to 3600000, got 1000000000000000000000000000000",
        ),
        ({"tier": ["critical"]}, "parameter 'tier' must be one of critical, standard, best_effort, got ['critical']"),
        ({"user_id": "u" * 300}, "parameter 'user_id' must be at most 256 characters, got 300"),
        (
            {"tier": "x" * 10_000},
            "parameter 'tier' must be one of critical, standard, best_effort, "
            "got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (10002 chars)",
        ),
        ({"deadline_ms": 2.5}, "parameter 'deadline_ms' must be a positive integer, got 2.5"),
        ({"deadline_ms": True}, "parameter 'deadline_ms' must be a positive integer, got True"),
        ({"user_id": 42}, "parameter 'user_id' must be a string, got 42"),
        ({"model": "digits_heavy"}, "unknown parameter 'model'; digits accepts tier, user_id, deadline_ms"),
    ],
)
def test_bad_parameters_are_named(parameters, message):
    with pytest.raises(ParameterError) as caught:
        parse_context(parameters, "standard")
    assert str(caught.value) == message
