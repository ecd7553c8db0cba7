"""Threads named for the operating system too: `top -H`, `ps -L`, py-spy and /proc/PID/task/TID/comm show a thread's
OS name, never Python's. A router stub runs Triton's message loop on its main thread, each execute on an event loop
thread and a few background threads; named, their CPU can be told apart (perf/bench_stub_cpu.py does)."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from functools import cache

PR_SET_NAME = 15  # prctl(2): the calling thread's name
OS_NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating NUL
ROUTER_EXECUTE = "router-execute"  # the thread that runs the router's executes (the stub's event loop)


@cache
def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # the C library this process already runs on
    except (OSError, AttributeError):  # no C library with prctl (not Linux): threads keep their inherited name
        return None


def name_os_thread(name: str) -> bool:
    """Give the calling thread `name` as the OS shows it (its first 15 bytes); False where that is not possible."""
    prctl = _prctl()
    if prctl is None:
        return False
    return prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:OS_NAME_BYTES]), 0, 0, 0) == 0


class NamedThread(threading.Thread):
    """A daemon thread whose OS name is its Python name (at most 15 bytes, so that both read the same)."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        if len(name.encode()) > OS_NAME_BYTES:
            raise ValueError(f"a thread name has at most {OS_NAME_BYTES} bytes for the OS, got {name!r}")
        super().__init__(target=target, name=name, daemon=True)

    def run(self) -> None:
        name_os_thread(self.name)
        super().run()
