"""Operator files that must not hang or crash their reader: too big, not UTF-8, too deep, aliases that expand without
bound; and that a well-formed file still reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tierserve.experiment_spec import ExperimentSpecError, load_experiments
from tierserve.operator_files import OperatorFileError, load_yaml
from tierserve.policy import Policy, PolicyError
from tierserve.tier_keys import TierKeyError, TierKeys
from tierserve.tools.paths import DEFAULT_REPOSITORY

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]\n"
    for previous, name in zip("abcdefg", "bcdefgh", strict=True)
)


def _file(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "file.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_a_well_formed_file_reads_and_an_empty_one_is_none(tmp_path: Path):
    assert load_yaml(_file(tmp_path, "a: [1, 2]\nb: {c: d}\n")) == {"a": [1, 2], "b": {"c": "d"}}
    assert load_yaml(_file(tmp_path, "")) is None
    shared = load_yaml(_file(tmp_path, "a: &a [1, 2]\nb: *a\n"))  # an alias or two is fine
    assert shared == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xcb\x00 binary", "not UTF-8 text (byte 0xcb at offset 0)"),
        ("a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        (LAUGHS, "expands to more than 100,000 values (aliases of aliases, or an alias of itself)"),
        ("a: &a [*a]\n", "expands to more than 100,000 values"),  # an alias of itself: a cycle
        ("a: [unclosed\n", "expected ',' or ']'"),
        ("!!python/object/apply:os.system [echo pwned]\n", "could not determine a constructor"),
    ],
)
def test_a_file_that_cannot_be_read_safely_is_refused_naming_why(tmp_path: Path, content, message: str):
    with pytest.raises(OperatorFileError, match=re.escape(message)):
        load_yaml(_file(tmp_path, content))


def test_a_file_larger_than_the_bound_is_refused_without_reading_it_all(tmp_path: Path):
    with pytest.raises(OperatorFileError, match="larger than 1,048,576 bytes"):
        load_yaml(Path("/dev/zero"))  # endless: read in full, it would fill the memory
    with pytest.raises(OperatorFileError, match="larger than 10 bytes"):
        load_yaml(_file(tmp_path, "a: 12345678901"), max_bytes=10)
    with pytest.raises(OperatorFileError, match="Is a directory"):
        load_yaml(tmp_path)


def test_the_policy_and_experiments_readers_name_the_file_and_the_problem(tmp_path: Path):
    policy = Policy.load(DEFAULT_REPOSITORY / "router" / "policy.yaml")
    bad = _file(tmp_path, LAUGHS)
    with pytest.raises(ExperimentSpecError, match=rf"^{bad}: cannot read the experiments: expands to more than"):
        load_experiments(bad, policy)
    with pytest.raises(PolicyError, match=rf"^{bad}: cannot read the policy: expands to more than"):
        Policy.load(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),  # a RecursionError before
        (b"\x8e{}", "not UTF-8 text (byte 0x8e at offset 0)"),
        ('{"keys": [', "not valid JSON (Expecting value"),
    ],
)
def test_a_tier_keys_file_that_cannot_be_read_safely_is_refused_naming_why(tmp_path: Path, content, message: str):
    """The router reads this file again when it changes, from its execute: anything but a TierKeyError there would
    fail a client's request."""
    path = _file(tmp_path, content)
    with pytest.raises(TierKeyError, match=re.escape(f"tier keys file {path}: {message}")):
        TierKeys.load(path)


def test_an_endless_tier_keys_file_is_refused_without_reading_it_all():
    with pytest.raises(TierKeyError, match=re.escape("tier keys file /dev/zero: larger than 1,048,576 bytes")):
        TierKeys.load(Path("/dev/zero"))
