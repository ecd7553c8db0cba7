"""`tierserve serve`: build missing models, run tritonserver in the foreground under supervision (a crashed
server is restarted, a model whose stub died is reloaded), stop cleanly on Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from tierserve.operator_unloads import UnloadsError
from tierserve.private_file import write_private
from tierserve.repository_api import READY
from tierserve.state_store import STATE_ENV, StateStoreError, open_store, shared_secret
from tierserve.tier_keys import TIER_KEY_HEADER, TIER_KEYS_ENV, TierKeyError, TierKeys, new_key
from tierserve.tools.build_models import build_all
from tierserve.tools.lifecycle import Failed, Lifecycle, Refused
from tierserve.tools.model_control import ModelControl
from tierserve.tools.paths import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE,
    RUNTIME_DIR,
    STATE_FILE,
    TIER_KEY_FILE,
    TIER_KEYS_FILE,
)
from tierserve.tools.server import (
    ADMIN_APIS,
    ADMIN_HEADER,
    GRPC_ADMIN_HEADER,
    LOCAL_TIER_KEY_NAME,
    Ports,
    ServerError,
    TritonServer,
    cmdline_hidden_from_other_users,
)
from tierserve.tools.supervisor import Event, Supervisor

# Both are handled whatever their disposition was at start, as tritonserver does: a shell runs a background job
# (`tierserve serve &` in a script, a CI step) with SIGINT ignored, and Python then keeps it ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After a start, how long each try to unload again what was retired or unloaded waits for the operator lease before
# it looks whether to stop (serve stops, or a restart supersedes it) and tries again.
RETRY_WAIT_S = 2.0


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # one shutdown path for Ctrl-C and for `kill`, systemd or Kubernetes


def _admin_key() -> str:
    """$TIERSERVE_ADMIN_KEY, or a fresh key written to .tierserve/admin_key (mode 600 from creation) for
    `tierserve fault` and other admin calls."""
    if key := os.environ.get(ADMIN_KEY_ENV):
        return key
    RUNTIME_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(ADMIN_KEY_FILE, key := secrets.token_hex(16))
    return key


def _tier_keys(explicit: Path | None) -> Path:
    """The tier keys file the routers read: --tier-keys, $TIERSERVE_TIER_KEYS, or .tierserve/tier_keys.json,
    which the first start creates with one key for `critical` (its plain text in .tierserve/tier_key, both
    mode 600). TierKeyError if the file is missing (when named) or invalid: better now than in every router."""
    if explicit is None and (named := os.environ.get(TIER_KEYS_ENV)):
        explicit = Path(named)
    if explicit is None and not TIER_KEYS_FILE.exists():
        RUNTIME_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        local = TierKeys().add(LOCAL_TIER_KEY_NAME, key := new_key(), "critical")
        with contextlib.suppress(FileExistsError):  # another launcher made it first: keep its key
            write_private(TIER_KEYS_FILE, local.to_json(), overwrite=False)
            write_private(TIER_KEY_FILE, key + "\n")
    path = explicit or TIER_KEYS_FILE
    TierKeys.load(path)
    return path


def _state(explicit: str | None) -> str:
    """Where the state store is (--state, $TIERSERVE_STATE, or .tierserve/state.db), checked now: a Redis that does
    not answer is better said once here than by every router that fails to load."""
    location = explicit or os.environ.get(STATE_ENV) or str(STATE_FILE.resolve())
    store = open_store(location)
    try:
        shared_secret(store)  # made here, before any router or feedback instance races for it
    finally:
        store.close()
    return location


def _bound(server: TritonServer, port: int) -> str:
    addresses = server.listening().get(port, [])
    every = " (every interface)" if any(a in ("0.0.0.0", "::") for a in addresses) else ""
    return f"bound to {', '.join(f'{a}:{port}' for a in addresses) or 'nothing'}{every}"


def _banner(server: TritonServer) -> str:
    models = ", ".join(f"{m['name']}:{m.get('version', '?')}" for m in server.models() if m.get("state") == READY)
    tier_key = f"; local key in {TIER_KEY_FILE}" if server.tier_keys == TIER_KEYS_FILE else ""
    lines = [
        "tierserve: tritonserver is ready",
        f"  HTTP     http://{server.http_url}    {_bound(server, server.ports.http)}    "
        f"(try: curl {server.http_url}/v2/health/ready)",
        f"  gRPC     {server.grpc_url}    {_bound(server, server.ports.grpc)}",
        f"  metrics  {server.metrics_url}    {_bound(server, server.ports.metrics)}",
        f"  models   {models}",
        f"  admin    {', '.join(ADMIN_APIS)} need the admin key (${ADMIN_KEY_ENV} or {ADMIN_KEY_FILE}): "
        f"HTTP header {ADMIN_HEADER}, gRPC metadata {GRPC_ADMIN_HEADER}",
        f"  tiers    tiers above standard need a tier key: HTTP header or gRPC metadata {TIER_KEY_HEADER} "
        f"(keys file {server.tier_keys}{tier_key})",
    ]
    if not cmdline_hidden_from_other_users():
        lines.append(
            "  warning  Triton 2.51 takes the admin key only on its command line: other local users can read "
            "it in /proc/<pid>/cmdline (mount /proc with hidepid=2 to prevent that)"
        )
    return "\n".join([*lines, "Press Ctrl-C to stop."])


def _say(text: str) -> None:
    print(f"tierserve: {text}", file=sys.stderr, flush=True)


def _print_event(event: Event) -> None:
    _say(str(event))


@contextlib.contextmanager
def _lifecycle(server: TritonServer) -> Iterator[Lifecycle]:
    """A Lifecycle of `server`, its model repository and state store, closed after the block."""
    control, store = ModelControl(server.http_url, server.admin_key), open_store(server.state)
    try:
        yield Lifecycle(control, store, server.repository)
    finally:
        control.close()
        store.close()


def _unload_again(lifecycle: Lifecycle, wait_s: float, say: Callable[[str], None]) -> Refused | None:
    """Unload again what operators retired or unloaded (tierserve.operator_unloads), waiting up to `wait_s` for the
    operator lease, and say what was done; the refusal when another change held the lease all that time (nothing
    was done)."""
    try:
        reapplied = lifecycle.reapply_unloads(wait_s)
    except (UnloadsError, Failed, StateStoreError) as error:  # the server serves; what it serves besides is named
        say(f"did not unload again what was retired or unloaded before: {error}")
        return None
    if reapplied.unloaded:
        say(f"unloaded {', '.join(reapplied.unloaded)} again, as retired or unloaded before")
    for target, refused in reapplied.kept:
        say(f"kept {target} loaded, though it was retired or unloaded before: {refused}")
    return reapplied.busy


class OperatorChanges:
    """After every start of a server (the supervisor's `on_ready`), puts back what operators changed that its config
    files do not say: loads what the promoted routing needs (a promoted version's lane), then unloads again what
    operators retired or unloaded. Unloading again takes the operator lease. While another change holds it (a
    canary holds it for minutes), a thread of this object's own asks for it again, waiting RETRY_WAIT_S each time,
    until that change ends: supervision goes on meanwhile, and a retired version is unloaded once that change ends,
    not at the next restart. A later start supersedes the wait of an earlier one; `close` ends it. `lifecycle_of`
    gives a Lifecycle of a server for the length of a block."""

    def __init__(
        self,
        say: Callable[[str], None] = _say,
        lifecycle_of: Callable[[TritonServer], contextlib.AbstractContextManager[Lifecycle]] = _lifecycle,
    ) -> None:
        self._say = say
        self._lifecycle_of = lifecycle_of
        self._lock = threading.Lock()  # one of: a start's restore, or close
        self._closed = False
        self._waiter: threading.Thread | None = None
        self._stop_waiting = threading.Event()

    def after_start(self, server: TritonServer) -> None:
        with self._lock:
            if self._closed:
                return
            self._end_wait()
            with self._lifecycle_of(server) as lifecycle:
                if loaded := lifecycle.restore():
                    self._say(f"loaded {', '.join(loaded)} for the promoted routing")
                if (busy := _unload_again(lifecycle, 0.0, self._say)) is None:
                    return
            self._say(
                "will unload again what was retired or unloaded before once another change ends: "
                f"{busy.under_way or 'one that ended just now'} holds the operator lease"
            )
            self._stop_waiting = threading.Event()
            self._waiter = threading.Thread(
                target=self._wait_for_the_lease, args=(server, self._stop_waiting), name="unload-again", daemon=True
            )
            self._waiter.start()

    def waiting(self) -> bool:
        """Whether the thread still waits for the operator lease."""
        return self._waiter is not None and self._waiter.is_alive()

    def close(self) -> None:
        """End a wait for the lease (within RETRY_WAIT_S, or once the unloads under way are done); no later start
        restores anything."""
        with self._lock:
            self._closed = True
            self._end_wait()

    def _end_wait(self) -> None:
        self._stop_waiting.set()
        if self._waiter is not None:
            self._waiter.join()
            self._waiter = None

    def _wait_for_the_lease(self, server: TritonServer, stop: threading.Event) -> None:
        try:  # one connection to the server and the store for the whole wait, not one per try
            with self._lifecycle_of(server) as lifecycle:
                while not stop.is_set() and _unload_again(lifecycle, RETRY_WAIT_S, self._say) is not None:
                    pass  # another change still holds the lease
        except Exception as error:  # the thread ends saying why; the next start asks again
            self._say(f"stopped waiting to unload again what was retired or unloaded before: {error}")


def serve(args: argparse.Namespace) -> int:
    """Run tritonserver until interrupted (exit code 0) or until it crashes too often to restart (1)."""
    if not args.no_build:
        build_all(args.model_repository)
    try:
        tier_keys = _tier_keys(args.tier_keys)
        state = _state(args.state)
    except (TierKeyError, StateStoreError) as error:
        print(f"tierserve: {error}", file=sys.stderr)
        return 1
    server = TritonServer(
        args.model_repository,
        Ports(args.http_port, args.grpc_port, args.metrics_port),
        RUNTIME_DIR,
        tritonserver=args.tritonserver,
        log_verbose=args.log_verbose,
        admin_key=_admin_key(),
        address=args.address,
        tier_keys=tier_keys,
        state=state,
        inference_log=args.log_dir.resolve(),
        replica=args.replica,
    )
    operator_changes = OperatorChanges()
    supervisor = Supervisor(server, report=_print_event, on_ready=lambda: operator_changes.after_start(server))
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _stop_on_signal)
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
        operator_changes.close()
        supervisor.stop()
