"""One operator change at a time. promote, rollback, retire, load, unload, experiment apply and stop (and the canary's
steps, made of those) each take a lease in the state store before they read what they change, and give it back when
done. Every operator's tools, and every replica that shares the store, see the same lease: a change asked for while
another is under way is refused, naming the change, who runs it and since when, and changes nothing.

The lease lasts LEASE_S and is renewed every RENEW_S while its change runs, so a tool killed mid-change (kill -9, a
lost laptop) blocks the next change for LEASE_S at most. A renewal and the giving back change the lease only while
it is still their own, in one step of the store (set_if_equal, delete_if_equal), so a lease that lapsed and was taken
by another change is neither overwritten nor removed. A store that stalls for longer than LEASE_S - RENEW_S can still
let the lease lapse under a running change (the renewal then stops, and the change goes on unguarded). Pure Python,
no Triton.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, ValidationError

from tierserve.state_store import StateStore, StateStoreError

LEASE_KEY = "operator_change"  # in the state store: the change under way (JSON), with a time to live
LEASE_S = 30.0
RENEW_S = 5.0
WAIT_POLL_S = 0.25  # how often a change that waits for the lease asks for it again


def operator_name() -> str:
    """The login name of whoever runs this process (its uid where the uid has no name, e.g. in a container)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class ChangeUnderWay(BaseModel):
    """The change that holds the lease: what it is, who runs it where, since when (Unix time), and the token that
    tells its own lease from a later one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    change: str
    operator: str
    host: str
    since: float
    token: str

    def __str__(self) -> str:
        since = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.change} by {self.operator} on {self.host}, since {since}"


class ChangeRefused(RuntimeError):
    """Another change holds the lease; `under_way` is it (None when it ended as it was read)."""

    def __init__(self, change: str, under_way: ChangeUnderWay | None) -> None:
        what = f"another change is under way: {under_way}" if under_way else "another change ended just now"
        super().__init__(f"{what}; try `{change}` again once it is done (one change at a time)")
        self.under_way = under_way


def _under_way(stored: bytes | None) -> ChangeUnderWay | None:
    if stored is None:
        return None
    try:
        return ChangeUnderWay.model_validate_json(stored)
    except ValidationError:  # not one of ours: shown as what it is, still a lease
        return ChangeUnderWay(change=f"an unreadable lease {stored[:60]!r}", operator="?", host="?", since=0, token="")


@contextlib.contextmanager
def one_change_at_a_time(
    store: StateStore,
    change: str,
    *,
    wait_s: float = 0.0,
    lease_s: float = LEASE_S,
    renew_s: float = RENEW_S,
    clock: Callable[[], float] = time.time,
) -> Iterator[ChangeUnderWay]:
    """Hold the lease for `change` (e.g. 'retire digits_heavy:1') while the block runs; ChangeRefused when another
    change holds it for `wait_s` more (0: refused at once). StateStoreError when the store cannot be asked."""
    who, host, token = operator_name(), socket.gethostname(), secrets.token_hex(8)
    give_up_at = time.monotonic() + wait_s
    while True:  # `since` is when it took the lease, not when it began to wait
        mine = ChangeUnderWay(change=change, operator=who, host=host, since=clock(), token=token)
        lease = mine.model_dump_json().encode()
        if store.set(LEASE_KEY, lease, ttl_s=lease_s, only_if_absent=True):
            break
        if time.monotonic() >= give_up_at:
            raise ChangeRefused(change, _under_way(store.get(LEASE_KEY)))
        time.sleep(min(WAIT_POLL_S, max(give_up_at - time.monotonic(), 0.0)))
    done = threading.Event()

    def renew() -> None:
        while not done.wait(renew_s):
            try:
                if not store.set_if_equal(LEASE_KEY, lease, lease, ttl_s=lease_s):
                    return  # lapsed, and perhaps taken since: nothing of ours to renew
            except StateStoreError:
                continue  # asked again at the next renewal; the lease lasts lease_s meanwhile

    renewer = threading.Thread(target=renew, name="operator-lease", daemon=True)
    renewer.start()
    try:
        yield mine
    finally:
        done.set()
        renewer.join()
        with contextlib.suppress(StateStoreError):  # not given back: it lapses within lease_s
            store.delete_if_equal(LEASE_KEY, lease)
