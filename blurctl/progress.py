"""Progress bars for long work, drawn with rich on the main process only."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def is_main_process() -> bool:
    """True on rank 0 (or outside a distributed launch).

    Read from the launcher's RANK rather than accelerate's ``PartialState``, which would set
    up the process group here, before the recipe's accelerator settings (CPU or GPU
    backend, mixed precision) are known."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def progress_bar(desc: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``: moves the bar one step and shows ``fields`` beside it."""
    if not is_main_process() or os.environ.get("BLURCTL_NO_PROGRESS"):
        yield lambda **_: None
        return
    if not sys.stderr.isatty():  # logs and pipes: a plain line every tenth of the way
        yield _plain_lines(desc, total, completed)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(desc, total=total, completed=completed, info="")

        def advance(**fields: float) -> None:
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            bar.update(task, advance=1, info=info)

        yield advance


def _plain_lines(desc: str, total: int, completed: int) -> Callable[..., None]:
    state = {"done": completed, "start": time.monotonic(), "next": completed + max(1, total // 10)}

    def advance(**fields: float) -> None:
        state["done"] += 1
        if state["done"] >= state["next"] or state["done"] == total:
            state["next"] += max(1, total // 10)
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            elapsed = time.monotonic() - state["start"]
            print(f"{desc}: {state['done']}/{total} ({elapsed:.0f}s) {info}".rstrip(),
                  file=sys.stderr, flush=True)

    return advance


def quiet_libraries() -> None:
    """Our own progress bars and messages replace the libraries' per-file chatter."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
