"""Files only their owner may read (keys, key hashes): mode 600 from the first byte, replaced atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write `text` to `path` through a new file created with mode 600 (O_EXCL: never one that already exists)
    and renamed over `path`, so no reader ever sees a wider mode or half a file. The umask can only narrow 600.
    With `overwrite=False` the file is linked into place instead: FileExistsError if `path` exists already."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, PRIVATE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
