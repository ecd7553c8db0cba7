"""The inference log's writer: records round-trip through Parquet and the Kafka encoding; the queue never blocks and
counts what it drops; several writers share a directory; rotation, retention; a killed writer loses only its queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tierserve.assignment import Assignment
from tierserve.experimenter import RowPlan
from tierserve.inference_log import (
    FEEDBACK,
    INFERENCES,
    SETTINGS_FILE,
    FeedbackRecord,
    InferenceLog,
    InferenceLogSettings,
    InferenceLogSettingsError,
    InferenceRecord,
    KafkaSettings,
    KafkaSink,
    ParquetSink,
    decode_record,
    encode_record,
    feedback_records,
    feedback_table,
    hops,
    inference_record,
    inference_records,
    inference_table,
    live_files,
    load_settings,
    parse_settings,
)
from tierserve.routing import Answer, Hop, HopOutcome, Variant
from tierserve.signature import RequestContext, Signature
from tierserve.tools.paths import DEFAULT_REPOSITORY

REPO = Path(__file__).resolve().parents[2]
T0 = 1_750_000_000.25  # a time that microseconds hold exactly


def make_record(index: int, shape: tuple[int, int] = (8, 8), **changes) -> InferenceRecord:
    """A record with every field set, distinct per index; NaN pixels included."""
    rng = np.random.default_rng(index)
    pixels = rng.uniform(0, 16, shape).astype(np.float32)
    pixels[0, 0] = np.nan
    probs = rng.dirichlet(np.ones(10)).astype(np.float32)
    fields = dict(
        answered_at=T0 + index,
        request_id=f"id{index:06d}",
        user_hash=f"{index:016x}" if index % 2 else None,
        tier=("critical", "standard", "best_effort")[index % 3],
        deadline_ms=50 + index if index % 2 else None,
        attributes={"region": "eu", "account_age_days": str(index)},
        arms={"heavy_versions": "v1", "shadow_v1": "mirrored"} if index % 2 else {},
        seed=2**64 - 1 - index,
        variant_models={"digits_heavy:2": "digits_heavy:1"} if index % 2 else {},
        variant_threshold=0.97 if index % 2 else None,
        variant_escalate_when="threshold" if index % 2 else None,
        missing_fraction=1 / 64,
        out_of_range_fraction=0.0,
        sparsity=0.25 + index / 1000,
        ood_score=0.5,
        pixels=pixels,
        route="digits_heavy:2",
        path=(Hop("digits_light:1", HopOutcome.LOW_CONFIDENCE), Hop("digits_heavy:2", HopOutcome.OK)),
        outcome="direct",
        reason=f"cascade; escalated {index}",
        label=int(probs.argmax()),
        confidence=float(probs.max()),
        probs=tuple(float(p) for p in probs),
        first_label=3 if index % 2 else None,
        latency_ms=4.5 + index,
    )
    fields.update(changes)
    return InferenceRecord(**fields)


def same(a: InferenceRecord, b: InferenceRecord) -> bool:
    """Field by field, NaN pixels equal (records hold arrays, so they have no ==)."""
    for name in InferenceRecord.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name == "pixels":
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=True):
                return False
        elif name == "answered_at":
            if abs(x - y) > 1e-6:
                return False
        elif (dict(x) if name in ("attributes", "arms", "variant_models") else x) != (
            dict(y) if name in ("attributes", "arms", "variant_models") else y
        ):
            return False
    return True


def settings(directory: Path, **changes) -> InferenceLogSettings:
    return InferenceLogSettings(enabled=True, directory=directory, **changes)


def rows_in(folder: Path) -> list[str]:
    """REQUEST_IDs of a folder's live files, in file order."""
    return [rid for path in live_files(folder) for rid in pq.read_table(path).column("request_id").to_pylist()]


def test_records_round_trip_through_arrow_and_parquet_with_every_shape(tmp_path):
    records = [make_record(i, shape) for i, shape in enumerate([(4, 4), (8, 8), (64, 64), (5, 17)])]
    pq.write_table(inference_table(records), tmp_path / "x.parquet")
    back = inference_records(pq.read_table(tmp_path / "x.parquet"))
    assert len(back) == 4 and all(same(a, b) for a, b in zip(records, back, strict=True))
    assert [r.pixels.shape for r in back] == [(4, 4), (8, 8), (64, 64), (5, 17)] and np.isnan(back[0].pixels[0, 0])
    assert back[0].seed == 2**64 - 1  # unsigned 64 bits survive
    assert not same(records[0], make_record(0, (4, 4), seed=1))  # the comparison can fail
    feedback = [FeedbackRecord("id000001", 7, T0), FeedbackRecord("id000002", 0, T0 + 1)]
    assert feedback_records(feedback_table(feedback)) == feedback


def test_altered_pixels_are_caught_by_their_sha256():
    table = inference_table([make_record(1)])
    altered = table.set_column(
        table.schema.get_field_index("pixels_sha256"), "pixels_sha256", [["0" * 64]]
    )  # as if the pixels had changed under their hash
    with pytest.raises(ValueError, match=r"id000001.*SHA-256"):
        inference_records(altered)


def test_the_record_of_an_answer_keeps_the_user_hashed_and_the_decision_inputs():
    pixels = np.arange(16, dtype=np.float32).reshape(4, 4)
    variant = Variant({"digits_heavy:2": "digits_heavy:1"}, 0.97, "threshold", ("arm",))
    arm = Assignment("heavy_versions", "v1", "split", None, "split heavy_versions arm v1")  # type: ignore[arg-type]
    plan = RowPlan(seed=123, user="00ff00ff00ff00ff", assignments=(arm,), variant=variant)
    context = RequestContext("standard", "alice", 250, {"region": "eu", "account_age_days": 45})
    signature = Signature(4, 4, 0.0, 0.0, 0.5, 0.7, "standard", "alice", 250)
    probs = np.zeros(10, np.float32)
    probs[7] = 1.0
    answer = Answer(
        probs, 1.0, "digits_heavy:1", "why", hops("digits_light:1 low_confidence>digits_heavy:1 ok"), "direct", 3
    )
    record = inference_record(
        answered_at=T0,
        request_id="rid",
        plan=plan,
        context=context,
        signature=signature,
        pixels=pixels,
        answer=answer,
        latency_s=0.004,
    )
    pixels[0, 0] = 99  # the caller's buffer is reused: the record kept a copy
    assert record.pixels[0, 0] == 0 and record.user_hash == "00ff00ff00ff00ff"
    assert "alice" not in encode_record(record).decode()  # never the clear user id
    assert record.arms == {"heavy_versions": "v1"} and record.seed == 123 and record.label == 7
    assert (record.variant_models, record.variant_threshold, record.variant_escalate_when) == (
        {"digits_heavy:2": "digits_heavy:1"},
        0.97,
        "threshold",
    )
    assert record.path == (Hop("digits_light:1", HopOutcome.LOW_CONFIDENCE), Hop("digits_heavy:1", HopOutcome.OK))
    assert record.parameters() == {"tier": "standard", "region": "eu", "account_age_days": "45", "deadline_ms": "250"}
    assert record.latency_ms == pytest.approx(4.0) and record.first_label == 3
    assert hops("") == ()


def test_kafka_encoding_round_trips_without_a_broker():
    for record in [make_record(0, (4, 4)), make_record(1, (64, 64))]:
        encoded = encode_record(record)
        fields = json.loads(encoded)  # strict JSON: NaN pixels are inside the base64, not bare NaN
        assert fields["kind"] == "inference" and fields["seed"] == str(record.seed)
        assert same(decode_record(encoded), record)
    feedback = FeedbackRecord("id000001", 7, T0)
    assert decode_record(encode_record(feedback)) == feedback
    tampered = json.loads(encode_record(make_record(2)))
    tampered["label"] = 5
    tampered["pixels_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="pixels_sha256"):
        decode_record(json.dumps(tampered).encode())
    del tampered["route"]
    with pytest.raises(ValueError, match="'route' is missing"):
        decode_record(json.dumps(tampered).encode())
    with pytest.raises(ValueError, match="not an encoded log record"):
        decode_record(b"\xff")


class FakeProducer:
    """confluent_kafka.Producer's produce/poll/flush, recording what was produced; full after `room` messages."""

    def __init__(self, room: int = 1000) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.room = room
        self.polls = 0

    def produce(self, topic, key, value, on_delivery):
        if len(self.sent) >= self.room:
            raise BufferError("Local: Queue full")
        self.sent.append((topic, key, value))
        on_delivery(None, None)

    def poll(self, timeout):
        self.polls += 1
        return 0

    def flush(self, timeout):
        return 0


def test_the_kafka_sink_keys_by_request_id_and_counts_what_the_client_refuses():
    producer = FakeProducer(room=3)
    sink = KafkaSink(KafkaSettings(bootstrap_servers="broker:9092"), producer)
    log = InferenceLog(InferenceLogSettings(enabled=True, sink="kafka", kafka={"bootstrap_servers": "b:1"}), sink)
    log.offer([make_record(1), make_record(2), FeedbackRecord("id000001", 4, T0), make_record(3)])
    log.close()
    # inferences are written before feedback; the client's queue holds 3, so the feedback finds it full
    assert [(topic, key) for topic, key, _ in producer.sent] == [
        ("tierserve.inferences", b"id000001"),
        ("tierserve.inferences", b"id000002"),
        ("tierserve.inferences", b"id000003"),
    ]
    assert len(producer.sent) == 3 and log.lost == 1 and producer.polls >= 1  # full client queue: counted, not raised
    assert same(decode_record(producer.sent[0][2]), make_record(1))


def test_without_confluent_kafka_the_kafka_sink_says_what_to_install():
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        with pytest.raises(InferenceLogSettingsError, match=r"pip install 'tierserve\[kafka\]'"):
            KafkaSink(KafkaSettings(bootstrap_servers="broker:9092"))
    else:
        pytest.skip("confluent-kafka is installed here")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"queue_capacity": 0}, r"^inference_log\.queue_capacity: input should be greater than or equal to 1"),
        ({"flush": 1}, r"^inference_log\.flush: unknown key"),
        ({"enabled": True}, r"^inference_log\.directory: required when the log is enabled"),
        ({"directory": "relative/log"}, r"^inference_log\.directory: must be an absolute path"),
        ({"sink": "kafka"}, r"^inference_log\.kafka: required with sink kafka"),
        ({"sink": "kafka", "kafka": {}}, r"^inference_log\.kafka\.bootstrap_servers: required key is missing"),
        (
            {"sink": "kafka", "kafka": {"bootstrap_servers": "b:1", "topic": "a b"}},
            r"^inference_log\.kafka\.topic: string should match pattern",
        ),
        (
            {"sink": "kafka", "kafka": {"bootstrap_servers": "b:1", "producer": {"bootstrap.servers": "x"}}},
            r"^inference_log\.kafka\.producer\.bootstrap\.servers: set it as kafka\.bootstrap_servers",
        ),
        ({"sink": "files"}, r"^inference_log\.sink: input should be 'parquet' or 'kafka'"),
    ],
)
def test_bad_settings_name_their_key(data, message):
    with pytest.raises(InferenceLogSettingsError, match=message):
        parse_settings(data)


def test_settings_default_to_off_and_every_field_is_described():
    assert parse_settings(None).enabled is False
    assert all(f.description for f in InferenceLogSettings.model_fields.values())
    assert all(f.description for f in KafkaSettings.model_fields.values())


class StuckSink:
    """A sink whose writes wait until released: a slow disk or broker."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.lost = 0
        self.taken: list[InferenceRecord] = []

    def write_inferences(self, records):
        self.entered.set()
        self.release.wait(10)
        self.taken += records

    def write_feedback(self, records):
        pass

    def maintain(self):
        pass

    def close(self):
        pass


def test_a_full_queue_drops_and_counts_and_offer_never_waits_for_a_stuck_sink():
    sink = StuckSink()
    log = InferenceLog(InferenceLogSettings(queue_capacity=10, flush_interval_s=0.01), sink)
    try:
        log.offer([make_record(0)])
        assert sink.entered.wait(5)  # the writer thread is now stuck inside the sink
        started = time.monotonic()
        dropped = [log.offer([make_record(i) for i in range(4)]) for _ in range(5)]
        assert time.monotonic() - started < 0.5  # offer did not wait for the sink
        assert dropped == [0, 0, 2, 4, 4] and log.dropped == 10 and len(log) == 10
    finally:
        sink.release.set()
        log.close()
    assert len(sink.taken) == 11 and log.written == 11 and log.lost == 0
    assert log.offer([make_record(0)]) == 1 and log.dropped == 11  # closed: dropped, counted


def test_a_failing_sink_costs_records_never_an_exception(tmp_path):
    class Broken(StuckSink):
        def write_inferences(self, records):
            raise OSError("No space left on device")

    errors: list[str] = []
    log = InferenceLog(InferenceLogSettings(flush_interval_s=60), Broken(), on_error=errors.append)
    log.offer([make_record(0), make_record(1)])
    log.close()
    assert log.lost == 2 and log.written == 0 and "No space left" in errors[0]


def test_the_writer_thread_flushes_every_interval(tmp_path):
    log = InferenceLog(settings(tmp_path, flush_interval_s=0.05))
    try:
        log.offer([make_record(1)])
        deadline = time.monotonic() + 5
        while log.written < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rows_in(tmp_path / INFERENCES) == ["id000001"]  # written without flush() or close()
    finally:
        log.close()


def test_two_writers_share_a_directory_with_names_of_their_own(tmp_path):
    first, second = (InferenceLog(settings(tmp_path, flush_interval_s=60)) for _ in range(2))
    for round_ in range(3):
        first.offer([make_record(10 + round_)])
        second.offer([make_record(20 + round_), FeedbackRecord(f"id{20 + round_:06d}", 1, T0)])
        first.flush()
        second.flush()
    names = os.listdir(tmp_path / INFERENCES)
    assert len(names) == 6 and len({n.split("-")[1] for n in names}) == 2  # one writer id per log
    first.close()
    second.close()  # each rolls up its own parts only
    assert sorted(rows_in(tmp_path / INFERENCES)) == [f"id{i:06d}" for i in (10, 11, 12, 20, 21, 22)]
    assert len(os.listdir(tmp_path / INFERENCES)) == 2 and len(rows_in(tmp_path / FEEDBACK)) == 3


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_parts_roll_up_by_size_and_by_age(tmp_path):
    clock = Clock()
    sink = ParquetSink(tmp_path, settings(tmp_path, rotate_age_s=60), clock)
    sink.write_inferences([make_record(0)])
    part_bytes = os.path.getsize(live_files(tmp_path / INFERENCES)[0])
    by_size = settings(tmp_path, rotate_bytes=int(2.5 * part_bytes), rotate_age_s=1e6)  # rolled up at the third part
    sink = ParquetSink(tmp_path / "by_size", by_size, clock)
    for i in range(5):
        sink.write_inferences([make_record(i)])
        sink.maintain()
    names = sorted(n.split("-", 2)[2] for n in os.listdir(tmp_path / "by_size" / INFERENCES))
    assert names == ["c00000001-00000003.parquet", "p00000004.parquet", "p00000005.parquet"]
    assert rows_in(tmp_path / "by_size" / INFERENCES) == [f"id{i:06d}" for i in range(5)]

    aged = ParquetSink(tmp_path / "by_age", settings(tmp_path, rotate_age_s=60), clock)
    for i in range(3):
        aged.write_inferences([make_record(i)])
        aged.maintain()
    assert len(os.listdir(tmp_path / "by_age" / INFERENCES)) == 3
    clock.now += 61
    aged.maintain()
    (name,) = os.listdir(tmp_path / "by_age" / INFERENCES)
    assert name.endswith("-c00000001-00000003.parquet")
    assert rows_in(tmp_path / "by_age" / INFERENCES) == ["id000000", "id000001", "id000002"]


def test_parts_left_by_a_crash_after_rolling_up_are_never_read_twice(tmp_path):
    sink = ParquetSink(tmp_path, settings(tmp_path, rotate_age_s=1e6))
    for i in range(3):
        sink.write_inferences([make_record(i)])
    parts = {p: p.read_bytes() for p in live_files(tmp_path / INFERENCES)}
    sink.close()
    for path, data in parts.items():  # as if killed between the rename and the deletes
        path.write_bytes(data)
    assert len(os.listdir(tmp_path / INFERENCES)) == 4
    assert rows_in(tmp_path / INFERENCES) == ["id000000", "id000001", "id000002"]
    sink.sweep(time.time())  # retention deletes the leftovers
    assert len(os.listdir(tmp_path / INFERENCES)) == 1


def test_an_unreadable_part_is_left_as_it_is_outside_the_rolled_up_files(tmp_path):
    errors: list[str] = []
    log = InferenceLog(settings(tmp_path, flush_interval_s=60), on_error=errors.append)
    for i in range(3):
        log.offer([make_record(i)])
        log.flush()
    middle = live_files(tmp_path / INFERENCES)[1]
    middle.write_bytes(b"not parquet")
    log.close()
    names = sorted(n.split("-", 2)[2] for n in os.listdir(tmp_path / INFERENCES))
    assert names == ["c00000001-00000001.parquet", "c00000003-00000003.parquet", "p00000002.parquet"]
    assert middle.exists() and middle.name in errors[-1]  # kept for a person to look at, and reported


def test_retention_deletes_the_oldest_files_first_by_age_and_by_size(tmp_path):
    clock = Clock()
    sink = ParquetSink(tmp_path, settings(tmp_path, retention_age_s=3600, retention_bytes=None), clock)
    for i in range(4):
        sink.write_feedback([FeedbackRecord(f"id{i}", 1, T0)])
        sink.write_inferences([make_record(i)])
    files = live_files(tmp_path / INFERENCES) + live_files(tmp_path / FEEDBACK)
    for index, path in enumerate(sorted(files, key=lambda p: p.name.rsplit("-p", 1)[1])):
        os.utime(path, (clock.now - 7200 + index * 600,) * 2)  # 2 h, 1 h 50, ... old
    (tmp_path / INFERENCES / "stale.parquet.tmp").write_bytes(b"half")
    os.utime(tmp_path / INFERENCES / "stale.parquet.tmp", (clock.now - 7200,) * 2)
    sink.sweep(clock.now)
    kept = sorted(
        p.name.rsplit("-p", 1)[1] for p in live_files(tmp_path / INFERENCES) + live_files(tmp_path / FEEDBACK)
    )
    assert kept == ["00000007.parquet", "00000008.parquet"]  # younger than an hour
    assert not (tmp_path / INFERENCES / "stale.parquet.tmp").exists()

    sized = ParquetSink(tmp_path / "sized", settings(tmp_path, retention_age_s=None, retention_bytes=1), clock)
    for i in range(3):
        sized.write_inferences([make_record(i)])
    paths = live_files(tmp_path / "sized" / INFERENCES)
    for index, path in enumerate(paths):
        os.utime(path, (clock.now - 100 + index,) * 2)
    sized.settings = settings(tmp_path, retention_age_s=None, retention_bytes=os.path.getsize(paths[2]) + 1)
    sized.sweep(clock.now)
    assert live_files(tmp_path / "sized" / INFERENCES) == [paths[2]]  # the newest fits; the older went first


CRASH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import pyarrow.parquet as pq
    from tests.unit.test_inference_log import make_record
    from tierserve.inference_log import InferenceLog, InferenceLogSettings

    log = InferenceLog(InferenceLogSettings(enabled=True, directory=Path(sys.argv[1]), flush_interval_s=60))
    log.offer([make_record(i) for i in range(100, 105)])
    log.flush()  # these 5 are written
    log.offer([make_record(i) for i in range(105, 112)])  # these 7 are in the flush the kill interrupts

    def killed(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        where.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    pq.write_table = killed
    log.flush()
    """
)


def test_a_killed_writer_loses_only_its_last_flush_and_leaves_no_half_file(tmp_path):
    other = InferenceLog(settings(tmp_path, flush_interval_s=60))  # a second process's writer, alive meanwhile
    other.offer([make_record(1)])
    other.flush()
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path)], cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    other.offer([make_record(2)])
    other.close()
    ids = sorted(rows_in(tmp_path / INFERENCES))
    assert ids == ["id000001", "id000002", *(f"id{i:06d}" for i in range(100, 105))]
    leftovers = [n for n in os.listdir(tmp_path / INFERENCES) if n.endswith(".tmp")]
    assert len(leftovers) == 1  # the interrupted write, never renamed: invisible to readers


def test_the_router_reads_its_log_settings_with_the_directory_from_the_environment(tmp_path: Path):
    shipped = DEFAULT_REPOSITORY / "router"
    assert load_settings(shipped, str(tmp_path)).enabled and load_settings(shipped, str(tmp_path)).directory == tmp_path
    assert not load_settings(shipped, None).enabled, "a server started by hand, told no directory, records nothing"
    assert not load_settings(tmp_path, str(tmp_path)).enabled, "no settings file: the defaults, log off"
    (tmp_path / SETTINGS_FILE).write_text("enabled: true\nflush_interval_s: -1\n")
    with pytest.raises(InferenceLogSettingsError, match=r"inference_log\.yaml: inference_log\.flush_interval_s"):
        load_settings(tmp_path, str(tmp_path))
    (tmp_path / SETTINGS_FILE).write_text("- a list\n")
    with pytest.raises(InferenceLogSettingsError, match="expected a mapping"):
        load_settings(tmp_path, str(tmp_path))
