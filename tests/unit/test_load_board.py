"""The load board: router instances post the tiers they shed; preprocess refuses those tiers while posts are fresh."""

from __future__ import annotations

from pathlib import Path

from tierserve.load_board import STALE_S, LoadBoard


def test_a_tier_is_shed_while_a_fresh_post_sheds_it(tmp_path: Path):
    router, preprocess = LoadBoard(tmp_path), LoadBoard(tmp_path)  # two processes' views of one file
    router.post(0, 31.5, ["best_effort"], now=10.0)
    posted = preprocess.read(now=10.1)
    assert posted.reason("best_effort") == "router queue wait 31.5 ms (moving average) sheds best_effort"
    assert posted.reason("standard") == "" and posted.reason("critical") == ""
    router.post(1, 70.0, ["best_effort", "standard"], now=10.1)
    assert "sheds standard" in preprocess.read(now=10.15).reason("standard")
    assert preprocess.read(now=10.11 + STALE_S).reason("best_effort") == "", "stale posts let requests through again"


def test_a_calm_post_replaces_the_instances_last_one(tmp_path: Path):
    board = LoadBoard(tmp_path)
    board.post(3, 40.0, ["best_effort"], now=5.0)
    board.post(3, 2.0, [], now=5.01)
    assert board.read(now=5.02).reason("best_effort") == ""
    assert board.read(now=5.02).reason("gold") == "", "an unknown tier is the router's to refuse"
