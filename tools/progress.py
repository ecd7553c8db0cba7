"""Progress bars for the commands that take more than a few seconds (build, demo, replay): on stderr and only when
stderr is a terminal, so scripts and tests read the same clean output with or without them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

ProgressCallback = Callable[[int, int], None]  # (done, in all): what long work reports as it goes


def no_progress(done: int, total: int) -> None:
    """A ProgressCallback that shows nothing."""


@contextlib.contextmanager
def progress_bar(description: str, console: Console | None = None) -> Iterator[ProgressCallback]:
    """A bar on `console` (default: stderr) while the block runs, driven by the callback it yields; gone when the
    block ends. No bar when the console is not a terminal: the callback then does nothing."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield no_progress
        return
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
