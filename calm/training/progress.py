"""Training's progress display: a rich progress bar and the small interface the steps report through.
Every training module may import it; it imports nothing of calm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def progress_bar(enabled: bool) -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


class ProgressUi:
    """rich Progress with a default 'info' field; a finished task's bar stays on screen."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.console = progress.console

    def add_task(self, description: str, total: int, info: str = "") -> TaskID:
        return self.p.add_task(description, total=total, info=info)

    def advance(self, task: TaskID, n: int = 1) -> None:
        self.p.advance(task, n)

    def update(self, task: TaskID, **fields: Any) -> None:
        self.p.update(task, **fields)

    def remove_task(self, task: TaskID) -> None:
        self.p.update(task, visible=True)
