"""`tierserve replay` without a server: the report's arithmetic, its table and plot, the rows sent in order and
compared (a fake sender stands in for the server), and bad input refused with typed errors before anything is
sent."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.test_inference_log import T0, make_record
from tierserve.client import TierserveError
from tierserve.inference_log import (
    INFERENCES,
    FeedbackRecord,
    InferenceLog,
    InferenceLogSettings,
    InferenceRecord,
)
from tierserve.replay_tokens import REPLAY_PARAMETER
from tierserve.routing import Hop, HopOutcome
from tierserve.state_store import open_store, shared_secret
from tierserve.tools import replay as replay_module
from tierserve.tools.log_admin import CorruptLogFile, LogDirectoryError, LogQueryError
from tierserve.tools.replay import (
    SHOWN_DIFFERENCES,
    Agreement,
    NoRowsToReplay,
    Replayed,
    ReplayedRow,
    ReplayError,
    ReplayRefused,
    ReplayReport,
    ReplaySecretError,
    ReplayTargetError,
    ServerUnreachable,
    Target,
    TierKeyNeeded,
    parse_target,
    replay,
    report_png,
    report_table,
)

ROWS = 9  # make_record's tiers cycle critical, standard, best_effort
LIGHT_OK = (Hop("digits_light:1", HopOutcome.OK),)
DIRECT = {"route": None, "arms": None, "path": None}  # what a model replayed directly answers besides the label
FAILED = {"label": None, **DIRECT, "latency_ms": None}  # a call that failed


def _row(index: int, *, label: int = 3, route: str = "digits_light:1", **changes) -> ReplayedRow:
    """A row replayed as logged (label 3 by digits_light:1, no arms), unless `changes` say otherwise."""
    fields = dict(
        request_id=f"id{index:06d}",
        tier="standard",
        logged_label=3,
        logged_route="digits_light:1",
        logged_arms={"bandit": "a"},
        logged_path=LIGHT_OK,
        logged_latency_ms=float(index + 1),
        feedback_label=None,
        label=label,
        route=route,
        arms={"bandit": "a"},
        path=LIGHT_OK,
        latency_ms=float(10 * (index + 1)),
    )
    return ReplayedRow(**(fields | changes))


def _report(rows: list[ReplayedRow], target: str | None = None) -> ReplayReport:
    return ReplayReport(parse_target(target), "localhost:8001", "grpc", tuple(rows))


# ------------------------------------------------------------------------------------------------- the arithmetic


def test_the_report_counts_agreement_accuracy_and_latency_through_the_router():
    rows = [
        _row(0, feedback_label=3),  # reproduced, right
        _row(1, feedback_label=4),  # reproduced, wrong both times
        _row(2, route="digits_heavy:2"),  # same label, another route
        _row(3, label=5, feedback_label=5),  # another label: the replay is right where the log was not
        _row(4, arms={"bandit": "b"}),  # same answer, another arm
        _row(5, **FAILED, error="UNAVAILABLE: shed"),
    ]
    report = _report(rows)
    assert report.label_agreement == Agreement(4, 6)
    assert report.route_agreement == Agreement(4, 6)
    assert report.arms_agreement == Agreement(4, 6)
    assert report.reproduced == Agreement(3, 6) and report.reproduced.share == 0.5
    assert report.errors == 1
    assert report.feedback_rows == 3
    assert report.logged_accuracy == pytest.approx(1 / 3) and report.replayed_accuracy == pytest.approx(2 / 3)
    assert report.logged_latency.p50_ms == pytest.approx(3.5)  # 1..6 ms
    assert report.replayed_latency.p50_ms == pytest.approx(30.0)  # 10..50 ms: the failed call has none
    assert report.replayed_latency.p99_ms == pytest.approx(49.6)
    assert [row.request_id for row in report.differences] == [f"id{i:06d}" for i in (2, 3, 4, 5)]


def test_against_a_model_directly_only_the_label_is_compared():
    rows = [
        _row(0, **DIRECT),
        _row(1, label=7, **DIRECT, feedback_label=7),
    ]
    report = _report(rows, "digits_heavy:1")
    assert report.route_agreement is None and report.arms_agreement is None
    assert report.reproduced == report.label_agreement == Agreement(1, 2)
    assert report.replayed_accuracy == 1.0 and report.logged_accuracy == 0.0
    assert [row.request_id for row in report.differences] == ["id000001"]


def test_a_row_with_feedback_that_was_not_answered_counts_as_wrong_and_the_table_says_so():
    report = _report([_row(0, feedback_label=3), _row(1, **FAILED, feedback_label=3, error="x")])
    assert report.replayed_accuracy == 0.5 and report.logged_accuracy == 1.0
    assert "logged 1.000, replayed 0.500 (1 not answered, counted wrong)" in report_table(report)


def test_no_feedback_and_no_answers_leave_accuracy_and_latency_unknown():
    report = _report([_row(0, **FAILED, error="x")])
    assert report.logged_accuracy is None and report.replayed_accuracy is None
    assert report.replayed_latency is None and report.logged_latency is not None
    assert Agreement(0, 0).share is None


@pytest.mark.parametrize(
    ("text", "target"),
    [(None, Target("digits")), ("digits", Target("digits")), ("digits_heavy:1", Target("digits_heavy", "1"))],
)
def test_targets_are_parsed(text, target):
    assert parse_target(text) == target
    assert str(target) == (text or "digits")


@pytest.mark.parametrize(("text", "named"), [("", "MODEL:VERSION"), ("a:b", "MODEL:VERSION"), ("digits:1", "router")])
def test_a_malformed_target_is_refused_naming_what_is_expected(text, named):
    with pytest.raises(ReplayTargetError, match=named):
        parse_target(text)


# ------------------------------------------------------------------------------------------------- table and plot


def test_the_table_shows_totals_and_the_rows_not_reproduced_with_their_paths_and_arms():
    escalated = (Hop("digits_light:1", HopOutcome.TIMEOUT), Hop("digits_heavy:2", HopOutcome.OK))
    rows = [_row(0, feedback_label=3), _row(1, label=5, route="digits_heavy:2", arms={"bandit": "b"}, path=escalated)]
    text = report_table(_report(rows))
    assert "replay of 2 logged rows against digits (through the router) at localhost:8001 (grpc)" in text
    assert "reproduced (route and label)       1 / 2       50.0%" in text
    assert "accuracy from feedback (1 rows): logged 1.000, replayed 1.000\n" in text
    assert "replayed (round trip)" in text and "logged (router)" in text
    assert text.endswith(
        "rows not reproduced (1 of 2):\n"
        "  id000001  standard\n"
        "    logged    3 by digits_light:1  path digits_light:1 ok  arms bandit=a\n"
        "    replayed  5 by digits_heavy:2  path digits_light:1 timeout>digits_heavy:2 ok  arms bandit=b"
    )
    assert "id000000" not in text  # reproduced rows are not listed


def test_the_table_lists_failed_calls_a_bounded_number_of_rows_and_skipped_files():
    rows = [_row(i, **FAILED, error="UNAVAILABLE: shed") for i in range(30)]
    report = ReplayReport(parse_target("digits_heavy:1"), "h:1", "http", tuple(rows), ((Path("/x.parquet"), "bad"),))
    text = report_table(report)
    assert f"rows not reproduced (30 of 30; the first {SHOWN_DIFFERENCES} shown):" in text
    assert text.count("    replayed  UNAVAILABLE: shed") == SHOWN_DIFFERENCES
    assert text.count("    logged    3 by digits_light:1\n") == SHOWN_DIFFERENCES
    assert "not answered                             30" in text
    assert "accuracy from feedback (0 rows): logged -, replayed -\n" in text
    assert "label agrees with the logged answer" in text and "route agrees" not in text
    assert text.endswith("warning: skipped corrupt file /x.parquet: bad")


def test_everything_reproduced_lists_no_rows():
    text = report_table(_report([_row(0), _row(1)]))
    assert "100.0%" in text and "not reproduced" not in text


@pytest.mark.parametrize("target", [None, "digits_heavy:1"])
def test_the_plot_is_written(tmp_path, target):
    png = tmp_path / "replay.png"
    report_png(_report([_row(0, feedback_label=3), _row(1, label=4)], target), png)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- a log and a sender


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """ROWS logged rows (two files) and feedback on rows 0 and 1: row 0's logged label is right, row 1's wrong."""
    log = InferenceLog(InferenceLogSettings(enabled=True, directory=tmp_path / "log", flush_interval_s=60))
    records = [make_record(i) for i in range(ROWS)]
    log.offer(records[:4])
    log.flush()
    log.offer(records[4:])
    log.offer(
        [
            FeedbackRecord(records[0].request_id, records[0].label, T0 + 100),
            FeedbackRecord(records[1].request_id, (records[1].label + 1) % 10, T0 + 100),
        ]
    )
    log.flush()
    return tmp_path / "log"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state store that holds a secret, as a server that ran with it leaves it."""
    path = tmp_path / "state.db"
    store = open_store(str(path))
    shared_secret(store)
    store.close()
    return path


class FakeServer:
    """Stands in for the server: answers each row as logged, except the rows `changed` (another label) and the
    rows `failing` (an error); records every row sent, and on which thread."""

    def __init__(self, changed: set[int] = frozenset(), failing: dict[int, TierserveError] | None = None) -> None:
        self.changed, self.failing = changed, failing or {}
        self.sent: list[str] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def send(self, record: InferenceRecord):
        index = int(record.request_id[2:])
        with self.lock:
            self.sent.append(record.request_id)
            self.threads.add(threading.current_thread().name)
        time.sleep(0.005)  # long enough for every worker to take rows
        if index in self.failing:
            raise self.failing[index]
        label = (record.label + 1) % 10 if index in self.changed else record.label
        return Replayed(label, record.route, dict(record.arms), record.path)

    @contextlib.contextmanager
    def opener(self, *args) -> Iterator:
        @contextlib.contextmanager
        def per_thread() -> Iterator:
            yield self.send

        yield per_thread


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    """A FakeServer in place of the server (the checks of the server and the model pass)."""
    server = FakeServer()
    monkeypatch.setattr(replay_module, "_check_server", lambda url, protocol, target: None)
    monkeypatch.setattr(replay_module, "_router_sender", server.opener)
    monkeypatch.setattr(replay_module, "_direct_sender", server.opener)
    monkeypatch.setattr(replay_module, "_live", lambda url, protocol: True)
    return server


def _replay(log_dir: Path, state: Path | None, **options) -> ReplayReport:
    return replay(log_dir, url="localhost:1", state_path=state, tier_key="key", **options)


def test_every_row_is_sent_once_compared_and_joined_with_its_feedback(log_dir, state, fake):
    fake.changed = {1, 4}
    seen: list[tuple[int, int]] = []
    report = _replay(log_dir, state, concurrency=3, progress=lambda done, total: seen.append((done, total)))
    assert [row.request_id for row in report.rows] == [f"id{i:06d}" for i in range(ROWS)]  # log order
    assert sorted(fake.sent) == [f"id{i:06d}" for i in range(ROWS)] and len(fake.threads) > 1
    assert report.reproduced == Agreement(ROWS - 2, ROWS)
    assert [row.request_id for row in report.differences] == ["id000001", "id000004"]
    assert report.feedback_rows == 2 and report.logged_accuracy == 0.5
    assert report.replayed_accuracy == 1.0  # row 1's replayed label is the one its feedback gave
    assert seen[0] == (0, ROWS) and seen[-1] == (ROWS, ROWS) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_where_and_limit_choose_the_rows(log_dir, state, fake):
    report = _replay(log_dir, state, where="tier = 'standard'", limit=2)
    assert [(row.request_id, row.tier) for row in report.rows] == [("id000001", "standard"), ("id000004", "standard")]
    assert report.feedback_rows == 1  # the feedback query is narrowed by the same condition


def test_a_row_the_server_refuses_is_reported_and_the_others_still_sent(log_dir, state, fake):
    fake.failing = {2: TierserveError(grpc.StatusCode.INVALID_ARGUMENT, "digits: pixels are not finite")}
    report = _replay(log_dir, state)
    assert report.errors == 1 and report.rows[2].error == "INVALID_ARGUMENT: digits: pixels are not finite"
    assert len(fake.sent) == ROWS


def test_tokens_the_server_refuses_stop_the_replay(log_dir, state, fake):
    fake.failing = {0: TierserveError(grpc.StatusCode.INVALID_ARGUMENT, f"parameter {REPLAY_PARAMETER} is forged")}
    with pytest.raises(ReplayRefused, match="the state store given must be the one the server runs with"):
        _replay(log_dir, state)
    assert fake.sent == ["id000000"]  # one worker: nothing sent after the refusal


def test_a_server_that_goes_away_midway_stops_the_replay(log_dir, state, fake, monkeypatch):
    fake.failing = {3: TierserveError(grpc.StatusCode.UNAVAILABLE, "cannot reach localhost:1")}
    monkeypatch.setattr(replay_module, "_live", lambda url, protocol: False)
    with pytest.raises(ServerUnreachable, match="went away"):
        _replay(log_dir, state)
    assert len(fake.sent) == 4


def test_a_direct_replay_needs_no_state_and_no_tier_key(log_dir, fake):
    report = replay(log_dir, url="localhost:1", target="digits_heavy:1")
    assert report.target == Target("digits_heavy", "1") and len(report.rows) == ROWS


# ------------------------------------------------------------------------------------------------------ bad input


def test_a_missing_or_malformed_log_directory_is_named(tmp_path, state):
    with pytest.raises(LogDirectoryError, match="does not exist"):
        _replay(tmp_path / "nowhere", state)
    (tmp_path / "log" / INFERENCES).mkdir(parents=True)
    with pytest.raises(LogDirectoryError, match="feedback/ is missing"):
        _replay(tmp_path / "log", state)


def test_a_corrupt_file_is_refused_by_name_nothing_deleted_and_skip_corrupt_replays_the_rest(log_dir, state, fake):
    first = sorted((log_dir / INFERENCES).glob("*.parquet"))[0]
    first.write_bytes(b"PAR1 not really")
    before = sorted(os.listdir(log_dir / INFERENCES))
    with pytest.raises(CorruptLogFile) as refused:
        _replay(log_dir, state)
    assert refused.value.files[0][0] == first and fake.sent == []
    assert sorted(os.listdir(log_dir / INFERENCES)) == before
    report = _replay(log_dir, state, skip_corrupt=True)
    assert len(report.rows) == ROWS - 4 and report.skipped[0][0] == first
    assert f"warning: skipped corrupt file {first}" in report_table(report)


def test_bad_sql_and_no_matching_rows_are_typed(log_dir, state, fake):
    with pytest.raises(LogQueryError):
        _replay(log_dir, state, where="no_such_column = 1")
    with pytest.raises(NoRowsToReplay, match="where tier = 'gold'"):
        _replay(log_dir, state, where="tier = 'gold'")
    assert fake.sent == []


def test_a_missing_state_store_is_named_and_not_created(log_dir, tmp_path, fake):
    for missing in (tmp_path / "no_state.db", None, "memory:"):
        with pytest.raises(ReplaySecretError, match="secret"):
            _replay(log_dir, missing)
    assert not (tmp_path / "no_state.db").exists() and fake.sent == []


def test_a_state_store_without_a_secret_is_named(log_dir, tmp_path, fake):
    path = tmp_path / "empty.db"
    open_store(str(path)).close()
    with pytest.raises(ReplaySecretError, match="holds no secret"):
        _replay(log_dir, path)


def test_rows_above_standard_need_a_tier_key(log_dir, state, fake):
    with pytest.raises(TierKeyNeeded, match="3 critical row"):
        replay(log_dir, url="localhost:1", state_path=state)
    assert fake.sent == []
    report = replay(log_dir, url="localhost:1", state_path=state, where="tier <> 'critical'")
    assert len(report.rows) == ROWS - 3


@pytest.mark.parametrize(
    ("options", "named"),
    [({"concurrency": 0}, "concurrency"), ({"limit": 0}, "limit"), ({"protocol": "ftp"}, "protocol")],
)
def test_bad_options_are_refused(log_dir, state, fake, options, named):
    with pytest.raises(ReplayError, match=named):
        _replay(log_dir, state, **options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_no_server_is_a_clear_error_before_anything_is_sent(log_dir, state, protocol):
    url = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ServerUnreachable, match=f"no server answers at {url}"):
        replay(log_dir, url=url, protocol=protocol, state_path=state, tier_key="key")
