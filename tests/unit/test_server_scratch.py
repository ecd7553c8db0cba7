"""The server's secret is owner-only from creation and shared by its stubs; the lane token derives from it."""

from __future__ import annotations

import stat

from tierserve.server_scratch import lane_token, server_secret


def test_the_secret_is_created_once_owner_only_and_shared(tmp_path):
    first, second = server_secret(tmp_path), server_secret(tmp_path)
    assert first == second and len(first) == 64
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_the_lane_token_depends_on_the_secret():
    assert lane_token(b"a") != lane_token(b"b") and lane_token(b"a") == lane_token(b"a")
