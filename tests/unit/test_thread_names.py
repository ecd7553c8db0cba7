"""Threads named for the OS: /proc shows the name a NamedThread or name_os_thread gave, and a name too long for the
kernel is refused up front instead of being cut without a word."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tierserve.thread_names import NamedThread, name_os_thread


def _os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_named_thread_shows_its_name_to_the_os():
    seen: list[str] = []
    thread = NamedThread(lambda: seen.append(_os_name(threading.get_native_id())), "router-metrics")
    thread.start()
    thread.join()
    assert thread.daemon and seen == ["router-metrics"]


def test_the_calling_thread_can_name_itself_and_a_long_name_is_cut_to_the_kernels_15_bytes():
    seen: list[str] = []

    def name_and_read() -> None:
        assert name_os_thread("router-execute-loop")
        seen.append(_os_name(threading.get_native_id()))

    thread = threading.Thread(target=name_and_read)
    thread.start()
    thread.join()
    assert seen == ["router-execute-"]
    assert _os_name(threading.get_native_id()) != "router-execute-"  # only the calling thread was named


def test_a_named_thread_refuses_a_name_the_os_would_cut():
    with pytest.raises(ValueError, match="at most 15 bytes"):
        NamedThread(lambda: None, "router-experiment-counts")
