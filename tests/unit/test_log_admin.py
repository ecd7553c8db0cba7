"""`tierserve log query` and replay's reader: DuckDB views over the log, the join with feedback, clear errors for a
malformed directory or a corrupt file (and nothing deleted), rows read back as they were logged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_inference_log import T0, make_record, same
from tierserve.inference_log import FEEDBACK, INFERENCES, FeedbackRecord, InferenceLog, InferenceLogSettings
from tierserve.tools import log_admin
from tierserve.tools.log_admin import (
    EXAMPLE_QUERIES,
    CorruptLogFile,
    LogDirectoryError,
    LogQueryError,
    QueryResult,
    query,
    read_rows,
    render_table,
)

SHAPES = [(4, 4), (8, 8), (64, 64), (16, 32), (8, 8), (8, 8)]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """A log of 6 answers (two flushes, so two files) and feedback on 3 of them, 2 right and 1 wrong."""
    log = InferenceLog(InferenceLogSettings(enabled=True, directory=tmp_path / "log", flush_interval_s=60))
    records = [make_record(i, shape) for i, shape in enumerate(SHAPES)]
    log.offer(records[:3])
    log.flush()
    log.offer(records[3:])
    log.offer(
        [
            FeedbackRecord(records[0].request_id, records[0].label, T0 + 100),
            FeedbackRecord(records[1].request_id, (records[1].label + 1) % 10, T0 + 100),
            FeedbackRecord(records[4].request_id, records[4].label, T0 + 100),
        ]
    )
    log.flush()  # not closed: the parts stay as they are, as a running server leaves them
    return tmp_path / "log"


def test_the_views_hold_every_row_and_the_answers_join_feedback(log_dir):
    assert query(log_dir, "SELECT count(*) FROM inferences").rows == [(6,)]
    assert query(log_dir, "SELECT count(*) FROM feedback").rows == [(3,)]
    joined = query(
        log_dir,
        "SELECT request_id, label = feedback_label AS correct FROM answers ORDER BY request_id",
    )
    assert joined.columns == ("request_id", "correct")
    assert joined.rows == [
        ("id000000", True),
        ("id000001", False),
        ("id000002", None),
        ("id000003", None),
        ("id000004", True),
        ("id000005", None),
    ]
    typed = query(log_dir, "SELECT seed, arms['heavy_versions'], path[2].model, height, width FROM inferences")
    assert (2**64 - 2, "v1", "digits_heavy:2", 8, 8) in typed.rows


def test_the_example_queries_run(log_dir):
    by_route = query(log_dir, EXAMPLE_QUERIES["accuracy per route, from feedback"])
    assert by_route.rows == [("digits_heavy:2", 6, 3, pytest.approx(0.667))]
    by_tier = query(log_dir, EXAMPLE_QUERIES["latency per tier over the last hour"])
    assert by_tier.rows == []  # logged at T0, long ago
    assert "tier" in by_tier.columns


def test_rows_read_back_are_the_rows_logged_with_their_pixels_and_shapes(log_dir):
    rows = read_rows(log_dir)
    assert [r.request_id for r in rows] == [f"id{i:06d}" for i in range(6)]
    assert all(same(row, make_record(i, shape)) for i, (row, shape) in enumerate(zip(rows, SHAPES, strict=True)))
    assert rows[2].pixels.shape == (64, 64) and np.isnan(rows[2].pixels[0, 0])
    wrong = read_rows(log_dir, "feedback_label IS NOT NULL AND feedback_label <> label")
    assert [r.request_id for r in wrong] == ["id000001"]
    assert [r.request_id for r in read_rows(log_dir, "tier = 'critical'", limit=1)] == ["id000000"]


def test_an_empty_log_answers_with_no_rows(tmp_path):
    InferenceLog(InferenceLogSettings(enabled=True, directory=tmp_path, flush_interval_s=60)).close()
    assert query(tmp_path, "SELECT count(*) FROM answers").rows == [(0,)]
    assert read_rows(tmp_path) == []


def test_a_malformed_log_directory_is_named(tmp_path):
    with pytest.raises(LogDirectoryError, match=r"no inference log at .*nowhere: the directory does not exist"):
        query(tmp_path / "nowhere", "SELECT 1")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LogDirectoryError, match="it is a file, not a directory"):
        query(tmp_path / "file", "SELECT 1")
    with pytest.raises(LogDirectoryError, match=r"is not an inference log: inferences/ is missing"):
        query(tmp_path, "SELECT 1")
    (tmp_path / INFERENCES).mkdir()
    (tmp_path / FEEDBACK).write_text("x")
    with pytest.raises(LogDirectoryError, match=r"feedback/ is not a directory"):
        query(tmp_path, "SELECT 1")


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda path: path.write_bytes(b"PAR1 not really"), "not a readable Parquet file"),
        (lambda path: path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2]), "not a readable Parquet"),
    ],
    ids=["garbage", "truncated"],
)
def test_a_corrupt_file_is_refused_by_name_and_nothing_is_deleted(log_dir, damage, why):
    first = sorted((log_dir / INFERENCES).iterdir())[0]
    damage(first)
    before = sorted(os.listdir(log_dir / INFERENCES))
    with pytest.raises(CorruptLogFile, match=f"{first}: {why}") as refused:
        query(log_dir, "SELECT count(*) FROM inferences")
    assert refused.value.files[0][0] == first and "skip_corrupt" in str(refused.value)
    skipped = query(log_dir, "SELECT count(*) FROM inferences", skip_corrupt=True)
    assert skipped.rows == [(3,)] and skipped.skipped[0][0] == first  # the other file's rows, and a warning
    assert f"warning: skipped corrupt file {first}" in render_table(skipped)
    assert sorted(os.listdir(log_dir / INFERENCES)) == before  # nothing deleted or moved


def test_a_file_whose_data_cannot_be_read_is_refused_by_name(log_dir):
    first = sorted((log_dir / INFERENCES).iterdir())[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 8 : len(data) // 2] = b"\x55" * (len(data) // 2 - len(data) // 8)  # the footer is intact
    first.write_bytes(bytes(data))
    assert query(log_dir, "SELECT count(*) FROM feedback").rows == [(3,)]  # a view not read is not refused
    with pytest.raises(CorruptLogFile, match=f"{first}: unreadable data"):
        query(log_dir, "SELECT sum(list_sum(pixels)) FROM inferences")
    with pytest.raises(CorruptLogFile, match=f"{first}: unreadable data"):
        read_rows(log_dir)
    # found as DuckDB reads the damaged columns: a query that reads only intact ones answers from every file
    assert len(query(log_dir, "SELECT request_id FROM inferences").rows) == 6
    skipped = query(log_dir, "SELECT request_id, list_sum(pixels) FROM inferences ORDER BY 1", skip_corrupt=True)
    assert [row[0] for row in skipped.rows] == ["id000003", "id000004", "id000005"]
    assert skipped.skipped[0][0] == first
    assert first.exists()


def test_a_parquet_file_of_another_shape_is_refused_by_name(log_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    stranger = log_dir / FEEDBACK / "other.parquet"
    pq.write_table(pa.table({"request_id": [1], "label": [2]}), stranger)
    with pytest.raises(CorruptLogFile, match=r"other\.parquet: column 'received_at' is missing"):
        query(log_dir, "SELECT 1")
    pq.write_table(pa.table({"received_at": [1.0], "request_id": ["x"], "label": [2]}), stranger)
    with pytest.raises(CorruptLogFile, match=r"other\.parquet: column 'received_at' is double, expected timestamp"):
        query(log_dir, "SELECT 1")


def test_a_file_rolled_up_while_a_query_starts_is_read_in_its_new_place(log_dir, monkeypatch):
    connect = log_admin._connect
    renamed: list[Path] = []

    def then_rolled_up(files):
        con = connect(files)
        if not renamed:  # a writer renames a listed file before DuckDB opens it
            first = files[INFERENCES].root[0]
            renamed.append(first.rename(first.with_name("rolled-up.parquet")))
        return con

    monkeypatch.setattr(log_admin, "_connect", then_rolled_up)
    assert query(log_dir, "SELECT count(*) FROM inferences").rows == [(6,)]


def test_a_file_rolled_up_before_the_views_are_made_is_read_in_its_new_place(tmp_path, monkeypatch):
    """The views open every listed file for its schema: one renamed between listing and then is listed again."""
    records = [make_record(i, (8, 8)) for i in range(4)]
    _replica_log(tmp_path, "a", records[:2], [])
    _replica_log(tmp_path, "b", records[2:], [])
    connect = log_admin._connect
    renamed: list[Path] = []

    def rolled_up_first(files):
        if not renamed:
            first = files[INFERENCES].partitioned[0]
            renamed.append(first.rename(first.with_name("rolled-up.parquet")))
        return connect(files)

    monkeypatch.setattr(log_admin, "_connect", rolled_up_first)
    assert query(tmp_path, "SELECT replica, count(*) FROM inferences GROUP BY replica ORDER BY replica").rows == [
        ("a", 2),
        ("b", 2),
    ]
    assert renamed


def _replica_log(root: Path, replica: str | None, records: list, feedback: list) -> None:
    """What one server writes into the log root `root` with `replica` as its name (None: at the root)."""
    log = InferenceLog(InferenceLogSettings(enabled=True, directory=root, replica=replica, flush_interval_s=60))
    log.offer(records)
    log.offer(feedback)
    log.close()


def test_the_partitions_of_several_servers_are_read_as_one_log_with_their_replica(tmp_path):
    """Each server writes replica=NAME/ under one root; feedback one server took joins the answer another gave."""
    records = [make_record(i, (8, 8)) for i in range(5)]
    on_b = FeedbackRecord(records[0].request_id, records[0].label, T0 + 100)  # answered by a, fed back through b
    _replica_log(tmp_path, "a", records[:3], [])
    _replica_log(tmp_path, "b", records[3:], [on_b])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica=a", "replica=b"]
    per_replica = query(tmp_path, "SELECT replica, count(*) FROM inferences GROUP BY replica ORDER BY replica")
    assert per_replica.rows == [("a", 3), ("b", 2)]
    joined = query(tmp_path, "SELECT request_id, replica, feedback_label FROM answers WHERE feedback_label IS NOT NULL")
    assert joined.rows == [(records[0].request_id, "a", records[0].label)]
    assert query(tmp_path, "SELECT replica FROM feedback").rows == [("b",)]
    assert query(tmp_path / "replica=a", "SELECT count(*), any_value(replica) FROM inferences").rows == [(3, None)]
    assert all(same(a, b) for a, b in zip(read_rows(tmp_path), records, strict=True))


def test_files_at_the_root_and_in_partitions_are_read_together(tmp_path):
    """A server that wrote without a replica name before: its rows have replica NULL."""
    records = [make_record(i, (8, 8)) for i in range(3)]
    _replica_log(tmp_path, None, records[:1], [])
    _replica_log(tmp_path, "a", records[1:], [])
    result = query(tmp_path, "SELECT replica, count(*) FROM inferences GROUP BY replica ORDER BY replica NULLS FIRST")
    assert result.rows == [(None, 1), ("a", 2)]


def test_a_partition_missing_a_folder_is_named(tmp_path):
    _replica_log(tmp_path, "a", [make_record(0, (8, 8))], [])
    (tmp_path / "replica=b" / INFERENCES).mkdir(parents=True)
    with pytest.raises(LogDirectoryError, match=r"replica=b is not an inference log: feedback/ is missing"):
        query(tmp_path, "SELECT 1")


def test_temporary_files_of_a_write_in_progress_are_not_read(log_dir):
    (log_dir / INFERENCES / "x-y-p00000009.parquet.tmp").write_bytes(b"PAR1 half")
    assert query(log_dir, "SELECT count(*) FROM inferences").rows == [(6,)]


def test_bad_sql_is_a_query_error(log_dir):
    with pytest.raises(LogQueryError, match=r"query failed: .*nonexistent"):
        query(log_dir, "SELECT nonexistent FROM inferences")


def test_render_table_aligns_columns_and_cuts_long_cells():
    text = render_table(QueryResult(("route", "n", "reason"), [("digits_light:1", 12, "x" * 100), ("r:1", 3, None)]))
    lines = text.splitlines()
    assert lines[0].split() == ["route", "n", "reason"] and set(lines[1]) == {"-", " "}
    assert lines[2].endswith("x" * 37 + "...") and " 3  NULL" in lines[3] and lines[-1] == "(2 rows)"
    assert lines[2].index("12") + 2 == lines[3].index("3") + 1  # numbers right-aligned
