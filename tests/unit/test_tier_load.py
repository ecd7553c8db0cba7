"""perf/tier_load.py, what perf/locustfile.py's users send and how their outcomes are named; and the environment
locust is installed in: its pin beside tritonclient's leaves `pip check` clean."""

from __future__ import annotations

import subprocess
import sys
from http import HTTPStatus
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from tierserve.client import Classification, TierserveError
from tierserve.load_shedding import shed_message
from tierserve.router_files import router_policy
from tierserve.tools.paths import DEFAULT_REPOSITORY

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

from tier_load import (
    MAX_ACCOUNT_AGE_DAYS,
    Failure,
    LoadSettings,
    http_address,
    option_problems,
    parse_tier_mix,
    row_name,
    tier_key_from,
    user_attributes,
)


def test_pip_check_is_clean() -> None:
    """locust 2.18.4 is the last that installs beside tritonclient[all]==2.51.0's geventhttpclient<=2.0.2."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tier_mix_parses_tier_count_pairs() -> None:
    assert parse_tier_mix("critical=1, standard=6,best_effort=3,") == {"critical": 1, "standard": 6, "best_effort": 3}


@pytest.mark.parametrize(
    ("text", "problem"),
    [("standard", "'standard'"), ("standard=x", "'standard=x'"), ("standard=-1", "'standard=-1'")],
)
def test_tier_mix_refuses_what_is_not_a_pair(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=f"--tier-mix: expected tier=count pairs .*got {problem}"):
        parse_tier_mix(text)


def test_tier_mix_refuses_a_tier_given_twice() -> None:
    with pytest.raises(ValueError, match="tier 'standard' given twice"):
        parse_tier_mix("standard=1,standard=2")


def _problems(**settings: object) -> str:
    with pytest.raises(ValidationError) as caught:
        LoadSettings(**settings)
    return option_problems(caught.value)


def test_settings_name_the_option_at_fault() -> None:
    assert _problems(tier_mix={"gold": 1}).startswith("--tier-mix gold: Input should be 'critical', 'standard'")
    assert _problems(tier_mix={"standard": 1}, think_ms=-1) == "--think-ms: Input should be greater than or equal to 0"
    assert _problems(tier_mix={"standard": 0, "best_effort": 0}).startswith("options: tier_mix gives no tier any users")


def test_critical_users_need_a_tier_key_and_the_others_none() -> None:
    assert "critical users need a tier key: --tier-key" in _problems(tier_mix={"critical": 1, "standard": 1})
    assert LoadSettings(tier_mix={"critical": 0, "standard": 1}).tier_key is None
    assert LoadSettings(tier_mix={"critical": 1}, tier_key="k").tier_mix == {"critical": 1}


def test_tier_key_comes_from_the_option_else_the_served_file(tmp_path: Path) -> None:
    key_file = tmp_path / "tier_key"
    assert tier_key_from("", key_file) is None
    key_file.write_text("written-by-serve\n")
    assert tier_key_from("", key_file) == "written-by-serve"
    assert tier_key_from("given", key_file) == "given"


def test_host_is_the_http_address() -> None:
    assert http_address("http://127.0.0.1:8000") == "127.0.0.1:8000"
    assert http_address("localhost:8000") == "localhost:8000"


@pytest.mark.parametrize("host", ["grpc://127.0.0.1:8001", "https://a:1", "127.0.0.1", "http://:8000", "a:1/v2", "a:b"])
def test_host_refuses_what_is_no_http_address(host: str) -> None:
    with pytest.raises(ValueError, match="--host: expected"):
        http_address(host)


def test_a_tier_key_is_printable_ascii_without_spaces() -> None:
    assert _problems(tier_mix={"standard": 1}, tier_key="a key").startswith("--tier-key: String should match")


def test_each_user_gets_one_allowed_value_of_every_declared_attribute() -> None:
    declared = router_policy(DEFAULT_REPOSITORY).attributes
    attributes = [user_attributes(declared, np.random.default_rng([0, user])) for user in range(50)]
    for name, attribute in declared.items():
        values = {user[name] for user in attributes}
        if attribute.values is None:
            assert all(isinstance(v, int) and 0 <= v <= MAX_ACCOUNT_AGE_DAYS for v in values), name
        else:
            assert values == set(attribute.values), name  # 50 users draw every value
    assert attributes[7] == user_attributes(declared, np.random.default_rng([0, 7]))


@pytest.mark.parametrize(
    ("status", "message", "failure"),
    [
        (grpc.StatusCode.UNAVAILABLE, f"in ensemble 'digits', {shed_message('best_effort', 'queue')}", Failure.SHED),
        (HTTPStatus.SERVICE_UNAVAILABLE, shed_message("best_effort", "router queue wait 30 ms"), Failure.SHED),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", Failure.UNAVAILABLE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "no answer within 10 s", Failure.TIMED_OUT),
        (HTTPStatus.GATEWAY_TIMEOUT, "no answer within 10 s", Failure.TIMED_OUT),
        (grpc.StatusCode.INVALID_ARGUMENT, "tier 'critical' needs a tier key", Failure.REFUSED),
    ],
)
def test_failures_are_named_by_kind(status: grpc.StatusCode | HTTPStatus, message: str, failure: Failure) -> None:
    assert Failure.of(TierserveError(status, message), "best_effort") is failure


def test_a_shed_is_told_by_its_own_tier() -> None:
    error = TierserveError(grpc.StatusCode.UNAVAILABLE, shed_message("standard", "router queue wait 70 ms"))
    assert Failure.of(error, "standard") is Failure.SHED
    assert Failure.of(error, "best_effort") is Failure.UNAVAILABLE


def test_an_answer_is_named_by_its_route_or_its_path() -> None:
    path = "digits_light:1 low_confidence>digits_heavy_trt:1 unavailable>digits_heavy:3 ok"
    answer = Classification(3, np.zeros(10), 0.9, "digits_heavy:3", "cascade", path)
    assert row_name(answer, "route") == "digits_heavy:3"
    assert row_name(answer, "path") == path
    assert _problems(tier_mix={"standard": 1}, name_by="model").startswith("--name-by: Input should be 'route'")
