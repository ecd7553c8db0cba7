"""`tierserve serve`: build missing models, run tritonserver in the foreground under supervision (a crashed
server is restarted, a model whose stub died is reloaded), stop cleanly on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from types import FrameType

from tierserve.tools.build_models import build_all
from tierserve.tools.paths import ADMIN_KEY_ENV, ADMIN_KEY_FILE, RUNTIME_DIR
from tierserve.tools.server import ADMIN_HEADER, Ports, ServerError, TritonServer
from tierserve.tools.supervisor import Event, Supervisor


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # one shutdown path for Ctrl-C and for `kill`, systemd or Kubernetes


def _admin_key() -> str:
    """$TIERSERVE_ADMIN_KEY, or a fresh key written to .tierserve/admin_key (owner-only) for `tierserve fault`."""
    if key := os.environ.get(ADMIN_KEY_ENV):
        return key
    RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
    ADMIN_KEY_FILE.write_text(key := secrets.token_hex(16))
    ADMIN_KEY_FILE.chmod(0o600)
    return key


def _banner(server: TritonServer) -> str:
    models = ", ".join(f"{m['name']}:{m.get('version', '?')}" for m in server.models() if m.get("state") == "READY")
    return "\n".join([
        "tierserve: tritonserver is ready",
        f"  HTTP     http://{server.http_url}    (try: curl {server.http_url}/v2/health/ready)",
        f"  gRPC     {server.grpc_url}",
        f"  metrics  http://127.0.0.1:{server.ports.metrics}/metrics",
        f"  models   {models}",
        f"  admin    load/unload need header {ADMIN_HEADER} (key: ${ADMIN_KEY_ENV} or {ADMIN_KEY_FILE})",
        "Press Ctrl-C to stop.",
    ])


def _print_event(event: Event) -> None:
    print(f"tierserve: {event}", file=sys.stderr, flush=True)


def serve(args: argparse.Namespace) -> int:
    """Run tritonserver until interrupted (exit code 0) or until it crashes too often to restart (1)."""
    if not args.no_build:
        build_all(args.model_repository)
    server = TritonServer(args.model_repository, Ports(args.http_port, args.grpc_port, args.metrics_port),
                          RUNTIME_DIR, tritonserver=args.tritonserver, log_verbose=args.log_verbose,
                          admin_key=_admin_key())
    supervisor = Supervisor(server, report=_print_event)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        supervisor.start()
        print(_banner(server), flush=True)
        while (code := supervisor.wait(timeout_s=1.0)) is None:
            pass  # short waits: Ctrl-C and SIGTERM are handled between them
        return code
    except KeyboardInterrupt:
        print("tierserve: stopping tritonserver", flush=True)
        return 0
    except ServerError as error:
        print(f"tierserve: {error}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()
