"""The audit trail: every operator action on a server (load, unload, fault, experiment apply and stop, canary step,
promote, rollback, retire), refused and failed ones included, one JSON object a line in an append-only file.

Each line says when (UTC), what, on what, the state before and after, the outcome (ok, refused: nothing changed,
failed: the server did not take it) and why, and the login name of who did it. The file is $TIERSERVE_AUDIT, else
.tierserve/audit.jsonl; it is created mode 600 and only ever appended to, one write per line under an exclusive
lock, so concurrent tools never interleave lines. `record` appends a line; `audited` records a block of work by how
it ends; `read_audit` reads every line it can and names those it cannot; `tierserve audit` prints it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.table import Table
from rich.text import Text

from tierserve.operator_lock import operator_name
from tierserve.tools.paths import AUDIT_ENV, AUDIT_FILE

PRIVATE_MODE = 0o600


class Action(str, Enum):
    """The operator actions the audit trail records."""

    LOAD = "load"
    UNLOAD = "unload"
    FAULT = "fault"
    EXPERIMENT_APPLY = "experiment_apply"
    EXPERIMENT_STOP = "experiment_stop"
    CANARY_STEP = "canary_step"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    RETIRE = "retire"


class Outcome(str, Enum):
    """How an action ended: done, refused before anything changed, or not taken by the server."""

    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


class AuditError(RuntimeError):
    """The audit log cannot be written; the message names the file and why."""


class AuditEntry(BaseModel):
    """One line of the audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: datetime = Field(description="when the action ended, UTC")
    action: Action
    target: str = Field(description="what it acted on: a model, model:version or experiment")
    before: str = Field("", description="the state before, as people read it ('' when not known)")
    after: str = Field("", description="the state after ('' when nothing changed)")
    outcome: Outcome
    message: str = Field("", description="what was done, or why it was refused or failed")
    operator: str = Field("", description="the login name of who did it")


def audit_path() -> Path:
    """Where the audit log is: $TIERSERVE_AUDIT, else .tierserve/audit.jsonl."""
    return Path(os.environ.get(AUDIT_ENV) or AUDIT_FILE)


def record(
    action: Action | str,
    target: str,
    before: str = "",
    after: str = "",
    outcome: Outcome | str = Outcome.OK,
    message: str = "",
    *,
    path: Path | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> AuditEntry:
    """Append one action to the audit log (`path`, default `audit_path()`) and return its entry. ValueError for an
    unknown action or outcome, AuditError when the file cannot be written."""
    entry = AuditEntry(
        time=clock(),
        action=Action(action),
        target=target,
        before=before,
        after=after,
        outcome=Outcome(outcome),
        message=message,
        operator=operator_name(),
    )
    _append(path or audit_path(), entry.model_dump_json() + "\n")
    return entry


def _append(path: Path, line: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, PRIVATE_MODE)
    except OSError as error:
        raise AuditError(f"audit log {path}: cannot be opened for appending ({error.strerror})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # one whole line at a time, whoever else appends
        data = line.encode()
        while data:
            data = data[os.write(descriptor, data) :]
    except OSError as error:
        raise AuditError(f"audit log {path}: the line was not written ({error.strerror})") from None
    finally:
        os.close(descriptor)


@dataclass
class Step:
    """What an audited block of work fills in as it learns it."""

    before: str = ""
    after: str = ""
    message: str = ""


def _why(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


@contextlib.contextmanager
def audited(
    action: Action | str,
    target: str,
    refusals: tuple[type[BaseException], ...] = (),
    *,
    path: Path | None = None,
) -> Iterator[Step]:
    """Record the block as one action when it ends: ok when it returns, refused when it raises one of `refusals`
    (it changed nothing), failed on any other exception, which is raised on either way."""
    step = Step()
    try:
        yield step
    except refusals as error:
        record(action, target, step.before, "", Outcome.REFUSED, _why(error), path=path)
        raise
    except Exception as error:
        record(action, target, step.before, step.after, Outcome.FAILED, _why(error), path=path)
        raise
    try:
        record(action, target, step.before, step.after, Outcome.OK, step.message, path=path)
    except AuditError as error:
        raise AuditError(
            f"{Action(action).value} {target} was done ({step.message or step.after}), but {error}"
        ) from None


@dataclass(frozen=True)
class AuditLog:
    """The entries of an audit log, in file order, and the lines that could not be read."""

    entries: tuple[AuditEntry, ...]
    problems: tuple[str, ...]  # "<path> line <n>: <why>", one per unreadable line


def read_audit(path: Path | None = None) -> AuditLog:
    """Every entry of the audit log (none when the file does not exist yet); an unreadable line is named in
    `problems` and skipped, never the lines after it."""
    path = path or audit_path()
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return AuditLog((), ())
    entries, problems = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            entries.append(AuditEntry.model_validate_json(raw))
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"])
            why = first["msg"] if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
            problems.append(f"{path} line {number}: {why}")
    return AuditLog(tuple(entries), tuple(problems))


def audit_json(entries: tuple[AuditEntry, ...]) -> str:
    """The entries as one JSON array (for --json)."""
    return json.dumps([entry.model_dump(mode="json") for entry in entries], indent=2)


_STYLES = {Outcome.OK: "green", Outcome.REFUSED: "yellow", Outcome.FAILED: "red"}


def audit_table(entries: tuple[AuditEntry, ...]) -> Table:
    """The entries as a table, oldest first."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("time (UTC)", "action", "target", "before", "after", "outcome", "message", "by"):
        table.add_column(column, overflow="fold")
    for entry in entries:  # Text: what a line says is never read as markup
        table.add_row(
            Text(entry.time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
            Text(entry.action.value),
            Text(entry.target),
            Text(entry.before),
            Text(entry.after),
            Text(entry.outcome.value, style=_STYLES[entry.outcome]),
            Text(entry.message),
            Text(entry.operator),
        )
    return table
