"""Replay tokens: only the holder of the server's state may choose a row's seed or pose as a user's hash."""

from __future__ import annotations

import pytest

from tierserve.replay_tokens import ReplayRow, ReplayTokenError, parse_replay, replay_parameter, replay_token

SECRET = b"s" * 32
ROWS = [ReplayRow(2**64 - 1, "2964ad7f98d8b55e"), ReplayRow(0, "")]


def test_tokens_round_trip_row_by_row():
    assert parse_replay(SECRET, replay_parameter(SECRET, ROWS), 2) == ROWS


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (replay_parameter(b"another server", ROWS), "not signed by this server's state"),
        (replay_parameter(SECRET, ROWS[:1]), "one token per image: 2"),
        (replay_token(SECRET, ROWS[0]).replace(".2964", ".3964") + "," + replay_token(SECRET, ROWS[1]), "not signed"),
        (f"{2**64}.abc.{'0' * 32},{replay_token(SECRET, ROWS[1])}", "malformed token"),
        ("-1..x,", "malformed token"),
        ("x" * 100_000, "one token per image"),
        (7, "must be a string"),
    ],
)
def test_a_forged_or_malformed_replay_parameter_is_refused_naming_it(value, why):
    with pytest.raises(ReplayTokenError, match="tierserve_replay") as error:
        parse_replay(SECRET, value, 2)
    assert why in str(error.value) and len(str(error.value)) < 200
