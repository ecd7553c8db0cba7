"""The audit log: one JSON line per action, appended to a file only its owner may read, refused and failed actions
included; a damaged line is named and skipped, never the lines after it."""

from __future__ import annotations

import io
import json
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from rich.console import Console

from tierserve.state_store import STATE_ENV
from tierserve.tools.audit import (
    Action,
    AuditEntry,
    AuditError,
    Outcome,
    audit_json,
    audit_path,
    audit_table,
    audited,
    read_audit,
    record,
)
from tierserve.tools.cli import main
from tierserve.tools.exit_codes import ExitCode
from tierserve.tools.paths import ADMIN_KEY_ENV, AUDIT_ENV, AUDIT_FILE

NOON = datetime(2026, 1, 2, 12, 0, tzinfo=timezone.utc)


def test_record_appends_one_line_per_action_to_a_private_file(tmp_path: Path):
    path = tmp_path / "state" / "audit.jsonl"
    first = record("promote", "digits_heavy:3", "digits_heavy:2", "digits_heavy:3", "ok", "routed", path=path)
    record(Action.RETIRE, "digits_heavy:2", outcome=Outcome.REFUSED, message="in use", path=path, clock=lambda: NOON)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    line = json.loads(lines[0])
    assert line == {
        "time": first.time.isoformat().replace("+00:00", "Z"),
        "action": "promote",
        "target": "digits_heavy:3",
        "before": "digits_heavy:2",
        "after": "digits_heavy:3",
        "outcome": "ok",
        "message": "routed",
        "operator": first.operator,
    }
    log = read_audit(path)
    assert log.problems == ()
    assert [(e.action, e.target, e.outcome) for e in log.entries] == [
        (Action.PROMOTE, "digits_heavy:3", Outcome.OK),
        (Action.RETIRE, "digits_heavy:2", Outcome.REFUSED),
    ]
    assert log.entries[1].time == NOON and log.entries[0].operator


def test_an_unknown_action_or_outcome_is_refused_and_nothing_is_written(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    with pytest.raises(ValueError, match="'reboot' is not a valid Action"):
        record("reboot", "server", path=path)
    with pytest.raises(ValueError, match="'maybe' is not a valid Outcome"):
        record("load", "digits_light", outcome="maybe", path=path)
    assert not path.exists()


def test_the_log_is_where_the_environment_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv(AUDIT_ENV, raising=False)
    assert audit_path() == AUDIT_FILE
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "elsewhere.jsonl"))
    record("canary_step", "canary_v1", "10%", "30%")
    assert read_audit().entries[0].after == "30%"


def test_an_unwritable_log_is_an_audit_error_naming_it(tmp_path: Path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(AuditError, match=f"audit log {blocked}/audit.jsonl: cannot be opened"):
        record("load", "digits_light", path=blocked / "audit.jsonl")


def test_a_damaged_line_is_named_and_skipped_and_the_others_kept(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    record("load", "digits_light", path=path)
    with path.open("a") as file:
        file.write('{"time": "2026-01-02T12:00:00Z", "action": "promote", "target": "x"\n')  # cut short
        file.write("\n")
        file.write(json.dumps({"time": "2026-01-02T12:00:00Z", "action": "reboot", "target": "x", "outcome": "ok"}))
        file.write("\n\x00\xff garbage\n")
    record("unload", "digits_light", path=path)
    log = read_audit(path)
    assert [e.action for e in log.entries] == [Action.LOAD, Action.UNLOAD]
    assert len(log.problems) == 3
    assert log.problems[0].startswith(f"{path} line 2: ")
    assert log.problems[1].startswith(f"{path} line 4: action: ")
    assert log.problems[2].startswith(f"{path} line 5: ")


def test_a_missing_log_reads_as_empty(tmp_path: Path):
    log = read_audit(tmp_path / "none.jsonl")
    assert log.entries == () and log.problems == ()


def test_audited_records_by_how_the_block_ends(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    with audited(Action.PROMOTE, "digits_heavy:3", (LookupError,), path=path) as step:
        step.before, step.after, step.message = "digits_heavy:2", "digits_heavy:3", "done"
    with pytest.raises(KeyError), audited("experiment_stop", "nope", (LookupError,), path=path) as step:
        step.before = "a, b"
        raise KeyError("no experiment 'nope' is running")
    with pytest.raises(RuntimeError), audited("fault", "digits_light", (LookupError,), path=path) as step:
        step.before, step.after = "no faults", "hard failure"
        raise RuntimeError("the server did not answer")
    entries = read_audit(path).entries
    assert [(e.outcome, e.before, e.after, e.message) for e in entries] == [
        (Outcome.OK, "digits_heavy:2", "digits_heavy:3", "done"),
        (Outcome.REFUSED, "a, b", "", "no experiment 'nope' is running"),
        (Outcome.FAILED, "no faults", "hard failure", "the server did not answer"),
    ]


def test_concurrent_writers_never_interleave_lines(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    message = "x" * 20_000  # far beyond an atomic pipe write

    def write(n: int) -> None:
        for i in range(20):
            record("canary_step", f"canary_{n}_{i}", message=message, path=path)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log = read_audit(path)
    assert log.problems == () and len(log.entries) == 160


def test_the_table_and_json_show_every_field_and_no_markup(tmp_path: Path):
    entry = AuditEntry(
        time=NOON,
        action=Action.RETIRE,
        target="digits_heavy:2",
        before="versions 1, 2",
        outcome=Outcome.REFUSED,
        message="[bold]used by[/] cascade escalation",
        operator="alice",
    )
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(audit_table((entry,)))
    text = out.getvalue()
    for expected in ("2026-01-02 12:00:00", "retire", "digits_heavy:2", "versions 1, 2", "refused", "alice"):
        assert expected in text
    assert "[bold]used by[/] cascade escalation" in text
    assert json.loads(audit_json((entry,)))[0]["outcome"] == "refused"


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An admin key, an audit log and a state store of the test's own; returns the audit log."""
    monkeypatch.setenv(ADMIN_KEY_ENV, "test-admin-key")
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "state.db"))
    return tmp_path / "audit.jsonl"


NO_SERVER = ["--url", "127.0.0.1:9"]  # nothing listens there: these refusals are decided before any call


@pytest.mark.parametrize(
    ("argv", "action", "named", "status"),
    [
        (["promote", "digits_heavy:99"], Action.PROMOTE, "digits_heavy:99 does not exist", ExitCode.NOT_FOUND),
        (["promote", "digits_heavy"], Action.PROMOTE, "expected MODEL:VERSION", ExitCode.FAILED),
        (["retire", "digits_huge:1"], Action.RETIRE, "no model 'digits_huge'", ExitCode.NOT_FOUND),
        (["rollback", "digits_heavy:2"], Action.ROLLBACK, "rollback takes a model name", ExitCode.FAILED),
        (["model", "unload", "digits heavy"], Action.UNLOAD, "expected a model name", ExitCode.FAILED),
        (["model", "load", "digits_heavy:0"], Action.LOAD, "expected MODEL:VERSION", ExitCode.FAILED),
    ],
)
def test_the_cli_records_a_refused_action_and_says_why(
    operator_env: Path, capsys: pytest.CaptureFixture, argv: list[str], action: Action, named: str, status: ExitCode
):
    assert main([*argv, *NO_SERVER]) == status
    error = capsys.readouterr().err
    assert error.startswith("tierserve: refused, nothing changed: ") and named in error
    (entry,) = read_audit(operator_env).entries
    assert (entry.action, entry.target, entry.outcome) == (action, argv[-1], Outcome.REFUSED)
    assert named in entry.message


def test_without_an_admin_key_an_action_is_refused_and_recorded(
    operator_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.delenv(ADMIN_KEY_ENV)
    monkeypatch.setattr("tierserve.tools.paths.ADMIN_KEY_FILE", operator_env.parent / "no_admin_key")
    assert main(["promote", "digits_heavy:1", *NO_SERVER]) == ExitCode.UNAUTHORIZED
    assert "no admin key" in capsys.readouterr().err
    (entry,) = read_audit(operator_env).entries
    assert entry.outcome == Outcome.REFUSED and "no admin key" in entry.message


def test_an_action_the_server_never_answered_is_recorded_as_failed(operator_env: Path, capsys):
    assert main(["fault", "digits_light", "--hard-failure", *NO_SERVER]) == ExitCode.UNREACHABLE
    assert capsys.readouterr().err.startswith("tierserve: ")
    (entry,) = read_audit(operator_env).entries
    assert (entry.action, entry.target, entry.outcome) == (Action.FAULT, "digits_light", Outcome.FAILED)


def test_tierserve_audit_prints_the_log_and_names_a_damaged_line(operator_env: Path, capsys):
    record("promote", "digits_heavy:3", "digits_heavy:2", "digits_heavy:3", "ok", "routed", path=operator_env)
    with operator_env.open("a") as file:
        file.write("not json\n")
    record("retire", "digits_heavy:2", "digits_heavy versions 2, 3", "", "refused", "in use", path=operator_env)
    assert main(["audit"]) == 1  # the log is damaged: say so in the exit status too
    out, err = capsys.readouterr()
    assert "digits_heavy:3" in out and "refused" in out and "in use" in out
    assert f"{operator_env} line 2: " in err
    assert main(["audit", "--json", "--last", "1", "--log", str(operator_env)]) == 1
    (last,) = json.loads(capsys.readouterr().out)
    assert (last["action"], last["outcome"]) == ("retire", "refused")
    empty = operator_env.parent / "empty.jsonl"
    assert main(["audit", "--log", str(empty)]) == 0
    assert f"no actions recorded in {empty}" in capsys.readouterr().out


def test_a_malformed_experiments_file_is_refused_and_recorded_before_any_admin_key_is_needed(
    operator_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.delenv(ADMIN_KEY_ENV)
    monkeypatch.setattr("tierserve.tools.paths.ADMIN_KEY_FILE", operator_env.parent / "no_admin_key")
    bad = operator_env.parent / "bad.yaml"
    bad.write_text("experiments:\n  - {name: x, kind: split, arms: [{name: a, wieght: 50}]}\n")
    assert main(["experiment", "apply", str(bad), *NO_SERVER]) == 1
    assert "experiments[0].arms[0].wieght" in capsys.readouterr().err
    (entry,) = read_audit(operator_env).entries
    assert (entry.action, entry.target, entry.outcome) == (Action.EXPERIMENT_APPLY, str(bad), Outcome.REFUSED)
    assert entry.before == "none" and "wieght" in entry.message
