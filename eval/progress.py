"""A rich progress bar, silent when it would not go to a terminal (pipes, logs, tests).

The bar is drawn on stderr, unless stdout and stderr are the same terminal: then it is drawn on the
console that the output is printed through (output_console()), so that rich prints each output line
above the bar instead of letting the bar's redraws overwrite it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

ProgressCallback = Callable[..., None]  # (completed, total, note=None): note names the work just finished


def output_console() -> Console:
    """The console for a command's output: stdout, no markup or highlighting of the text printed."""
    return Console(highlight=False, markup=False, emoji=False, soft_wrap=True)


def same_terminal(a: Any, b: Any) -> bool:
    """Whether two streams are the same terminal (both TTYs on one device)."""
    try:
        return a.isatty() and b.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):
        return False


def bar_console(output: Console | None = None) -> Console:
    """Where the bar goes: `output` when stdout and stderr share a terminal, else stderr."""
    if output is not None and same_terminal(sys.stdout, sys.stderr):
        return output
    return Console(stderr=True)


@contextmanager
def progress_bar(
    description: str, total: int | None = None, output: Console | None = None
) -> Iterator[ProgressCallback]:
    """Yields update(completed, total, note=None) for a bar (total may be unknown until the first update).
    Output printed meanwhile must go through `output` (when given) to appear above the bar. Off a terminal
    (a pipe, a log file) there is no bar: each update with a note prints a line on stderr instead, so a
    long run is not silent."""
    console = bar_console(output)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(
        *columns, console=console, disable=not console.is_terminal, redirect_stdout=False, transient=True
    ) as progress:
        task = progress.add_task(description, total=total)
        start = time.perf_counter()

        def update(completed: int, total: int, note: str | None = None) -> None:
            progress.update(task, completed=completed, total=total)
            if note is not None and not console.is_terminal:
                elapsed = time.perf_counter() - start
                print(f"{description}: {note} ({completed}/{total}, {elapsed:.0f} s)", file=sys.stderr, flush=True)

        yield update


PROGRESS_EVERY_S = 5.0  # off a terminal, a progress line at most this often (a fast job prints none)


def rows_done_note(noun: str) -> Callable[[list], str | None]:
    """note(docs): the progress line's text when one is due (None otherwise): rows done, new tokens per second
    (each doc has token_ids)."""
    start = last = time.perf_counter()

    def note(docs: list) -> str | None:
        nonlocal last
        now = time.perf_counter()
        if now - last < PROGRESS_EVERY_S:
            return None
        last = now
        tokens = sum(len(d.token_ids) for d in docs)
        return f"{len(docs)} {noun}s done, {tokens / (now - start):.1f} new tokens/s"

    return note
