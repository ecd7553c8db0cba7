"""`tierserve log query`: SQL (DuckDB) over the inference log's Parquet files, and reading logged rows back for
replay.

Three views: `inferences` (one row per answered row, the columns of inference_log.INFERENCE_SCHEMA), `feedback`
(request_id, label, received_at) and `answers` (inferences LEFT JOIN feedback ON request_id, with `feedback_label`
and `feedback_at`). Times are UTC TIMESTAMPs, and the session's time zone is UTC, so `now()::TIMESTAMP` compares.
A log root that several servers share holds one hive partition per server (`replica=NAME/`, each a whole log): the
views read every partition as one log (DuckDB's hive partitioning), with the partition's name in a `replica` column
(NULL for files at the root, which a server without a replica name writes); feedback taken by one server joins the
answer another gave.

A corrupt file is refused by default: one whose footer or schema is wrong before the query runs, one whose data
DuckDB cannot decode when the query reads it. The error names every such file with what is wrong, and nothing is
deleted or moved, so nothing is lost and no answer silently leaves rows out; `skip_corrupt=True` answers from the other
files and lists the skipped ones in `QueryResult.skipped`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tierserve.inference_log import (
    FEEDBACK,
    INFERENCE_SCHEMA,
    INFERENCES,
    PARTITION_KEY,
    SCHEMAS,
    InferenceRecord,
    inference_records,
    live_files,
)

CELL_CHARS = 40  # a longer cell (a reason, the pixels) is cut in text tables
T = TypeVar("T")
LIST_RETRIES = 3  # a file deleted by a writer (rolled up, or aged out) between listing and reading: list again

EXAMPLE_QUERIES = {
    "accuracy per route, from feedback": (
        "SELECT route, count(*) AS answered, count(feedback_label) AS feedback, "
        "round(avg((label = feedback_label)::INT), 3) AS accuracy "
        "FROM answers GROUP BY route ORDER BY answered DESC"
    ),
    "latency per tier over the last hour": (
        "SELECT tier, count(*) AS answered, round(quantile_cont(latency_ms, 0.5), 2) AS p50_ms, "
        "round(quantile_cont(latency_ms, 0.99), 2) AS p99_ms "
        "FROM inferences WHERE answered_at > now()::TIMESTAMP - INTERVAL 1 HOUR GROUP BY tier ORDER BY tier"
    ),
}


class LogAdminError(ValueError):
    """The log cannot be queried as asked; the message says what is wrong and where."""


class LogDirectoryError(LogAdminError):
    """The log directory is missing or is not an inference log."""


class CorruptLogFile(LogAdminError):
    """Some files of the log cannot be read; `files` names each with what is wrong. Nothing was deleted."""

    def __init__(self, files: Sequence[tuple[Path, str]]) -> None:
        self.files = tuple(files)
        listed = "; ".join(f"{path}: {why}" for path, why in self.files)
        super().__init__(
            f"{len(self.files)} corrupt log file(s), nothing deleted: {listed}. Move them aside, or query the "
            "other files with skip_corrupt (--skip-corrupt)"
        )


class LogQueryError(LogAdminError):
    """DuckDB refused or failed the query."""


@dataclass(frozen=True)
class QueryResult:
    """What a query answered, and the corrupt files it was answered without (skip_corrupt only)."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    skipped: tuple[tuple[Path, str], ...] = field(default=())  # (file, what is wrong with it)


@dataclass(frozen=True)
class Partition:
    """One server's part of the log: the root itself (replica None) or a `replica=NAME` folder under it."""

    replica: str | None
    folders: dict[str, Path]  # kind (inferences, feedback) -> its folder


def _log_folders(directory: Path) -> dict[str, Path] | None:
    """The kinds' folders of a log in `directory`; None when it holds neither; LogDirectoryError when only one."""
    folders = {kind: directory / kind for kind in (INFERENCES, FEEDBACK)}
    present = [kind for kind, folder in folders.items() if folder.is_dir()]
    if not present and not any(folder.exists() for folder in folders.values()):
        return None
    for kind, folder in folders.items():
        if kind not in present:
            raise _not_a_log(directory, kind, "is not a directory" if folder.exists() else "is missing")
    return folders


def _not_a_log(directory: Path, kind: str, what: str) -> LogDirectoryError:
    return LogDirectoryError(
        f"{directory} is not an inference log: {kind}/ {what} (a log holds inferences/ and feedback/ folders of "
        f"Parquet files, or {PARTITION_KEY}=NAME/ folders that each hold them)"
    )


def _partitions(log_dir: Path) -> list[Partition]:
    """The log's partitions: its own folders and each `replica=NAME` folder's; LogDirectoryError when it has none."""
    if not log_dir.exists():
        raise LogDirectoryError(f"no inference log at {log_dir}: the directory does not exist")
    if not log_dir.is_dir():
        raise LogDirectoryError(f"no inference log at {log_dir}: it is a file, not a directory")
    own = _log_folders(log_dir)
    partitions = [] if own is None else [Partition(None, own)]
    for folder in sorted(log_dir.glob(f"{PARTITION_KEY}=*")):
        if folder.is_dir() and (folders := _log_folders(folder)) is not None:
            partitions.append(Partition(folder.name.partition("=")[2], folders))
    if not partitions:
        raise _not_a_log(log_dir, INFERENCES, "is missing")
    return partitions


def _problem(path: Path, schema: pa.Schema) -> str | None:
    """What makes a file unreadable as one of the log's, or None."""
    try:
        found = pq.read_schema(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as error:
        return f"not a readable Parquet file ({error})"
    for expected in schema:
        index = found.get_field_index(expected.name)
        if index < 0:
            return f"column {expected.name!r} is missing"
        if not found.field(index).type.equals(expected.type):
            return f"column {expected.name!r} is {found.field(index).type}, expected {expected.type}"
    return None


@dataclass
class _Files:
    """The readable files of one kind: at the log's root, and in its partitions."""

    root: list[Path] = field(default_factory=list)
    partitioned: list[Path] = field(default_factory=list)

    def all(self) -> list[Path]:
        return self.root + self.partitioned


def _readable(partitions: list[Partition], excluded: set[Path]) -> tuple[dict[str, _Files], list[tuple[Path, str]]]:
    """The files to read per view, and those whose footer or schema is wrong (with what is wrong)."""
    files = {kind: _Files() for kind in SCHEMAS}
    corrupt: list[tuple[Path, str]] = []
    for partition in partitions:
        for kind, folder in partition.folders.items():
            for path in live_files(folder):
                if path in excluded:
                    continue
                try:
                    problem = _problem(path, SCHEMAS[kind])
                except FileNotFoundError:  # deleted meanwhile: not part of the log any more
                    continue
                if problem:
                    corrupt.append((path, problem))
                else:
                    (files[kind].root if partition.replica is None else files[kind].partitioned).append(path)
    return files, corrupt


def _listed(paths: list[Path]) -> str:
    return ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)


def _connect(files: dict[str, _Files]) -> duckdb.DuckDBPyConnection:
    """A DuckDB session with the three views over `files`, `replica` naming each row's partition; closed again when
    a view cannot be made (they read every file's schema: a file deleted meanwhile fails them)."""
    con = duckdb.connect()
    try:
        _make_views(con, files)
    except BaseException:
        con.close()
        raise
    return con


def _make_views(con: duckdb.DuckDBPyConnection, files: dict[str, _Files]) -> None:
    con.execute("SET TimeZone = 'UTC'")
    for kind, found in files.items():
        con.register(f"_{kind}_empty", SCHEMAS[kind].empty_table())  # no file yet: the log's columns, no rows
        reads = [f"SELECT *, NULL::VARCHAR AS {PARTITION_KEY} FROM _{kind}_empty"]
        if found.root:
            reads.append(
                f"SELECT *, NULL::VARCHAR AS {PARTITION_KEY} FROM read_parquet([{_listed(found.root)}], "
                "union_by_name = true, hive_partitioning = false)"
            )
        if found.partitioned:  # replica=NAME in each file's path gives its `replica`
            reads.append(
                f"SELECT * FROM read_parquet([{_listed(found.partitioned)}], union_by_name = true, "
                f"hive_partitioning = true, hive_types = {{'{PARTITION_KEY}': VARCHAR}})"
            )
        con.execute(f"CREATE VIEW {kind} AS {' UNION ALL BY NAME '.join(reads)}")
    # feedback is taken once per REQUEST_ID; the earliest is kept should a log hold two
    con.execute(
        "CREATE VIEW answers AS SELECT i.*, f.label AS feedback_label, f.received_at AS feedback_at "
        "FROM inferences i LEFT JOIN (SELECT request_id, arg_min(label, received_at) AS label, "
        "min(received_at) AS received_at FROM feedback GROUP BY request_id) f ON i.request_id = f.request_id"
    )


def _run(
    log_dir: Path,
    sql: str,
    skip_corrupt: bool,
    fetch: Callable[[duckdb.DuckDBPyRelation | None, tuple[tuple[Path, str], ...]], T],
) -> T:
    """`fetch` applied to the result of `sql` over the log's views. A file whose data DuckDB cannot read (its footer
    was fine) is corrupt like one whose footer is not; a file a writer deletes meanwhile (rolled up or aged out)
    makes the files be listed again, up to LIST_RETRIES times."""
    partitions = _partitions(log_dir)
    unreadable: list[tuple[Path, str]] = []  # found by DuckDB while reading
    relisted = 0
    while True:
        files, corrupt = _readable(partitions, {path for path, _ in unreadable})
        corrupt += unreadable
        if corrupt and not skip_corrupt:
            raise CorruptLogFile(corrupt)
        try:  # making the views or running the query: a file deleted meanwhile fails either
            with _connect(files) as con:
                return fetch(con.sql(sql), tuple(corrupt))
        except duckdb.Error as error:
            listed = [path for found in files.values() for path in found.all()]
            if any(not path.exists() for path in listed) and relisted < LIST_RETRIES:
                relisted += 1
                continue
            named = [path for path in listed if str(path) in str(error)]
            if not named:
                raise LogQueryError(f"query failed: {str(error).splitlines()[0] if str(error) else error!r}") from None
            unreadable.append((named[0], f"unreadable data ({error})"))


def query(log_dir: Path, sql: str, *, skip_corrupt: bool = False) -> QueryResult:
    """Run `sql` (DuckDB) over the views inferences, feedback and answers of the log in `log_dir`.
    LogDirectoryError when it is not a log, CorruptLogFile naming unreadable files (unless `skip_corrupt`),
    LogQueryError for SQL that DuckDB refuses or fails."""

    def fetch(relation: duckdb.DuckDBPyRelation | None, skipped: tuple[tuple[Path, str], ...]) -> QueryResult:
        if relation is None:  # a statement without a result (SET, CREATE, ...)
            return QueryResult((), [], skipped)
        return QueryResult(tuple(relation.columns), relation.fetchall(), skipped)

    return _run(log_dir, sql, skip_corrupt, fetch)


def read_rows(
    log_dir: Path, where: str | None = None, *, limit: int | None = None, skip_corrupt: bool = False
) -> list[InferenceRecord]:
    """The logged rows, oldest first, as records (pixels as sent with their shape, request parameters, seed, arms,
    variant, route, path and label), for replay. `where` is a DuckDB condition over the `answers` view, so it may
    test feedback_label too, e.g. "tier = 'critical' AND feedback_label IS NOT NULL". Errors as `query`'s; a row
    whose pixels do not match their SHA-256 raises CorruptLogFile."""
    sql = f"SELECT {', '.join(INFERENCE_SCHEMA.names)} FROM answers"
    if where:
        sql += f" WHERE {where}"
    sql += " ORDER BY answered_at, request_id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"

    def fetch(relation: duckdb.DuckDBPyRelation | None, skipped: tuple[tuple[Path, str], ...]) -> pa.Table:
        assert relation is not None, "a SELECT has a result"
        return relation.to_arrow_table()

    table = _run(log_dir, sql, skip_corrupt, fetch)
    try:
        return inference_records(table)
    except ValueError as error:
        raise CorruptLogFile([(log_dir / INFERENCES, str(error))]) from None


def _cell(value: Any) -> str:
    text = "NULL" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 3] + "..."


def render_table(result: QueryResult) -> str:
    """The result as an aligned text table (numbers right-aligned, long cells cut), with the row count, and a
    warning line per skipped corrupt file."""
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(result.columns)]
    numeric = [
        bool(result.rows) and all(isinstance(row[i], int | float) or row[i] is None for row in result.rows)
        for i in range(len(result.columns))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True)
        ).rstrip()

    lines = [line(result.columns), line(["-" * w for w in widths])] if result.columns else []
    lines += [line(row) for row in cells]
    lines.append(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})")
    lines += [f"warning: skipped corrupt file {path}: {why}" for path, why in result.skipped]
    return "\n".join(lines)
