"""REQUEST_IDs: verifiable by themselves, short, unforgeable, and refused with a message a client can act on."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from tierserve.experiment_spec import MIRRORED
from tierserve.request_ids import (
    RETENTION_S,
    ExpiredRequestId,
    IssuedRow,
    RequestIdError,
    RequestIds,
    UnknownRequestId,
    new_seeds,
    user_key,
)

SECRET = bytes(range(32))
NOW = 1_800_000_000.0
ARMS = (("threshold_test", "treatment"), ("heavy_v3", MIRRORED))


def _row(**changes) -> IssuedRow:
    fields = {
        "seed": 2**64 - 1,
        "issued_at": NOW,
        "user": user_key(SECRET, "alice"),
        "tier": "critical",
        "label": 7,
        "first_label": 1,
        "arms": ARMS,
    }
    return IssuedRow(**{**fields, **changes})


@pytest.mark.parametrize(
    "row",
    [
        _row(),
        _row(seed=0, user="", tier="best_effort", label=0, first_label=None, arms=()),
        _row(issued_at=NOW + 0.123, arms=(("a", "b"),)),
        _row(arms=(("experiment_é", "arm"),)),
    ],
)
def test_an_id_round_trips(row: IssuedRow):
    ids = RequestIds(SECRET)
    (request_id,) = ids.issue([row])
    assert ids.read(request_id, NOW + 60) == row


def test_ids_are_short_url_safe_ascii():
    (request_id,) = RequestIds(SECRET).issue([_row()])
    assert set(request_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(request_id) < 120, request_id


def test_the_tag_is_hmac_sha256_under_a_key_derived_from_the_secret():
    (request_id,) = RequestIds(SECRET).issue([_row()])
    raw = base64.urlsafe_b64decode(request_id + "=" * (-len(request_id) % 4))
    key = hmac.digest(SECRET, b"request-id", "sha256")
    assert raw[-16:] == hmac.digest(key, raw[:-16], hashlib.sha256)[:16]


def test_tampered_or_foreign_ids_are_unknown():
    ids = RequestIds(SECRET)
    (request_id,) = ids.issue([_row()])
    raw = bytearray(base64.urlsafe_b64decode(request_id + "=" * (-len(request_id) % 4)))
    raw[13] ^= 1  # the label the client was given
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    (foreign,) = RequestIds(b"another server's secret........").issue([_row()])
    for bad in [tampered, foreign, request_id[:-2], request_id + "AA", "", "not base64!", "é" * 10, "A" * 5000]:
        with pytest.raises(UnknownRequestId, match="not issued by this server") as refused:
            ids.read(bad, NOW)
        assert bad[:41] not in str(refused.value) or len(bad) <= 40, "at most 40 characters of the id are echoed"
    with pytest.raises(UnknownRequestId):
        ids.read(None, NOW)  # type: ignore[arg-type]


def test_an_id_expires_after_the_retention():
    ids = RequestIds(SECRET)
    (request_id,) = ids.issue([_row()])
    assert ids.read(request_id, NOW + RETENTION_S).seed == 2**64 - 1
    with pytest.raises(ExpiredRequestId, match=r"issued 7\.0 days ago; feedback is taken for 7 days") as expired:
        ids.read(request_id, NOW + RETENTION_S + 1)
    assert isinstance(expired.value, RequestIdError)
    short = RequestIds(SECRET, retention_s=60)
    with pytest.raises(ExpiredRequestId):
        short.read(request_id, NOW + 61)


@pytest.mark.parametrize(
    "row",
    [
        _row(tier="gold"),
        _row(label=-1),
        _row(label=255),
        _row(first_label=255),
        _row(user="alice"),
        _row(user="ab"),
        _row(seed=2**64),
        _row(arms=(("a,b", "c"),)),
        _row(arms=(("a", "b=c"),)),
    ],
)
def test_rows_that_cannot_be_packed_are_refused_at_issue(row: IssuedRow):
    with pytest.raises(ValueError, match="cannot issue"):
        RequestIds(SECRET).issue([row])


def test_seeds_are_64_bit_and_unique():
    seeds = new_seeds(100_000)
    assert len(set(seeds)) == len(seeds) == 100_000
    assert all(0 <= seed < 2**64 for seed in seeds)
    assert max(seeds) > 2**63 > min(seeds)


def test_user_key_is_a_keyed_hash():
    assert user_key(SECRET, "") == ""
    key = user_key(SECRET, "alice")
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == user_key(SECRET, "alice") != user_key(SECRET, "bob") != user_key(b"other", "alice")


def test_issue_is_fast():
    """A REQUEST_ID per answered row must cost the router little: about 2 us per row (generous bound for CI)."""
    ids = RequestIds(SECRET)
    rows = [_row(seed=seed) for seed in new_seeds(20_000)]
    ids.issue(rows[:100])
    started = time.perf_counter()
    issued = ids.issue(rows)
    per_row_us = (time.perf_counter() - started) / len(rows) * 1e6
    assert len(set(issued)) == len(rows)
    assert per_row_us < 20, f"{per_row_us:.1f} us per id"
