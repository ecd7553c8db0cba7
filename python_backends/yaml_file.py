"""An operator's YAML file (policy.yaml, inference_log.yaml, an experiments file), read so that no file can hang or
crash the reader: at most MAX_BYTES of UTF-8 text, nested no deeper than the parser can go, and expanding to at most
MAX_VALUES values (YAML aliases can make a small file expand without bound: a "billion laughs" document). Every
problem is a YamlFileError that names it. Pure Python, no Triton."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_VALUES = 100_000


class YamlFileError(ValueError):
    """The file could not be read as YAML; the message says why (without the path: callers add it)."""


def load_yaml(path: Path, max_bytes: int = MAX_BYTES, max_values: int = MAX_VALUES) -> Any:
    """The YAML document in `path` (None for an empty file); YamlFileError when it cannot be read, is larger than
    `max_bytes`, is not UTF-8, is not YAML, is nested too deeply or expands to more than `max_values` values."""
    try:
        with path.open("rb") as file:  # a bounded read: /dev/zero or a huge file must not fill the memory
            raw = file.read(max_bytes + 1)
    except OSError as error:
        raise YamlFileError(str(error)) from None
    if len(raw) > max_bytes:
        raise YamlFileError(f"larger than {max_bytes:,} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError as error:
        raise YamlFileError(f"not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start:,})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise YamlFileError(str(error)) from None
    except RecursionError:
        raise YamlFileError("nested too deeply") from None
    if _more_values_than(data, max_values):
        raise YamlFileError(f"expands to more than {max_values:,} values (aliases of aliases, or an alias of itself)")
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
