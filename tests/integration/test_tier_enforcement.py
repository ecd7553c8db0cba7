"""Reserved capacity is not open to anyone: a tier above standard needs a tier key that allows it."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc import StatusCode

from tierserve.client import TierserveClient, TierserveError
from tierserve.tier_keys import OnMissing, TierKeys, new_key
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.server import Ports, TritonServer


@pytest.mark.parametrize(("key", "why"), [(None, "none was sent"), ("not-a-key", "not a known tier key")])
def test_critical_without_a_valid_tier_key_is_refused_by_name(triton: TritonServer, split: DigitsSplit, key, why):
    with TierserveClient(triton.grpc_url, tier_key=key) as client, pytest.raises(TierserveError) as caught:
        client.classify(split.test.images[0], tier="critical")
    assert caught.value.status == StatusCode.INVALID_ARGUMENT
    assert "tier 'critical' needs a tier key (header tierserve-tier-key)" in caught.value.message
    assert why in caught.value.message


def test_critical_with_the_key_gets_its_lane_and_standard_needs_none(triton: TritonServer, split: DigitsSplit):
    with TierserveClient(triton.grpc_url, tier_key=triton.tier_key) as client:
        (critical,) = client.classify(split.test.images[0], tier="critical")
    with TierserveClient(triton.grpc_url) as client:
        (standard,) = client.classify(split.test.images[0], tier="standard")
    # test image 0 escalates at both tiers (light confidence 0.86); the light model runs inside the router
    assert critical.path.endswith(">digits_heavy_critical:3 ok") and standard.path.endswith(">digits_heavy:3 ok")


def test_a_key_allowing_less_is_downgraded_when_the_operator_says_so(
    model_repository: Path, tmp_path: Path, split: DigitsSplit
):
    key = new_key()
    keys = tmp_path / "tier_keys.json"
    keys_file = TierKeys(on_missing=OnMissing.DOWNGRADE).add("batch-jobs", key, "standard")
    keys_file.save(keys)
    with (
        (tmp_path / "tritonserver.log").open("wb") as log,
        TritonServer(model_repository, Ports.free(), tmp_path, output=log, tier_keys=keys) as server,
    ):
        server.wait_ready()
        with TierserveClient(server.grpc_url, tier_key=key) as client:
            (answer,) = client.classify(split.test.images[0], tier="critical")
    assert answer.path.endswith(">digits_heavy:3 ok"), "served as standard, on the shared model"
    assert "tier key 'batch-jobs' allows at most 'standard'; served as 'standard'" in answer.reason
    assert "tier=standard" in answer.reason
