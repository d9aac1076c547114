"""Where a recipe's references point: ``embedded:<path>`` names a file of the embedded
benchmark (built or copied on first use); anything else, a local path or a Hub id, is
passed through unchanged. Every loader resolves its references here, and reads
datasets in the Hub's format (a Hub id or a local copy of a dataset repository)
through ``load_hub_dataset``."""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"


def resolve(ref: str) -> str:
    """Map ``embedded:<relative path>`` to a file in the benchmark; pass others through."""
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    from blurctl.data.bench.build import ensure_benchmark

    return str(ensure_benchmark() / ref[len(EMBEDDED_PREFIX):])


def is_dataset_repo(folder: Path) -> bool:
    """True for a local copy of a Hub dataset repository: a folder whose README.md starts
    with a YAML header that has a ``configs:`` block (the configurations and their splits)."""
    import yaml
    from huggingface_hub import metadata_load

    readme = folder / "README.md"
    try:
        return readme.is_file() and "configs" in (metadata_load(readme) or {})
    except (OSError, ValueError, yaml.YAMLError):  # no valid YAML header: documentation only
        return False


def load_hub_dataset(path: str, name: str | None, split: str | None = None):
    """``datasets.load_dataset(path, name, split=split)``: a Hub id or a local dataset
    repository, one configuration, one split (or all of them, a ``DatasetDict``).
    Errors are the library's own; callers turn them into one line."""
    import datasets

    from blurctl.progress import is_main_process

    if os.environ.get("BLURCTL_NO_PROGRESS") or not is_main_process():
        datasets.disable_progress_bars()
    return datasets.load_dataset(path, name, split=split)


def one_line(exc: Exception, limit: int = 300) -> str:
    """``ExceptionName: message`` on one line, at most ``limit`` characters of message."""
    return f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:limit]}".rstrip(": ")
