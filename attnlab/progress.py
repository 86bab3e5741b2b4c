"""The progress bar of work done item by item: a sweep's points (`attnlab run`), a folder's
results files (`attnlab figures`)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def item_bar(enabled: bool) -> Progress:
    """A rich Progress showing what runs, a bar, items done of all, time taken and left, and the
    item at hand (each task's `item` field); it shows nothing when not `enabled`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[item]}"),
        disable=not enabled,
        transient=False,
    )
