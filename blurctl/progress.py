"""Progress bars for long work, drawn with rich on the main process only."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def progress_bar(desc: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``: moves the bar one step and shows ``fields`` beside it."""
    if not _is_main_process() or os.environ.get("BLURCTL_NO_PROGRESS"):
        yield lambda **_: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(desc, total=total, completed=completed, info="")

        def advance(**fields: float) -> None:
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            bar.update(task, advance=1, info=info)

        yield advance
