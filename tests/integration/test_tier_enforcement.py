"""Reserved capacity is not open to anyone: a tier above standard needs a tier key that allows it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
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


def test_critical_with_the_key_gets_its_lane_and_standard_needs_none(triton: TritonServer, doubted_image):
    with TierserveClient(triton.grpc_url, tier_key=triton.tier_key) as client:
        (critical,) = client.classify(doubted_image, tier="critical")
    with TierserveClient(triton.grpc_url) as client:
        (standard,) = client.classify(doubted_image, tier="standard")
    # the image escalates at both tiers; the light model runs inside the router
    assert critical.path.endswith(">digits_heavy_critical:3 ok") and standard.path.endswith(">digits_heavy:3 ok")


@contextlib.contextmanager
def _server_with_keys(model_repository: Path, workdir: Path, keys: TierKeys) -> Iterator[TritonServer]:
    """A server of its own whose routers read the tier keys file `workdir`/tier_keys.json, written from `keys`."""
    keys.save(workdir / "tier_keys.json")
    with (
        (workdir / "tritonserver.log").open("wb") as log,
        TritonServer(
            model_repository, Ports.free(), workdir, output=log, tier_keys=workdir / "tier_keys.json"
        ) as server,
    ):
        server.wait_ready()
        yield server


def test_a_key_allowing_less_is_downgraded_when_the_operator_says_so(
    model_repository: Path, tmp_path: Path, doubted_image
):
    key = new_key()
    keys = TierKeys(on_missing=OnMissing.DOWNGRADE).add("batch-jobs", key, "standard")
    with (
        _server_with_keys(model_repository, tmp_path, keys) as server,
        TierserveClient(server.grpc_url, tier_key=key) as client,
    ):
        (answer,) = client.classify(doubted_image, tier="critical")
    assert answer.path.endswith(">digits_heavy:3 ok"), "served as standard, on the shared model"
    assert "tier key 'batch-jobs' allows at most 'standard'; served as 'standard'" in answer.reason
    assert "tier=standard" in answer.reason


def test_a_keys_file_the_routers_cannot_read_keeps_the_keys_in_force_and_fails_no_request(
    model_repository: Path, tmp_path: Path, split: DigitsSplit
):
    """The routers read the keys file again when it changes, from their executes (once a second at most). A file
    nested too deeply for the JSON parser failed one request per router instance a second ("the request could not
    be read"); now the keys in force stay, and the log says why."""
    key = new_key()
    with _server_with_keys(model_repository, tmp_path, TierKeys().add("alice-app", key, "critical")) as server:
        (tmp_path / "tier_keys.json").write_text("[" * 100_000 + "]" * 100_000)
        failed, answered, ends = [], 0, time.monotonic() + 3  # three reloads tried by each instance
        with TierserveClient(server.grpc_url, tier_key=key) as client:
            while time.monotonic() < ends:
                try:
                    (answer,) = client.classify(split.test.images[0], tier="critical")
                    answered += 1
                except TierserveError as error:
                    failed.append(error.message)
        assert failed == [] and answered > 0
        assert "tier=critical" in answer.reason, "the key in force still allows critical"
    log = (tmp_path / "tritonserver.log").read_text()
    assert "router: tier keys not reloaded: tier keys file " in log and "not valid JSON (nested too deeply)" in log
