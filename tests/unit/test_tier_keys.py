"""Tier keys: the file is validated naming the bad key, stored hashed with mode 600, and a verdict says what a
request may claim and, when it may not, what is missing. The `tierserve tier-key` CLI manages the file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tierserve import tier_keys
from tierserve.private_file import write_private
from tierserve.tier_keys import (
    TIER_KEY_HEADER,
    Grant,
    OnMissing,
    TierKey,
    TierKeyError,
    TierKeys,
    key_hash,
    new_key,
    presented_key,
)
from tierserve.tools.cli import main

ALICE = "alice-secret-key"


def _keys(on_missing: OnMissing = OnMissing.REFUSE) -> TierKeys:
    return TierKeys(
        (TierKey("alice-app", key_hash(ALICE), "critical"), TierKey("bob", key_hash("bob-key"), "standard")), on_missing
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("tier", ["standard", "best_effort"])
def test_tiers_at_or_below_standard_need_no_key(tier: str):
    verdict = _keys().verdict(tier, None)
    assert (verdict.grant, verdict.tier, verdict.key_name) == (Grant.GRANTED, tier, None)
    assert _keys().verdict(tier, "not-a-key").tier == tier, "a key is only judged when the tier needs one"


def test_critical_with_its_key_is_granted_and_names_the_key():
    verdict = _keys().verdict("critical", ALICE)
    assert (verdict.grant, verdict.tier, verdict.key_name) == (Grant.GRANTED, "critical", "alice-app")
    assert not verdict.refused and not verdict.downgraded
    assert verdict.message == "tier 'critical' granted to tier key 'alice-app'"


@pytest.mark.parametrize(
    ("key", "missing"),
    [
        (None, "none was sent"),
        ("", "none was sent"),
        ("guessed", "the key sent is not a known tier key"),
        ("x" * 10_000, "the key sent is not a known tier key"),
        ("bob-key", "tier key 'bob' allows at most 'standard'"),
    ],
)
def test_critical_without_a_sufficient_key_is_refused_by_default_saying_what_is_missing(key: str | None, missing: str):
    verdict = _keys().verdict("critical", key)
    assert verdict.refused and verdict.tier is None and verdict.grant is Grant.REFUSED
    assert verdict.message.startswith(f"tier 'critical' needs a tier key (header {TIER_KEY_HEADER})")
    assert verdict.message.endswith(missing)
    assert (
        _keys().verdict("critical", None).message
        == "tier 'critical' needs a tier key (header tierserve-tier-key); none was sent"
    )


@pytest.mark.parametrize("key", [None, "guessed", "bob-key"])
def test_an_operator_may_downgrade_instead_of_refusing(key: str | None):
    verdict = _keys(OnMissing.DOWNGRADE).verdict("critical", key)
    assert verdict.downgraded and verdict.tier == "standard"
    assert verdict.message.endswith("; served as 'standard'")
    assert verdict.key_name == ("bob" if key == "bob-key" else None)


def test_an_unknown_tier_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        _keys().verdict("gold", ALICE)


def test_every_stored_hash_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch):
    compared = []
    real = tier_keys.hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(tier_keys.hmac, "compare_digest", counting)
    assert _keys().verdict("critical", ALICE).key_name == "alice-app"
    assert len(compared) == 2, "no early exit once the key is found"


def test_the_presented_key_is_found_whatever_the_case_of_its_name():
    assert presented_key({"tier": "critical", "tierserve-tier-key": "k"}) == "k"
    assert presented_key({"TierServe-Tier-Key": "k"}) == "k"  # HTTP forwards the header as the client spelled it
    assert presented_key({"TIERSERVE-TIER-KEY": "k", "tierserve-tier-key": "k"}) == "k"
    assert presented_key({"tier": "critical"}) is None
    assert presented_key({"tierserve-tier-key": ""}) is None
    with pytest.raises(TierKeyError, match="2 different tierserve-tier-key values"):
        presented_key({"TierServe-Tier-Key": "a", "tierserve-tier-key": "b"})
    with pytest.raises(TierKeyError, match="must be a string"):
        presented_key({"tierserve-tier-key": 7})


def test_new_keys_are_random_and_fit_a_header():
    first, second = new_key(), new_key()
    assert first != second and len(first) == 43
    assert all(c.isalnum() or c in "-_" for c in first)
    assert key_hash(first) == key_hash(first) and len(key_hash(first)) == 64


def test_a_saved_file_loads_back_and_is_mode_600_from_creation(tmp_path: Path):
    path = tmp_path / "tier_keys.json"
    old_umask = os.umask(0)  # even with nothing masked, the file is never wider than 600
    try:
        _keys(OnMissing.DOWNGRADE).save(path)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert TierKeys.load(path) == _keys(OnMissing.DOWNGRADE)
    assert ALICE not in path.read_text(), "only hashes are stored"
    assert [p.name for p in tmp_path.iterdir()] == ["tier_keys.json"], "no temporary file is left"


def test_write_private_replaces_a_wider_file_with_a_private_one(tmp_path: Path):
    path = tmp_path / "key"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "new")
    assert (path.read_text(), _mode(path)) == ("new", 0o600)
    with pytest.raises(FileExistsError):
        write_private(path, "newer", overwrite=False)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["key"]


def test_add_and_remove(tmp_path: Path):
    keys = TierKeys().add("carol", "carol-key", "critical")
    assert keys.verdict("critical", "carol-key").key_name == "carol"
    with pytest.raises(TierKeyError, match="a key is already called 'carol'"):
        keys.add("carol", "other", "critical")
    with pytest.raises(TierKeyError, match="name must be 1-64"):
        keys.add("no spaces", "other", "critical")
    with pytest.raises(TierKeyError, match="max_tier must be one of critical, standard, best_effort, got 'gold'"):
        keys.add("dave", "other", "gold")
    assert keys.remove("carol").keys == ()
    with pytest.raises(TierKeyError, match="no key is called 'erin'"):
        keys.remove("erin")


GOOD_ENTRY = {"name": "alice-app", "sha256": "a" * 64, "max_tier": "critical"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"keys": [], "on_mising": "refuse"}, "unknown key 'on_mising'"),
        ({"keys": [], "on_missing": "ignore"}, "on_missing must be one of refuse, downgrade, got 'ignore'"),
        ({"keys": {}}, "keys must be a list"),
        ({"keys": ["x"]}, "keys[0] must be an object"),
        ({"keys": [{"name": "a", "max_tier": "critical"}]}, "keys[0].sha256: required key is missing"),
        ({"keys": [{**GOOD_ENTRY, "key": "plain"}]}, "keys[0]: unknown key 'key'"),
        ({"keys": [{**GOOD_ENTRY, "name": ""}]}, "keys[0].name must be 1-64"),
        ({"keys": [{**GOOD_ENTRY, "sha256": "A" * 64}]}, "keys[0].sha256 must be 64 lower-case hex digits"),
        ({"keys": [{**GOOD_ENTRY, "max_tier": "gold"}]}, "keys[0].max_tier must be one of"),
        (
            {"keys": [GOOD_ENTRY, {**GOOD_ENTRY, "sha256": "b" * 64}]},
            "keys[1].name 'alice-app' is already keys[0].name",
        ),
        ({"keys": [GOOD_ENTRY, {**GOOD_ENTRY, "name": "b"}]}, "keys[1].sha256 is already keys[0].sha256 ('alice-app')"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_key(tmp_path: Path, data: object, message: str):
    path = tmp_path / "tier_keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TierKeyError) as error:
        TierKeys.load(path)
    assert str(error.value).startswith(f"tier keys file {path}: ") and message in str(error.value)


def test_an_unreadable_or_broken_file_says_so(tmp_path: Path):
    with pytest.raises(TierKeyError, match="cannot be read"):
        TierKeys.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TierKeyError, match="not valid JSON"):
        TierKeys.load(tmp_path / "broken.json")


def test_the_cli_prints_a_new_key_once_and_stores_only_its_hash(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = tmp_path / "keys" / "tier_keys.json"
    assert main(["tier-key", "add", "alice-app", "--max-tier", "critical", "--keys-file", str(path)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert len(key) == 43 and "only its SHA-256 is stored" in err and TIER_KEY_HEADER in err
    assert key not in path.read_text() and _mode(path) == 0o600
    assert TierKeys.load(path).verdict("critical", key).key_name == "alice-app"

    assert main(["tier-key", "list", "--keys-file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "alice-app  max_tier critical" in listing and "on_missing refuse" in listing and key not in listing

    assert main(["tier-key", "add", "alice-app", "--keys-file", str(path)]) == 1
    assert "a key is already called 'alice-app'" in capsys.readouterr().err
    assert main(["tier-key", "remove", "alice-app", "--keys-file", str(path)]) == 0
    assert TierKeys.load(path).keys == ()
    assert main(["tier-key", "remove", "alice-app", "--keys-file", str(path)]) == 1


def test_the_cli_takes_the_keys_file_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    path = tmp_path / "operator.json"
    monkeypatch.setenv("TIERSERVE_TIER_KEYS", str(path))
    assert main(["tier-key", "add", "ops", "--max-tier", "standard"]) == 0
    assert [k.name for k in TierKeys.load(path).keys] == ["ops"]
    path.write_text("{")
    assert main(["tier-key", "list"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
