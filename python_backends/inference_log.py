"""The inference log: every row `digits` answers and every feedback taken, recorded off the hot path for queries
(DuckDB over Parquet, `tierserve log query`), audits and replay.

The router and the `feedback` model hand records to `InferenceLog.offer`, which only appends to a bounded in-memory
queue: it never blocks on the sink and never raises; when the queue is full the records are dropped and counted
(`dropped`). A background thread takes the whole queue every `flush_interval_s` and hands it to the sink:

- parquet (one machine): each flush becomes one part file per kind, written as `NAME.parquet.tmp`, fsynced and renamed,
  so readers see whole files or none. Rotation: a process rolls its parts into one file when together they reach
  `rotate_bytes` or the oldest is `rotate_age_s` old (per-flush files keep a crash's loss to one interval; rolled-up
  files keep queries fast). A rolled-up file's name says which parts it holds, so a part left behind by a crash
  between the rename and the deletes is skipped by readers (`live_files`), never counted twice. Retention: the
  oldest files (by modification time) are deleted while the log is larger than `retention_bytes` or they are older
  than `retention_age_s`.
- kafka (several machines): each record is produced as JSON (`encode_record`) keyed by its REQUEST_ID, to `topic` or
  `feedback_topic`, without waiting for the broker.

Layout: DIRECTORY/inferences/*.parquet and DIRECTORY/feedback/*.parquet, named `{UTC time}-{writer}-p{seq}.parquet`
(one flush) or `{UTC time}-{writer}-c{first}-{last}.parquet` (that writer's parts first..last rolled up), where the
writer is `host.pid.random`: unique per process, so any number of processes write into one directory at once.
Several servers share one log root as hive partitions: a server given a `replica` name writes that layout under
DIRECTORY/replica=NAME/ (each partition a whole log of its own, rolled up and aged out by its own server), and
`tierserve log query` reads the root's partitions as one log with a `replica` column.

A process killed without `close()` loses the records still in its queue: at most those offered during the last
`flush_interval_s`, plus those offered while the last flush was being written (milliseconds); every renamed file
stays whole and queryable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tierserve.experimenter import RowPlan
from tierserve.operator_files import OperatorFileError, load_yaml
from tierserve.routing import Answer, Hop, HopOutcome
from tierserve.signature import RequestContext, Signature
from tierserve.thread_names import NamedThread

INFERENCES = "inferences"  # folder of the inference records
FEEDBACK = "feedback"  # folder of the feedback records
SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"  # a file being written: never matched by *.parquet
COMPRESSION = "zstd"
SCHEMA_VERSION = 1  # in every file's metadata and every Kafka record
SWEEP_EVERY_S = 30.0  # retention runs this often per writer
STALE_TMP_S = 3600.0  # a .tmp file this old was left by a crash: retention deletes it
RECORD_KINDS = ("inference", "feedback")  # the `kind` of an encoded record
ROW_GROUP_BYTES = 32 * 2**20  # a rolled-up file is written a row group of about this much (in memory) at a time
ROW_GROUP_ROWS = 1 << 20  # and at most this many rows (pyarrow's default)

_NAME = re.compile(
    r"^(?P<stamp>\d{8}T\d{6}Z)-(?P<writer>[A-Za-z0-9_.]+)-(?:p(?P<seq>\d+)|c(?P<first>\d+)-(?P<last>\d+))\.parquet$"
)


# ---------------------------------------------------------------------------------------------------------- records


@functools.lru_cache(maxsize=4096)  # few distinct paths (models x outcomes): parsed once each
def hops(path: str) -> tuple[Hop, ...]:
    """The hops of a PATH as `digits` answers it (`model:version outcome` joined by '>'); ValueError for an outcome
    the router does not write."""
    return tuple(_hop(*hop.rsplit(" ", 1)) for hop in path.split(">")) if path else ()


def _hop(model: str, outcome: str) -> Hop:
    return Hop(model, HopOutcome(outcome))


@dataclass(frozen=True, eq=False)
class InferenceRecord:
    """One row answered by `digits`: what was asked, what the decision used, and what was answered.

    The user is only its keyed hash (`request_ids.user_key`, HMAC with the server's secret, as in REQUEST_ID).
    Every randomized decision of the row (bandit draws, shadow sampling, request-unit buckets) is drawn from `seed`
    alone (`assignment.uniforms(seed, experiment)`)."""

    answered_at: float  # unix seconds (kept to the microsecond)
    request_id: str  # the REQUEST_ID answered: the key feedback is joined on
    user_hash: str | None  # keyed hash of the user id (16 hex digits); None when the request sent none
    tier: str  # the tier served (after any tier-key downgrade)
    deadline_ms: int | None  # the request's deadline_ms parameter
    attributes: Mapping[str, str]  # the declared attributes the request sent, as text (as a request may send them)
    arms: Mapping[str, str]  # experiment -> arm, in the experiments file's order ("mirrored" for a shadow)
    seed: int  # the row's 64-bit seed: the source of every randomized decision
    variant_models: Mapping[str, str]  # policy model -> model:version the row's arms called instead
    variant_threshold: float | None  # the cascade threshold the arms or per-user adaptation set (None: the policy's)
    variant_escalate_when: str | None  # the escalate_when they set (None: the policy's)
    missing_fraction: float  # signature cues of the image as sent
    out_of_range_fraction: float
    sparsity: float
    ood_score: float
    pixels: np.ndarray  # [H, W] float32, the image as sent (NaN = missing), before resizing
    route: str  # model:version that answered
    path: tuple[Hop, ...]  # every model tried, in order, with its outcome
    outcome: str  # direct, fallback or degraded (routing.Answer.outcome)
    reason: str
    label: int
    confidence: float
    probs: tuple[float, ...]  # the 10 probabilities answered
    first_label: int | None  # the cascade's first model's label, when it answered the row
    latency_ms: float  # from preprocess to the answer, as the router measured it

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def pixels_sha256(self) -> str:
        """SHA-256 (hex) of the pixels as sent: float32, little-endian, row-major; the shape is not hashed."""
        return hashlib.sha256(_le_float32(self.pixels).tobytes()).hexdigest()

    def parameters(self) -> dict[str, str]:
        """The request parameters to send this row again (the user id is not logged: see `user_hash`)."""
        sent = {"tier": self.tier, **self.attributes}
        if self.deadline_ms is not None:
            sent["deadline_ms"] = str(self.deadline_ms)
        return sent


@dataclass(frozen=True)
class FeedbackRecord:
    """One feedback taken: the true label of an answered row."""

    request_id: str
    label: int
    received_at: float  # unix seconds (kept to the microsecond)


LogRecord = InferenceRecord | FeedbackRecord


def _le_float32(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels, dtype="<f4")


def inference_record(
    *,
    answered_at: float,
    request_id: str,
    plan: RowPlan,
    context: RequestContext,
    signature: Signature,
    pixels: np.ndarray,
    answer: Answer,
    latency_s: float,
) -> InferenceRecord:
    """The record of one answered row, from what the router holds once it answered. `pixels` is the image as sent
    ([H, W]); it is copied, so the caller's buffer may be reused."""
    variant = plan.variant
    return InferenceRecord(
        answered_at=answered_at,
        request_id=request_id,
        user_hash=plan.user or None,
        tier=context.tier,
        deadline_ms=context.deadline_ms,
        attributes={name: str(value) for name, value in context.attributes.items()},
        arms={a.experiment: a.arm for a in plan.assignments},
        seed=plan.seed,
        variant_models=dict(variant.models),
        variant_threshold=variant.threshold,
        variant_escalate_when=variant.escalate_when,
        missing_fraction=signature.missing_fraction,
        out_of_range_fraction=signature.out_of_range_fraction,
        sparsity=signature.sparsity,
        ood_score=signature.ood_score,
        pixels=np.asarray(pixels, np.float32).copy(),
        route=answer.route,
        path=answer.hops,
        outcome=answer.outcome,
        reason=answer.reason,
        label=int(answer.probs.argmax()),
        confidence=answer.confidence,
        probs=tuple(answer.probs.tolist()),
        first_label=answer.first_label,
        latency_ms=latency_s * 1000,
    )


# ------------------------------------------------------------------------------------------------------ arrow tables

_TEXT_MAP = pa.map_(pa.string(), pa.string())
_HOP = pa.struct([("model", pa.string()), ("outcome", pa.string())])
_METADATA = {b"tierserve.inference_log": str(SCHEMA_VERSION).encode()}

INFERENCE_SCHEMA = pa.schema(
    [
        ("answered_at", pa.timestamp("us")),  # UTC
        ("request_id", pa.string()),
        ("user_hash", pa.string()),
        ("tier", pa.string()),
        ("deadline_ms", pa.int32()),
        ("attributes", _TEXT_MAP),
        ("arms", _TEXT_MAP),
        ("seed", pa.uint64()),
        ("variant_models", _TEXT_MAP),
        ("variant_threshold", pa.float64()),
        ("variant_escalate_when", pa.string()),
        ("height", pa.int16()),
        ("width", pa.int16()),
        ("missing_fraction", pa.float64()),
        ("out_of_range_fraction", pa.float64()),
        ("sparsity", pa.float64()),
        ("ood_score", pa.float64()),
        ("pixels_sha256", pa.string()),
        ("pixels", pa.list_(pa.float32())),  # row-major, height x width
        ("route", pa.string()),
        ("path", pa.list_(_HOP)),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("label", pa.int8()),
        ("confidence", pa.float64()),
        ("probs", pa.list_(pa.float32())),
        ("first_label", pa.int8()),
        ("latency_ms", pa.float64()),
    ],
    metadata=_METADATA,
)
FEEDBACK_SCHEMA = pa.schema(
    [("received_at", pa.timestamp("us")), ("request_id", pa.string()), ("label", pa.int8())], metadata=_METADATA
)
SCHEMAS = {INFERENCES: INFERENCE_SCHEMA, FEEDBACK: FEEDBACK_SCHEMA}


def _micros(seconds: Sequence[float]) -> pa.Array:
    return pa.array([round(s * 1_000_000) for s in seconds], pa.timestamp("us"))


def _seconds(column: pa.ChunkedArray | pa.Array) -> list[float]:
    return [None if m is None else m / 1_000_000 for m in column.cast(pa.int64()).to_pylist()]


def _float32_lists(arrays: Sequence[np.ndarray]) -> pa.Array:
    sizes = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    values = np.concatenate([_le_float32(a).ravel() for a in arrays]) if arrays else np.empty(0, "<f4")
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))


def _float32_rows(column: pa.ChunkedArray) -> list[np.ndarray]:
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    ends = np.cumsum(lists.value_lengths().to_numpy(zero_copy_only=False))
    return np.split(values, ends[:-1]) if len(lists) else []


def inference_table(records: Sequence[InferenceRecord]) -> pa.Table:
    """The records as a table of INFERENCE_SCHEMA."""
    r = records
    columns = {
        "answered_at": _micros([x.answered_at for x in r]),
        "request_id": [x.request_id for x in r],
        "user_hash": [x.user_hash for x in r],
        "tier": [x.tier for x in r],
        "deadline_ms": [x.deadline_ms for x in r],
        "attributes": [list(x.attributes.items()) for x in r],
        "arms": [list(x.arms.items()) for x in r],
        "seed": [x.seed for x in r],
        "variant_models": [list(x.variant_models.items()) for x in r],
        "variant_threshold": [x.variant_threshold for x in r],
        "variant_escalate_when": [x.variant_escalate_when for x in r],
        "height": [x.height for x in r],
        "width": [x.width for x in r],
        "missing_fraction": [x.missing_fraction for x in r],
        "out_of_range_fraction": [x.out_of_range_fraction for x in r],
        "sparsity": [x.sparsity for x in r],
        "ood_score": [x.ood_score for x in r],
        "pixels_sha256": [x.pixels_sha256 for x in r],
        "pixels": _float32_lists([x.pixels for x in r]),
        "route": [x.route for x in r],
        "path": [[{"model": h.model, "outcome": h.outcome.value} for h in x.path] for x in r],
        "outcome": [x.outcome for x in r],
        "reason": [x.reason for x in r],
        "label": [x.label for x in r],
        "confidence": [x.confidence for x in r],
        "probs": _float32_lists([np.asarray(x.probs, np.float32) for x in r]),
        "first_label": [x.first_label for x in r],
        "latency_ms": [x.latency_ms for x in r],
    }
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in INFERENCE_SCHEMA], schema=INFERENCE_SCHEMA)


def inference_records(table: pa.Table) -> list[InferenceRecord]:
    """The records of a table with INFERENCE_SCHEMA's columns (extra columns are ignored). ValueError naming the
    REQUEST_ID when a row's pixels do not match its shape or its SHA-256 (the file was altered)."""
    arrays = ("answered_at", "pixels", "probs")  # converted below, not through Python objects
    py = {name: table.column(name).to_pylist() for name in INFERENCE_SCHEMA.names if name not in arrays}
    pixels = _float32_rows(table.column("pixels"))
    probs = _float32_rows(table.column("probs"))
    answered_at = _seconds(table.column("answered_at"))
    records = []
    for i, flat in enumerate(pixels):
        request_id, height, width = py["request_id"][i], py["height"][i], py["width"][i]
        if flat.size != height * width:
            raise ValueError(f"REQUEST_ID {request_id!r}: {flat.size} pixels logged for a {height}x{width} image")
        record = InferenceRecord(
            answered_at=answered_at[i],
            request_id=request_id,
            user_hash=py["user_hash"][i],
            tier=py["tier"][i],
            deadline_ms=py["deadline_ms"][i],
            attributes=dict(py["attributes"][i]),
            arms=dict(py["arms"][i]),
            seed=py["seed"][i],
            variant_models=dict(py["variant_models"][i]),
            variant_threshold=py["variant_threshold"][i],
            variant_escalate_when=py["variant_escalate_when"][i],
            missing_fraction=py["missing_fraction"][i],
            out_of_range_fraction=py["out_of_range_fraction"][i],
            sparsity=py["sparsity"][i],
            ood_score=py["ood_score"][i],
            pixels=flat.reshape(height, width),
            route=py["route"][i],
            path=tuple(_hop(h["model"], h["outcome"]) for h in py["path"][i]),
            outcome=py["outcome"][i],
            reason=py["reason"][i],
            label=py["label"][i],
            confidence=py["confidence"][i],
            probs=tuple(float(p) for p in probs[i]),
            first_label=py["first_label"][i],
            latency_ms=py["latency_ms"][i],
        )
        if record.pixels_sha256 != py["pixels_sha256"][i]:
            raise ValueError(f"REQUEST_ID {request_id!r}: the pixels do not match their logged SHA-256")
        records.append(record)
    return records


def feedback_table(records: Sequence[FeedbackRecord]) -> pa.Table:
    """The records as a table of FEEDBACK_SCHEMA."""
    return pa.Table.from_arrays(
        [
            _micros([r.received_at for r in records]),
            pa.array([r.request_id for r in records], pa.string()),
            pa.array([r.label for r in records], pa.int8()),
        ],
        schema=FEEDBACK_SCHEMA,
    )


def feedback_records(table: pa.Table) -> list[FeedbackRecord]:
    """The records of a table with FEEDBACK_SCHEMA's columns."""
    at = _seconds(table.column("received_at"))
    ids, labels = table.column("request_id").to_pylist(), table.column("label").to_pylist()
    return [FeedbackRecord(i, label, t) for i, label, t in zip(ids, labels, at, strict=True)]


# ------------------------------------------------------------------------------------------------- kafka encoding


def encode_record(record: LogRecord) -> bytes:
    """A record as one JSON object (UTF-8), for Kafka: `kind` and `v` first, then the fields by name. The pixels are
    base64 of their float32 little-endian bytes with `height` and `width`: exact, NaN (a missing pixel, which JSON
    numbers cannot hold) included, and a third of the size of decimal text. The seed is a decimal string: a 64-bit
    unsigned number does not fit the numbers of JavaScript or a Java long."""
    if isinstance(record, FeedbackRecord):
        fields: dict[str, Any] = {"kind": "feedback", "v": SCHEMA_VERSION, **record.__dict__}
    else:
        fields = {
            "kind": "inference",
            "v": SCHEMA_VERSION,
            **{name: value for name, value in record.__dict__.items() if name not in ("pixels", "path", "seed")},
            "seed": str(record.seed),
            "height": record.height,
            "width": record.width,
            "pixels": base64.b64encode(_le_float32(record.pixels).tobytes()).decode(),
            "pixels_sha256": record.pixels_sha256,
            "path": [[hop.model, hop.outcome.value] for hop in record.path],
        }
    return json.dumps(fields, allow_nan=False, separators=(",", ":"), default=dict).encode()


def decode_record(data: bytes) -> LogRecord:
    """The record `encode_record` wrote. ValueError naming the field when `data` is not one."""
    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not an encoded log record: {error}") from None
    if not isinstance(fields, dict) or fields.get("kind") not in RECORD_KINDS:
        raise ValueError(f"not an encoded log record: 'kind' must be one of {', '.join(RECORD_KINDS)}")
    if fields.get("v") != SCHEMA_VERSION:
        raise ValueError(f"log record version {fields.get('v')!r}: this reader takes version {SCHEMA_VERSION}")
    try:
        if fields["kind"] == "feedback":
            return FeedbackRecord(str(fields["request_id"]), int(fields["label"]), float(fields["received_at"]))
        raw = base64.b64decode(fields["pixels"], validate=True)
        pixels = np.frombuffer(raw, "<f4").astype(np.float32).reshape(fields["height"], fields["width"])
        converted = ("seed", "pixels", "path", "probs")
        record = InferenceRecord(
            **{name: fields[name] for name in InferenceRecord.__dataclass_fields__ if name not in converted},
            seed=int(fields["seed"]),
            pixels=pixels,
            path=tuple(_hop(model, outcome) for model, outcome in fields["path"]),
            probs=tuple(float(p) for p in fields["probs"]),
        )
    except KeyError as error:
        raise ValueError(f"log record: field {error.args[0]!r} is missing") from None
    except (TypeError, ValueError, binascii.Error) as error:
        raise ValueError(f"log record: a field is malformed: {error}") from None
    if record.pixels_sha256 != fields.get("pixels_sha256"):
        raise ValueError(f"log record {record.request_id!r}: the pixels do not match 'pixels_sha256'")
    return record


# ------------------------------------------------------------------------------------------------------- settings


class InferenceLogSettingsError(ValueError):
    """The inference log's settings are invalid; the message starts with the dotted key of the mistake."""


def _invalid(key: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("inference_log", "{key}: {message}", {"key": key, "message": message})


class _Settings(BaseModel):
    """Unknown keys are refused, and nothing changes once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Settings):
    """Where the kafka sink produces (confluent-kafka, the `kafka` extra: `pip install 'tierserve[kafka]'`)."""

    bootstrap_servers: str = Field(min_length=1, description="the brokers, host:port[,host:port...]")
    topic: str = Field(
        "tierserve.inferences", pattern=r"^[A-Za-z0-9._-]{1,249}$", description="topic of the inference records"
    )
    feedback_topic: str = Field(
        "tierserve.feedback", pattern=r"^[A-Za-z0-9._-]{1,249}$", description="topic of the feedback records"
    )
    producer: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="further librdkafka producer settings (security.protocol, sasl.*, linger.ms, ...); "
        "bootstrap.servers is the key above",
    )

    @field_validator("producer")
    @classmethod
    def _not_bootstrap(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "bootstrap.servers" in value:
            raise _invalid("bootstrap.servers", "set it as kafka.bootstrap_servers")
        return value


class InferenceLogSettings(_Settings):
    """The inference log of one server: whether it records, where, and how much it keeps."""

    enabled: bool = Field(False, description="record every answered row and every feedback taken")
    directory: Path | None = Field(
        None, description="absolute path of the log (sink parquet): inferences/ and feedback/ are made under it"
    )
    queue_capacity: int = Field(
        8192,
        ge=1,
        le=100_000,  # 100,000 64x64 images are 1.6 GiB, and the most one flush's 32-bit list offsets address
        description="records held between flushes per process; more are dropped and counted. A 64x64 image is "
        "16 KiB, so the default holds at most 128 MiB",
    )
    flush_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often the queue is written: a crash loses at most this much"
    )
    rotate_bytes: int = Field(
        64 * 2**20, ge=1, description="a process's per-flush files are rolled into one when together this large"
    )
    rotate_age_s: float = Field(300.0, gt=0, description="... or when the oldest of them is this old")
    retention_bytes: int | None = Field(
        10 * 2**30, ge=1, description="the oldest files are deleted while the log is larger (None: no limit)"
    )
    retention_age_s: float | None = Field(
        30 * 86400.0, gt=0, description="files older than this are deleted (None: kept however old)"
    )
    replica: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="this server's name when several share one log root: its files go under "
        "directory/replica=NAME/ (sink parquet), which `tierserve log query` reads with the others as one log",
    )
    sink: Literal["parquet", "kafka"] = Field(
        "parquet", description="parquet: files in `directory` (one machine); kafka: records to `kafka` (several)"
    )
    kafka: KafkaSettings | None = Field(None, description="the brokers and topics; required with sink kafka")

    @field_validator("directory")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise _invalid("", "must be an absolute path (the server's processes run in other directories)")
        return value

    @model_validator(mode="after")
    def _sink_configured(self) -> InferenceLogSettings:
        if self.sink == "kafka" and self.kafka is None:
            raise _invalid("kafka", "required with sink kafka (at least bootstrap_servers)")
        if self.enabled and self.sink == "parquet" and self.directory is None:
            raise _invalid("directory", "required when the log is enabled with sink parquet")
        return self


def parse_settings(data: Mapping[str, Any] | None, where: str = "inference_log") -> InferenceLogSettings:
    """Validate settings (as parsed from YAML or JSON; None: the defaults, log off). InferenceLogSettingsError's
    message starts with the dotted key under `where`, e.g. `inference_log.kafka.topic: ...`."""
    try:
        return InferenceLogSettings.model_validate({} if data is None else data)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        dotted = ".".join([where, *(str(part) for part in first["loc"])])
        if first["type"] == "inference_log":
            key = first["ctx"]["key"]
            raise InferenceLogSettingsError(f"{dotted}{'.' + key if key else ''}: {first['ctx']['message']}") from None
        if first["type"] == "extra_forbidden":
            raise InferenceLogSettingsError(f"{dotted}: unknown key") from None
        if first["type"] == "missing":
            raise InferenceLogSettingsError(f"{dotted}: required key is missing") from None
        message = first["msg"][0].lower() + first["msg"][1:]
        raise InferenceLogSettingsError(f"{dotted}: {message}, got {first['input']!r}"[:300]) from None


LOG_DIR_ENV = "TIERSERVE_LOG_DIR"  # the log's directory when its settings file names none (tools/server.py sets it)
REPLICA_ENV = "TIERSERVE_REPLICA"  # the server's partition of a shared log when the file names none (tools/server.py)
PARTITION_KEY = "replica"  # a partition's folder is `replica=NAME` (hive style)
SETTINGS_FILE = "inference_log.yaml"  # beside the router's policy


def partition_dir(directory: Path, replica: str | None) -> Path:
    """Where a server writes its files in a log rooted at `directory`: the root itself, or its partition."""
    return directory if replica is None else directory / f"{PARTITION_KEY}={replica}"


def load_settings(router_dir: Path, log_dir: str | None = None, replica: str | None = None) -> InferenceLogSettings:
    """The router's inference log settings: `router_dir`/inference_log.yaml (absent: the defaults, log off), with
    `directory` from `log_dir` ($TIERSERVE_LOG_DIR) and `replica` from `replica`, else $TIERSERVE_REPLICA, when the
    file names none. Enabled with no directory at all, the log is off: a tritonserver started by hand records nothing
    until told where. InferenceLogSettingsError names a bad key."""
    path = router_dir / SETTINGS_FILE
    try:
        data = load_yaml(path) if path.exists() else None
    except OperatorFileError as error:
        raise InferenceLogSettingsError(f"{path}: cannot read the settings: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise InferenceLogSettingsError(f"{path}: expected a mapping of settings")
    data = dict(data or {})
    if data.get("directory") is None and data.get("sink", "parquet") == "parquet":
        if not log_dir:
            data["enabled"] = False
        else:
            data["directory"] = log_dir
    if data.get(PARTITION_KEY) is None and (replica := replica or os.environ.get(REPLICA_ENV)):
        data[PARTITION_KEY] = replica
    try:
        return parse_settings(data)
    except InferenceLogSettingsError as error:
        raise InferenceLogSettingsError(f"{path}: {error}") from None


# ---------------------------------------------------------------------------------------------------------- sinks


class Sink(Protocol):
    """Where the writer thread puts records. A write raises when its records are not taken."""

    lost: int  # records taken but then not delivered (e.g. refused by Kafka after produce)

    def write_inferences(self, records: Sequence[InferenceRecord]) -> None: ...

    def write_feedback(self, records: Sequence[FeedbackRecord]) -> None: ...

    def maintain(self) -> None:
        """Periodic work, called after every flush (rotation, retention, delivery reports)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LogFile:
    """A Parquet file of the log, as its name describes it."""

    path: Path
    writer: str  # the process that wrote it; "" for a file named otherwise (taken as is)
    first: int  # the seq of the first part it holds (a part holds itself)
    last: int
    rolled_up: bool  # several parts rolled into one


def log_file(path: Path) -> LogFile:
    """What a log file's name says it holds."""
    match = _NAME.match(path.name)
    if match is None:
        return LogFile(path, "", 0, 0, False)
    if match["seq"] is not None:
        return LogFile(path, match["writer"], int(match["seq"]), int(match["seq"]), False)
    return LogFile(path, match["writer"], int(match["first"]), int(match["last"]), True)


def _listing(folder: Path) -> tuple[list[LogFile], list[LogFile]]:
    """(live, covered) Parquet files of a folder, live by name; covered: parts that a rolled-up file holds too."""
    files = [log_file(folder / name) for name in os.listdir(folder) if name.endswith(SUFFIX)]
    ranges: dict[str, list[tuple[int, int]]] = {}
    for f in files:
        if f.rolled_up:
            ranges.setdefault(f.writer, []).append((f.first, f.last))
    live, covered = [], []
    for f in files:
        inside = not f.rolled_up and any(lo <= f.first <= hi for lo, hi in ranges.get(f.writer, ()))
        (covered if inside else live).append(f)
    return sorted(live, key=lambda f: f.path.name), covered


def live_files(folder: Path) -> list[Path]:
    """The Parquet files of a log folder to read, by name: all but the parts a rolled-up file holds too (left behind
    when a writer was killed between rolling them up and deleting them). Temporary files are never listed."""
    return [f.path for f in _listing(folder)[0]]


def writer_id() -> str:
    """This process's name in file names: host.pid.random (the random part outlives a reused pid)."""
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
    return f"{host}.{os.getpid()}.{secrets.token_hex(4)}"


def _stamp(at: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))


def _install(tmp: Path, out: BinaryIO, path: Path) -> None:
    """Make a written temporary file `path`: durable first (fsync), then renamed in one step."""
    out.flush()
    os.fsync(out.fileno())
    os.replace(tmp, path)


def write_atomically(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` as Parquet through `path.tmp`, fsynced then renamed: `path` is whole or absent."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as out:
            pq.write_table(table, out, compression=COMPRESSION)
            _install(tmp, out, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Part:
    seq: int
    path: Path
    size: int
    written_at: float


class ParquetSink:
    """Parquet files in `directory`: one part per kind per flush, rolled up and aged out as the settings say."""

    def __init__(self, directory: Path, settings: InferenceLogSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.folders = {INFERENCES: directory / INFERENCES, FEEDBACK: directory / FEEDBACK}
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.writer = writer_id()
        self.lost = 0  # a part, once renamed, is never lost by this sink
        self._seq = 0
        self._parts: dict[str, list[_Part]] = {INFERENCES: [], FEEDBACK: []}
        self._swept_at = float("-inf")

    def write_inferences(self, records: Sequence[InferenceRecord]) -> None:
        self._write(INFERENCES, inference_table(records))

    def write_feedback(self, records: Sequence[FeedbackRecord]) -> None:
        self._write(FEEDBACK, feedback_table(records))

    def _write(self, kind: str, table: pa.Table) -> None:
        self._seq += 1
        path = self.folders[kind] / f"{_stamp(self.clock())}-{self.writer}-p{self._seq:08d}{SUFFIX}"
        write_atomically(table, path)
        self._parts[kind].append(_Part(self._seq, path, path.stat().st_size, self.clock()))

    def maintain(self) -> None:
        """Roll up the parts of a kind once they reach rotate_bytes together or the oldest is rotate_age_s old;
        retention every SWEEP_EVERY_S."""
        now = self.clock()
        problems = []
        for kind, parts in self._parts.items():
            if parts and (
                sum(p.size for p in parts) >= self.settings.rotate_bytes
                or now - parts[0].written_at >= self.settings.rotate_age_s
            ):
                problems += self._roll_up(kind)
        if now - self._swept_at >= SWEEP_EVERY_S:
            self._swept_at = now
            self.sweep(now)
        if problems:
            raise OSError("; ".join(problems))

    def close(self) -> None:
        """Roll up every part written, whatever its size and age."""
        if problems := [problem for kind in self._parts for problem in self._roll_up(kind)]:
            raise OSError("; ".join(problems))

    def _roll_up(self, kind: str) -> list[str]:
        """Roll this writer's parts of `kind` into as few files as the readable parts allow; what went wrong."""
        parts, self._parts[kind] = self._parts[kind], []
        problems = []
        while parts:
            try:
                consumed, problem = self._roll_run(kind, parts)
            except Exception as error:  # e.g. a full disk: the parts stay as they are, rolled up at a later try
                self._parts[kind] = parts + self._parts[kind]
                return [*problems, f"{kind} parts not rolled up (kept as they are): {error!r}"]
            if problem:
                problems.append(problem)
            parts = parts[consumed:]
        return problems

    def _roll_run(self, kind: str, parts: list[_Part]) -> tuple[int, str | None]:
        """Roll the leading readable parts into one file, read and written a row group at a time; then delete them.
        An unreadable part ends the run and is left as it is, outside every rolled-up range, so readers still see
        (and report) it. Returns how many parts were consumed (that one included) and what was wrong with it."""
        held: list[_Part] = []
        buffered: list[pa.Table] = []
        consumed, problem = len(parts), None
        tmp = self.folders[kind] / f"rolling-{self.writer}{SUFFIX}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as out:
                writer: pq.ParquetWriter | None = None
                for index, part in enumerate(parts):
                    try:
                        table = pq.read_table(part.path, partitioning=None)  # not replica=NAME as a column
                    except FileNotFoundError:  # deleted by retention meanwhile: nothing left to keep
                        continue
                    except (OSError, pa.ArrowException) as error:
                        consumed, problem = index + 1, f"{part.path} left as it is (unreadable: {error})"
                        break
                    held.append(part)
                    buffered.append(table)
                    if sum(t.nbytes for t in buffered) >= ROW_GROUP_BYTES:
                        writer = writer or pq.ParquetWriter(out, table.schema, compression=COMPRESSION)
                        writer.write_table(pa.concat_tables(buffered), row_group_size=ROW_GROUP_ROWS)
                        buffered = []
                if not held:
                    return consumed, problem
                if buffered:
                    writer = writer or pq.ParquetWriter(out, buffered[0].schema, compression=COMPRESSION)
                    writer.write_table(pa.concat_tables(buffered), row_group_size=ROW_GROUP_ROWS)
                assert writer is not None
                writer.close()
                first, last = held[0], held[-1]
                name = f"{first.path.name.split('-', 1)[0]}-{self.writer}-c{first.seq:08d}-{last.seq:08d}{SUFFIX}"
                _install(tmp, out, self.folders[kind] / name)
        finally:
            tmp.unlink(missing_ok=True)
        for part in held:  # covered by the rolled-up file from here on: readers skip them
            part.path.unlink(missing_ok=True)
        return consumed, problem

    def sweep(self, now: float) -> None:
        """Retention over the whole directory (every writer's files): delete leftovers (parts rolled up already,
        .tmp files older than STALE_TMP_S), then the oldest files while the log is over retention_bytes or they
        are older than retention_age_s. A file another process deletes meanwhile is skipped."""
        files: list[tuple[float, int, Path]] = []
        for folder in self.folders.values():
            for name in os.listdir(folder):
                if name.endswith(TMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if now - (folder / name).stat().st_mtime > STALE_TMP_S:
                            (folder / name).unlink()
            live, covered = _listing(folder)
            for f in covered:
                f.path.unlink(missing_ok=True)
            for f in live:
                with contextlib.suppress(FileNotFoundError):
                    stat = f.path.stat()
                    files.append((stat.st_mtime, stat.st_size, f.path))
        files.sort()
        total = sum(size for _, size, _ in files)
        max_age, max_bytes = self.settings.retention_age_s, self.settings.retention_bytes
        for mtime, size, path in files:  # oldest first: once one may stay, every later one may
            if not ((max_age is not None and now - mtime > max_age) or (max_bytes is not None and total > max_bytes)):
                break
            path.unlink(missing_ok=True)
            total -= size


class KafkaSink:
    """Records produced to Kafka as JSON, keyed by REQUEST_ID (an answer and its feedback share a key, hence a
    partition when both topics have as many). `produce` only queues in the client; delivery reports are served by
    `maintain` on the writer thread. `producer` is for tests: by default a confluent_kafka.Producer."""

    def __init__(self, settings: KafkaSettings, producer: Any = None) -> None:
        self.settings = settings
        if producer is None:
            try:
                from confluent_kafka import Producer  # the `kafka` extra: only this sink needs it
            except ImportError:
                raise InferenceLogSettingsError(
                    "inference_log.sink: kafka needs confluent-kafka: pip install 'tierserve[kafka]'"
                ) from None
            producer = Producer({**settings.producer, "bootstrap.servers": settings.bootstrap_servers})
        self.producer = producer
        self.lost = 0

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self.lost += 1

    def _produce(self, topic: str, record: LogRecord) -> None:
        for attempt in range(2):
            try:
                self.producer.produce(
                    topic, key=record.request_id.encode(), value=encode_record(record), on_delivery=self._delivered
                )
                return
            except BufferError:  # the client's own queue is full: serve delivery reports once, then give up
                if attempt == 0:
                    self.producer.poll(0)
        self.lost += 1

    def write_inferences(self, records: Sequence[InferenceRecord]) -> None:
        for record in records:
            self._produce(self.settings.topic, record)

    def write_feedback(self, records: Sequence[FeedbackRecord]) -> None:
        for record in records:
            self._produce(self.settings.feedback_topic, record)

    def maintain(self) -> None:
        self.producer.poll(0)

    def close(self) -> None:
        self.lost += self.producer.flush(5.0)  # what is still undelivered after 5 s


def open_sink(settings: InferenceLogSettings, clock: Callable[[], float] = time.time) -> Sink:
    """The sink the settings name."""
    if settings.sink == "kafka":
        assert settings.kafka is not None, "validated: sink kafka has kafka settings"
        return KafkaSink(settings.kafka)
    if settings.directory is None:
        raise InferenceLogSettingsError("inference_log.directory: required with sink parquet")
    return ParquetSink(partition_dir(settings.directory, settings.replica), settings, clock)


# --------------------------------------------------------------------------------------------------------- the log


class InferenceLog:
    """A bounded queue of records and the thread that writes it to the sink every flush_interval_s.

    Counters: `dropped` (refused by a full queue, or offered after close), `written` (taken by the sink: in a renamed
    Parquet file, or produced to Kafka), `lost` (taken off the queue but not delivered: the sink failed). `on_error`
    is called on the writer thread with a message whenever the sink fails (the glue logs it)."""

    def __init__(
        self,
        settings: InferenceLogSettings,
        sink: Sink | None = None,
        on_error: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.settings = settings
        self.sink = sink if sink is not None else open_sink(settings)
        self.on_error = on_error
        self.dropped = 0
        self.written = 0
        self._failed = 0
        self._queue: list[LogRecord] = []
        self._lock = threading.Lock()  # held only to append or to swap the queue: never while writing
        self._writing = threading.Lock()  # one flush at a time
        self._stop = threading.Event()
        self._closed = False
        self._thread = NamedThread(self._run, "inference-log")
        self._thread.start()

    @property
    def lost(self) -> int:
        return self._failed + self.sink.lost

    def offer(self, records: Sequence[LogRecord]) -> int:
        """Queue `records` for the next flush; never blocks on the sink, never raises. Returns how many were
        dropped (the queue was full, or the log is closed)."""
        with self._lock:
            room = 0 if self._closed else max(self.settings.queue_capacity - len(self._queue), 0)
            taken = records if len(records) <= room else records[:room]
            self._queue.extend(taken)
            dropped = len(records) - len(taken)
            self.dropped += dropped
        return dropped

    def __len__(self) -> int:
        """Records queued, not yet written."""
        return len(self._queue)

    def flush(self) -> None:
        """Write what is queued now, then the sink's periodic work (the writer thread does this every interval).
        Sink failures are counted in `lost` and reported to `on_error`, never raised."""
        with self._writing:
            with self._lock:
                batch, self._queue = self._queue, []
            inferences = [r for r in batch if isinstance(r, InferenceRecord)]
            feedback = [r for r in batch if isinstance(r, FeedbackRecord)]
            for write, records in ((self.sink.write_inferences, inferences), (self.sink.write_feedback, feedback)):
                if not records:
                    continue
                try:
                    write(records)
                    self.written += len(records)
                except Exception as error:
                    self._failed += len(records)
                    self.on_error(f"inference log: {len(records)} records not written: {error!r}")
            try:
                self.sink.maintain()
            except Exception as error:
                self.on_error(f"inference log: {error}")

    def _run(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the writer thread, write what is queued, and close the sink (a parquet sink rolls up its parts)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._thread.join()
        self.flush()
        try:
            self.sink.close()
        except Exception as error:
            self.on_error(f"inference log: closing the sink: {error}")
