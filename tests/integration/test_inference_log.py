"""The inference log on the real server: every answered row and every feedback taken reach the Parquet files,
off the hot path, and `tierserve log query` joins them by REQUEST_ID."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from tierserve.client import TierserveClient
from tierserve.tools.cli import main
from tierserve.tools.dataset import DigitsSplit
from tierserve.tools.exit_codes import ExitCode
from tierserve.tools.log_admin import query, read_rows
from tierserve.tools.server import TritonServer
from tierserve.tools.workload import noisy

FLUSHED_S = 3.0  # the writers flush every second


def _logged(triton: TritonServer, ids: list[str]) -> list:
    quoted = ", ".join(f"'{i}'" for i in ids)
    deadline = time.monotonic() + FLUSHED_S * 3
    while time.monotonic() < deadline:
        rows = read_rows(triton.inference_log, f"request_id IN ({quoted})")
        if len(rows) == len(ids) and all(r.request_id for r in rows):
            return rows
        time.sleep(0.3)
    return read_rows(triton.inference_log, f"request_id IN ({quoted})")


def test_every_answered_row_is_logged_with_what_explains_it(triton: TritonServer, split: DigitsSplit):
    upscaled = np.kron(split.test.images[:3], np.ones((2, 2), np.float32)).astype(np.float32)
    with TierserveClient(triton.grpc_url) as client:
        native = client.classify(
            noisy(split.test.images[:5], sigma=2.0, seed=3), user_id="log-reader", attributes={"region": "eu"}
        )
        large = client.classify(upscaled, tier="best_effort")
    answers = native + large
    rows = {r.request_id: r for r in _logged(triton, [a.request_id for a in answers])}
    assert len(rows) == len(answers)
    for answer, sent in zip(answers, [*noisy(split.test.images[:5], sigma=2.0, seed=3), *upscaled], strict=True):
        row = rows[answer.request_id]
        assert (row.route, row.label, row.reason) == (answer.route, answer.label, answer.reason)
        assert row.pixels.shape == sent.shape and np.array_equal(row.pixels, sent), "the pixels as sent"
        assert row.pixels_sha256 == hashlib.sha256(sent.astype("<f4").tobytes()).hexdigest()
        assert [h.model for h in row.path] and row.latency_ms > 0 and row.seed >= 0
    assert {rows[a.request_id].tier for a in large} == {"best_effort"}
    first = rows[native[0].request_id]
    assert first.user_hash and "log-reader" not in first.user_hash, "the user only as its keyed hash"
    assert first.attributes == {"region": "eu"}


def test_feedback_is_joined_by_request_id_and_log_query_prints_it(
    triton: TritonServer, split: DigitsSplit, capsys: pytest.CaptureFixture[str]
):
    with TierserveClient(triton.grpc_url) as client:
        answers = client.classify(split.test.images[:4], user_id="feedback-giver")
        client.feedback(answers[0].request_id, int(split.test.labels[0]))
    _logged(triton, [a.request_id for a in answers])
    sql = f"SELECT feedback_label FROM answers WHERE request_id = '{answers[0].request_id}'"
    deadline = time.monotonic() + FLUSHED_S * 3
    while query(triton.inference_log, sql).rows != [(int(split.test.labels[0]),)] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert query(triton.inference_log, sql).rows == [(int(split.test.labels[0]),)]
    capsys.readouterr()
    assert main(["log", "query", sql, "--log", str(triton.inference_log)]) == 0
    printed = capsys.readouterr().out
    assert "feedback_label" in printed and str(int(split.test.labels[0])) in printed and "(1 row)" in printed
    assert main(["log", "query", "SELEC nonsense", "--log", str(triton.inference_log)]) == 1
    assert "query failed" in capsys.readouterr().err


def test_tierserve_replay_reproduces_logged_rows_and_names_a_version_that_is_not_loaded(
    triton: TritonServer, split: DigitsSplit, capsys: pytest.CaptureFixture[str]
):
    with TierserveClient(triton.grpc_url) as client:
        answers = client.classify(noisy(split.test.images[10:16], sigma=1.0, seed=5), user_id="replayed")
    _logged(triton, [a.request_id for a in answers])
    where = " OR ".join(f"request_id = '{a.request_id}'" for a in answers)
    common = ["--log", str(triton.inference_log), "--url", triton.grpc_url, "--state", triton.state, "--where", where]
    capsys.readouterr()
    assert main(["replay", *common]) == 0
    printed = capsys.readouterr().out
    reproduced = [line for line in printed.splitlines() if line.strip().startswith("reproduced (route and label)")]
    assert reproduced and "6 / 6" in reproduced[0] and "100.0%" in reproduced[0], printed
    assert main(["replay", *common, "--model", "digits_heavy:7"]) == ExitCode.NOT_FOUND
    error = capsys.readouterr().err.strip()
    assert "digits_heavy" in error and "7" in error and "\n" not in error and "Traceback" not in error
