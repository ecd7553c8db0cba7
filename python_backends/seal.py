"""What only this server's own steps know: a secret per tritonserver, and the seals made with it.

`preprocess` seals each row it hands to the router (HMAC-SHA256 over its STAMP, SOURCE and IMAGE), so the
router accepts only rows that came through `preprocess`: a client calling `router` directly cannot forge
a stamp, the facts about an image, or the image itself. The router's calls to the critical lanes carry a
lane token derived from the same secret, so the lanes serve only rows the router sent there. The secret
is created by the first stub that needs it, in the server's scratch directory (mode 600 from creation),
and is swept with that directory when the server stops.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from pathlib import Path

import numpy as np

from tierserve.private_file import write_private

SECRET_FILE = "secret"
LANE_TOKEN_PARAMETER = "tierserve_lane_token"  # the BLS request parameter a lane checks


def server_secret(scratch: Path) -> bytes:
    """This server's secret, created at first use (whole, owner-only) and read by every later stub."""
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = scratch / SECRET_FILE
    with contextlib.suppress(FileExistsError):  # another stub made it first: theirs is the one
        write_private(path, secrets.token_hex(32), overwrite=False)
    return path.read_bytes()


def seal_rows(secret: bytes, stamp: float, source: np.ndarray, image: np.ndarray) -> list[bytes]:
    """One seal per row: HMAC-SHA256 of the stamp and the row's SOURCE and IMAGE bytes, hex."""
    head = np.float64(stamp).tobytes()
    return [
        hmac.new(secret, head + s.tobytes() + i.tobytes(), hashlib.sha256).hexdigest().encode()
        for s, i in zip(np.ascontiguousarray(source, np.float32), np.ascontiguousarray(image, np.float32), strict=True)
    ]


def rows_sealed(secret: bytes, stamps: np.ndarray, source: np.ndarray, image: np.ndarray, seals: np.ndarray) -> bool:
    """Whether every row's seal is the one `preprocess` would have made (constant-time comparisons)."""
    if not (len(stamps) == len(source) == len(image) == len(seals)):
        return False
    expected = [
        seal_rows(secret, float(stamp), s[None], i[None])[0]
        for stamp, s, i in zip(np.asarray(stamps, np.float64).ravel(), source, image, strict=True)
    ]
    given = [
        bytes(seal) if isinstance(seal, bytes | bytearray) else str(seal).encode()
        for seal in np.asarray(seals, dtype=object).ravel()
    ]
    return len(given) == len(expected) and all(hmac.compare_digest(e, g) for e, g in zip(expected, given, strict=True))


def lane_token(secret: bytes) -> str:
    """The token the router's calls to a critical lane carry."""
    return hmac.new(secret, b"critical lane", hashlib.sha256).hexdigest()
