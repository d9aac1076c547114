"""MUSE's evaluation data (``eval.muse.corpus``), read the same way from any of its sources:

- a folder in MUSE's file layout (``verbmem/forget.json``, ``knowmem/*.json``,
  ``privleak/*.json``: what muse_bench's ``load_data.py`` writes, and the embedded
  benchmark's ``corpus/``);
- a Hub dataset id (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``);
- a local copy of such a dataset repository (a README.md whose YAML header has a
  ``configs:`` block, and the data files it names).

The Hub's configurations and splits are the layout's folders and files: configuration
``knowmem``, split ``forget_qa`` is ``knowmem/forget_qa.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from blurctl.data.sources import is_dataset_repo, load_hub_dataset, one_line, resolve
from blurctl.errors import InputError

FIELD = "eval.muse.corpus"
# What evaluate_muse reads: (configuration, split) -> the columns each row needs.
MUSE_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("verbmem", "forget"): ("prompt", "gt"),
    ("knowmem", "forget_qa"): ("question", "answer"),
    ("knowmem", "forget_qa_icl"): ("question", "answer"),
    ("knowmem", "retain_qa"): ("question", "answer"),
    ("knowmem", "retain_qa_icl"): ("question", "answer"),
    ("privleak", "forget"): ("text",),
    ("privleak", "holdout"): ("text",),
}


class _Unreadable(InputError):
    """The dataset as a whole cannot be read (no such Hub id, no network, ...)."""


class MuseCorpus:
    """MUSE's evaluation data from ``ref`` (a folder, a Hub id, a dataset repository folder,
    or ``embedded:corpus``); rows are read on first use and kept."""

    def __init__(self, ref: str):
        self.path = resolve(ref)
        local = Path(self.path)
        self.is_files = local.is_dir() and not is_dataset_repo(local)
        self._configs: dict[str, object] = {}
        self._rows: dict[tuple[str, str], list[dict]] = {}

    def items(self, config: str, split: str) -> list[dict]:
        """The rows of one split, each a dict with (at least) the columns MUSE_SPLITS names."""
        key = (config, split)
        if key not in self._rows:
            columns = MUSE_SPLITS.get(key, ())
            rows = (self._file_rows(config, split, columns) if self.is_files
                    else self._dataset_rows(config, split, columns))
            self._rows[key] = rows
        return self._rows[key]

    def texts(self, config: str, split: str) -> list[str]:
        """The ``text`` column of a split (privleak's texts)."""
        return [row["text"] for row in self.items(config, split)]

    def problems(self) -> list[str]:
        """Everything evaluate_muse would fail on, one line each, found by reading it all."""
        if self.is_files:
            missing = [f"{c}/{s}.json" for c, s in MUSE_SPLITS
                       if not (Path(self.path) / c / f"{s}.json").is_file()]
            if missing:
                return [f"{FIELD}: {self.path}: missing {', '.join(missing)} (MUSE's layout)"]
        problems: list[str] = []
        for config, split in MUSE_SPLITS:
            try:
                self.items(config, split)
            except _Unreadable as exc:
                return [str(exc)]
            except InputError as exc:
                if str(exc) not in problems:  # a missing configuration fails each of its splits
                    problems.append(str(exc))
        return problems

    def _file_rows(self, config: str, split: str, columns: tuple[str, ...]) -> list[dict]:
        path = Path(self.path) / config / f"{split}.json"
        if not path.is_file():
            raise InputError(f"{FIELD}: {path}: file not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{FIELD}: {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, list) or not data:
            raise InputError(f"{FIELD}: {path}: expected a non-empty JSON list")
        rows = [{"text": r} if isinstance(r, str) else r for r in data]  # privleak: plain strings
        for i, row in enumerate(rows):
            absent = [c for c in columns if not (isinstance(row, dict) and isinstance(row.get(c), str))]
            if absent:
                raise InputError(f"{FIELD}: {path}: record {i} has no string field {absent[0]!r}")
        return rows

    def _dataset_rows(self, config: str, split: str, columns: tuple[str, ...]) -> list[dict]:
        where = f"{FIELD}: {self.path}"
        if config not in self._configs:
            try:
                self._configs[config] = load_hub_dataset(self.path, config)
            except ValueError as exc:  # datasets' error for a configuration it does not have
                raise InputError(f"{where}: cannot load configuration {config!r} "
                                 f"({one_line(exc)})") from None
            except Exception as exc:  # no such dataset, no network, unreadable files
                what = "cannot load" if Path(self.path).exists() else (
                    "no such folder, and cannot load it as a Hub dataset")
                raise _Unreadable(f"{where}: {what} ({one_line(exc)})") from None
        splits = self._configs[config]
        if split not in splits:
            raise InputError(f"{where}: configuration {config!r} has no split {split!r} "
                             f"(splits: {', '.join(splits)})")
        ds = splits[split]
        absent = [c for c in columns if c not in ds.column_names]
        if absent:
            raise InputError(f"{where}: configuration {config!r}, split {split!r} has no column "
                             f"{absent[0]!r} (columns: {', '.join(ds.column_names)})")
        if len(ds) == 0:
            raise InputError(f"{where}: configuration {config!r}, split {split!r} is empty")
        return ds.select_columns(list(columns)).to_list() if columns else ds.to_list()
