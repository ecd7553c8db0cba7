"""Seals: only rows `preprocess` handed over pass the router; the secret is owner-only from creation."""

from __future__ import annotations

import stat

import numpy as np

from tierserve.seal import lane_token, rows_sealed, seal_rows, server_secret


def test_the_secret_is_created_once_owner_only_and_shared(tmp_path):
    first, second = server_secret(tmp_path), server_secret(tmp_path)
    assert first == second and len(first) == 64
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_a_sealed_row_passes_and_any_forged_part_fails(tmp_path):
    secret = server_secret(tmp_path)
    source = np.array([[8, 8, 0, 0], [16, 16, 0.1, 0]], np.float32)
    image = np.arange(128, dtype=np.float32).reshape(2, 8, 8)
    stamps = np.full((2, 1), 123.5)
    seals = np.array([[s] for s in seal_rows(secret, 123.5, source, image)], dtype=object)
    assert rows_sealed(secret, stamps, source, image, seals)
    assert not rows_sealed(secret, np.zeros((2, 1)), source, image, seals), "a forged stamp"
    forged = source.copy()
    forged[0, 2] = np.nan
    assert not rows_sealed(secret, stamps, forged, image, seals), "forged facts"
    assert not rows_sealed(secret, stamps, source, image + 1, seals), "another image"
    assert not rows_sealed(b"another server", stamps, source, image, seals), "another server's seal"
    assert not rows_sealed(secret, stamps, source, image, np.array([[b""], [b""]], dtype=object)), "no seal"
    assert not rows_sealed(secret, stamps[:1], source, image, seals), "rows that do not line up"


def test_the_lane_token_depends_on_the_secret():
    assert lane_token(b"a") != lane_token(b"b") and lane_token(b"a") == lane_token(b"a")
