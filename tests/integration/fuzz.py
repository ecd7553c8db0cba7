"""Seeded malformed requests, as a careless or hostile client sends them, over HTTP (JSON) and gRPC (protobuf).

Each case says what it is and whether a well-behaved server must answer it (valid) or refuse it. Left out on
purpose, because they are Triton 2.51's own faults and tested on their own (README, Errors; test_supervision):
element counts that overflow 64 bits, negative dimensions, shapes of more than a few million elements with a
small payload (they crash the HTTP front end or abort a Python stub before any model code runs), and JSON
nested deeper than 64 levels.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DATATYPES = {
    "FP32": ("f", 4),
    "FP64": ("d", 8),
    "FP16": ("e", 2),
    "INT32": ("i", 4),
    "INT64": ("q", 8),
    "INT8": ("b", 1),
    "UINT8": ("B", 1),
    "BOOL": ("?", 1),
}
SPECIAL_VALUES = (float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 3.4028235e38, -0.0, 0.0, 16.0, 17.0, -1.0)
RUNNERS = ("digits_heavy", "digits_light", "digits_missing", "digits_rules")
PUBLIC_MODELS = ("digits", "digits_static_light", *RUNNERS)
# the lanes must refuse cleanly too. The router (digits' one step, the same contract) and preprocess are left
# out: Triton 2.51 never answers a [0, 0, 0] batch sent straight to a Python model whose images may be any size.
TARGETS = (*PUBLIC_MODELS, "digits_light_critical", "digits_heavy_critical")
NAMES = ("PIXELS", "pixels", "IMAGE", "", "P" * 300, "PIXELS\u0000", "🙂")
PARAMETER_VALUES: tuple[Any, ...] = (
    "²",
    "٣",
    "-1",
    "0",
    "1e3",
    "99999999999999999999",
    "",
    " ",
    "critical ",
    "x" * 5000,
    True,
    False,
    -5,
    0,
    2**62,
    1.5,
    "standard",
    "best_effort",
    "critical",
    "25",
    "\u0000",
    "🙂",
)
PARAMETER_NAMES = ("tier", "deadline_ms", "user_id", "model", "priority", "sequence_id", "timeout", "", "k" * 400)


@dataclass(frozen=True)
class Case:
    """One request to send: the model, its inputs (name, datatype, shape, values), parameters, and a label."""

    model: str
    inputs: tuple[tuple[str, str, tuple[int, ...], np.ndarray], ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    kind: str = ""
    version: str = ""
    raw_body: bytes | None = None  # HTTP only: sent as is instead of a JSON body built from `inputs`


def _values(rng: random.Random, count: int) -> np.ndarray:
    values = np.array([rng.uniform(0, 16) for _ in range(count)], np.float64)
    for _ in range(rng.randint(0, 3) if count else 0):
        values[rng.randrange(count)] = rng.choice(SPECIAL_VALUES)
    return values


def _shape(rng: random.Random, model: str) -> tuple[int, ...]:
    rank = rng.choice((0, 1, 2, 3, 3, 3, 4, 5))
    dims = (0, 1, 2, 3, 4, 7, 8, 9, 16, 63, 64, 65, 100, 1000)
    shape = tuple(rng.choice(dims) for _ in range(rank))
    while shape and int(np.prod(shape, dtype=np.int64)) > 2_000_000:  # see the module docstring
        shape = shape[:-1]
    return shape


def _parameters(rng: random.Random) -> dict[str, Any]:
    return {rng.choice(PARAMETER_NAMES): rng.choice(PARAMETER_VALUES) for _ in range(rng.randint(1, 3))}


def cases(seed: int, count: int) -> Iterator[Case]:
    """`count` cases, the same ones for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        model = rng.choice(TARGETS)
        kind = rng.choice(
            (
                "shape",
                "shape",
                "datatype",
                "values",
                "parameters",
                "name",
                "inputs",
                "version",
                "payload",
                "body",
                "odd_dims",
            )
        )
        shape: tuple[int, ...] = (1, 8, 8)
        datatype, name, parameters, version, raw_body = "FP32", "PIXELS", {}, "", None
        values_count = 64
        if kind == "shape":
            shape = _shape(rng, model)
            values_count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        elif kind == "datatype":
            datatype = rng.choice([d for d in DATATYPES if d != "FP32"] + ["BYTES", "FP8", "", "fp32"])
        elif kind == "values":
            shape = (
                (rng.randint(1, 4), 8, 8)
                if model != "digits"
                else (rng.randint(1, 4), *[rng.choice((4, 8, 16, 64))] * 2)
            )
            values_count = int(np.prod(shape))
        elif kind == "parameters":
            parameters = _parameters(rng)
        elif kind == "name":
            name = rng.choice(NAMES[1:])
        elif kind == "version":
            version = rng.choice(("0", "3", "-1", "1", "2", "99999999999999999999", "x", "1.0"))
        elif kind == "odd_dims":  # a batch past every limit; negative dims where the model's dims are fixed
            shape = rng.choice(
                ((2**62, 8, 8), (2**31, 8, 8), (2**32 + 1, 8, 8))
                + (((-1, 8, 8), (1, -8, -8), (-2, 8, 8)) if model in RUNNERS else ())
            )
        elif kind == "payload":  # the data does not match the shape
            values_count = rng.choice((0, 1, 63, 65, 128, 4096))
        inputs = [(name, datatype, shape, _values(rng, values_count))]
        if kind == "inputs":
            inputs = rng.choice(([], inputs * 2, [*inputs, ("EXTRA", "FP32", (1, 8, 8), _values(rng, 64))]))
        if kind == "body":
            raw_body = _broken_body(rng)
        yield Case(model, tuple(inputs), parameters, kind, version, raw_body)


def _broken_body(rng: random.Random) -> bytes:
    good = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 8, 8], "data": [1.0] * 64}]}
    choices = [
        b"",
        b"{",
        b"[]",
        b"null",
        b"\xff\xfe",
        b'{"inputs": 5}',
        b'{"inputs": [{}]}',
        b'{"inputs": [{"name": "PIXELS"}]}',
        *(
            json.dumps({"inputs": [{**good["inputs"][0], **change}]}).encode()
            for change in ({"shape": "1,8,8"}, {"data": ["a"] * 64}, {"data": [[1.0] * 8] * 8})
        ),
        json.dumps({**good, "parameters": {"tier": {"nested": 1}}}).encode(),
        json.dumps({**good, "parameters": {"tier": [1, 2]}}).encode(),
        json.dumps({**good, "outputs": [{"name": "NOPE"}]}).encode(),
        json.dumps({**good, "id": "x" * 10_000}).encode(),
        ("[" * 60 + "]" * 60).encode(),
        json.dumps(good).encode()[: rng.randint(1, 60)],
    ]
    return rng.choice(choices)


def json_body(case: Case) -> bytes:
    if case.raw_body is not None:
        return case.raw_body
    inputs = [
        {
            "name": name,
            "datatype": datatype,
            "shape": list(shape),
            "data": [None if np.isnan(v) else v for v in values.tolist()]
            if datatype == "FP32"
            else np.clip(np.nan_to_num(values), 0, 100).astype(int).tolist()
            if datatype not in ("BYTES", "BOOL")
            else [bool(v) for v in values]
            if datatype == "BOOL"
            else [str(v) for v in values.tolist()],
        }
        for name, datatype, shape, values in case.inputs
    ]
    body: dict[str, Any] = {"inputs": inputs}
    if case.parameters:
        body["parameters"] = case.parameters
    return json.dumps(body, allow_nan=True).encode()


def raw_contents(datatype: str, values: np.ndarray) -> bytes:
    """The gRPC raw_input_contents of `values` in `datatype` (unknown types: as FP32 bytes)."""
    code, _ = DATATYPES.get(datatype, ("f", 4))
    if code in "fde":
        with np.errstate(over="ignore"):  # FP16 overflows to inf, as a client's would
            return values.astype({"f": "<f4", "d": "<f8", "e": "<f2"}[code]).tobytes()
    if code == "?":
        return bytes(bool(v) for v in values)
    return struct.pack(f"<{len(values)}{code}", *np.clip(np.nan_to_num(values), 0, 100).astype(int).tolist())
