"""What only this server's own stubs share: a scratch directory per tritonserver, and a secret in it.

The router's calls to the critical lanes carry a lane token derived from the secret, so the lanes serve
only rows the router sent there. The secret is created by the first stub that needs it, in the server's
scratch directory (mode 600 from creation), and is swept with that directory when the server stops.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import tempfile
from pathlib import Path

from tierserve.private_file import write_private

SECRET_FILE = "secret"
LANE_TOKEN_PARAMETER = "tierserve_lane_token"  # the BLS request parameter a lane checks


def server_scratch(server_pid: int) -> Path:
    """Scratch space shared by the Python stubs of one tritonserver (the secret, the routers' reload log);
    tools/server.py removes it when the server stops."""
    return Path(tempfile.gettempdir()) / f"tierserve-{server_pid}"


def server_secret(scratch: Path) -> bytes:
    """This server's secret, created at first use (whole, owner-only) and read by every later stub."""
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = scratch / SECRET_FILE
    with contextlib.suppress(FileExistsError):  # another stub made it first: theirs is the one
        write_private(path, secrets.token_hex(32), overwrite=False)
    return path.read_bytes()


def lane_token(secret: bytes) -> str:
    """The token the router's calls to a critical lane carry."""
    return hmac.new(secret, b"critical lane", hashlib.sha256).hexdigest()
