"""Files an operator writes (policy.yaml, inference_log.yaml, an experiments file, the tier keys file), read so that no
file can hang or crash the reader, a router stub included: at most MAX_BYTES of UTF-8 text, nested no deeper than the
parser can go, and for YAML expanding to at most MAX_VALUES values (aliases can make a small file expand without
bound: a "billion laughs" document). Every problem is an OperatorFileError that names it. Pure Python, no Triton."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_VALUES = 100_000


class OperatorFileError(ValueError):
    """The file could not be read; the message says why (without the path: callers add it)."""


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of `path`, read no further than `max_bytes` (/dev/zero or a huge file must not fill the memory);
    OperatorFileError when it is larger or not UTF-8, OSError when it cannot be opened or read."""
    with path.open("rb") as file:
        raw = file.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise OperatorFileError(f"larger than {max_bytes:,} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise OperatorFileError(f"not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start:,})") from None


def load_yaml(path: Path, max_bytes: int = MAX_BYTES, max_values: int = MAX_VALUES) -> Any:
    """The YAML document in `path` (None for an empty file); OperatorFileError when it cannot be read, is larger than
    `max_bytes`, is not UTF-8, is not YAML, is nested too deeply or expands to more than `max_values` values."""
    try:
        text = read_text(path, max_bytes)
    except OSError as error:
        raise OperatorFileError(str(error)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise OperatorFileError(str(error)) from None
    except RecursionError:
        raise OperatorFileError("nested too deeply") from None
    if _more_values_than(data, max_values):
        raise OperatorFileError(
            f"expands to more than {max_values:,} values (aliases of aliases, or an alias of itself)"
        )
    return data


def _more_values_than(data: Any, limit: int) -> bool:
    """Whether walking `data` as a tree (each alias walked again where it is used) meets more than `limit` values;
    stops as soon as it does, so a cycle or an exponential expansion costs `limit` steps at most."""
    pending, seen = [data], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list | tuple | set):
            pending.extend(value)
    return False
