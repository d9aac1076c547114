"""Corpora: read texts from files, folders or datasets (saved, Hub ids, local copies of Hub
dataset repositories), and cut them into token chunks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blurctl.data.sources import is_dataset_repo, load_hub_dataset, one_line, resolve
from blurctl.errors import InputError
from blurctl.recipe import CorpusConfig, DataConfig

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")


def _texts_from_records(records: object, field: str, where: str) -> list[str]:
    if not isinstance(records, list):
        raise InputError(f"{where}: expected a JSON list of strings or objects")
    texts = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            texts.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get(field), str):
            texts.append(rec[field])
        else:
            raise InputError(f"{where}: record {i} has no string field {field!r}")
    return texts


def _read_file(path: Path, field: str) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if path.suffix == ".txt":
        return [raw]
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}: invalid JSON at line {number}: {exc.msg}") from None
        return _texts_from_records(records, field, str(path))
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    return _texts_from_records(records, field, str(path))


def _read_dataset(cfg: CorpusConfig, path: str, kind: str, field_name: str) -> list[str]:
    """The texts of a saved ``datasets`` folder, a local dataset repository or a Hub id."""
    import datasets

    try:
        if kind == "saved":
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
        else:
            ds = load_hub_dataset(path, cfg.name, cfg.split)
    except Exception as exc:  # datasets raises many types; report them in one line
        raise InputError(f"{field_name}: {path}: cannot load dataset ({one_line(exc)})") from None
    if cfg.text_field not in ds.column_names:
        raise InputError(f"{field_name}: {path}: no column {cfg.text_field!r} (columns: "
                         f"{', '.join(ds.column_names)})")
    return list(ds[cfg.text_field])


def _looks_like_hub_id(path: str) -> bool:
    return (not path.startswith(("/", ".", "~")) and Path(path).suffix not in TEXT_SUFFIXES
            and path.count("/") <= 1)


def source_kind(path: str) -> str:
    """What a resolved corpus path is: 'file', 'folder' (of text files), 'saved' (a
    ``save_to_disk`` folder), 'repo' (a local dataset repository), 'hub' (a Hub id),
    'special' (exists, but neither file nor folder) or 'missing'."""
    local = Path(path)
    if local.is_file():
        return "file"
    if local.is_dir():
        if any(local.glob("*.arrow")) or (local / "dataset_dict.json").exists():
            return "saved"
        return "repo" if is_dataset_repo(local) else "folder"
    if local.exists():  # a FIFO would block forever
        return "special"
    return "hub" if _looks_like_hub_id(path) else "missing"


def corpus_identity(cfg: CorpusConfig) -> tuple | None:
    """What makes two corpora on this machine the same: the resolved file or folder, plus
    the configuration and split for a dataset folder (None for a Hub id or a missing path)."""
    path = resolve(cfg.path)
    kind = source_kind(path)
    if kind in ("hub", "missing"):
        return None
    real = Path(path).resolve()
    return (real, cfg.name, cfg.split) if kind in ("saved", "repo") else (real,)


def load_texts(cfg: CorpusConfig, field_name: str) -> list[str]:
    """The texts of one corpus; ``field_name`` (e.g. ``data.forget``) names it in errors."""
    path = resolve(cfg.path)
    local, kind = Path(path), source_kind(path)
    if kind == "special":
        raise InputError(f"{field_name}: {path}: not a regular file or folder")
    if kind == "file":
        if local.suffix not in TEXT_SUFFIXES:
            raise InputError(f"{field_name}: {path}: unsupported file type (use "
                             f"{', '.join(TEXT_SUFFIXES)}, a folder or a hub dataset id)")
        texts = _read_file(local, cfg.text_field)
    elif kind == "folder":
        files = sorted(p for p in local.iterdir() if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{field_name}: {path}: folder holds no .txt/.json/.jsonl files")
        texts = [t for f in files for t in _read_file(f, cfg.text_field)]
    elif kind in ("saved", "repo", "hub"):
        texts = _read_dataset(cfg, path, kind, field_name)
    else:
        raise InputError(f"{field_name}: {path}: no such file, folder or hub dataset id")
    texts = [t for t in texts if t.strip() and len(t) > cfg.min_chars]
    if cfg.max_examples is not None:
        texts = texts[: cfg.max_examples]
    if not texts:
        kept = f" (no text longer than min_chars={cfg.min_chars})" if cfg.min_chars else ""
        raise InputError(f"{field_name}: {path}: corpus is empty{kept}")
    return [cfg.join.join(texts)] if cfg.join is not None else texts


def chunk_texts(texts: list[str], tokenizer, max_len: int, first_only: bool = False) -> list[list[int]]:
    """Tokenize each text and cut it into chunks of at most ``max_len`` tokens (BOS first).

    ``first_only`` keeps one chunk per text, its beginning: what tokenizing with
    ``truncation=True, max_length=max_len`` gives, as the WMDP code does.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = max_len - len(bos)
    chunks = []
    # one batched call: a fast tokenizer encodes the texts in parallel (what datasets.map
    # would call, without its copy of every corpus on disk). Every rank tokenizes its own
    # copy: seconds for the paper corpora, less than loading the model.
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        starts = range(0, len(ids), body)
        chunks += [bos + ids[i:i + body] for i in (starts[:1] if first_only else starts)]
    return chunks


def corpus_chunks(corpora: list[CorpusConfig], field: str, tokenizer,
                  data: DataConfig) -> list[list[list[int]]]:
    """The token chunks of each corpus, at its own ``max_len`` (or ``data.max_len``);
    ``field`` (``data.forget``) names the corpora in errors."""
    return [chunk_texts(load_texts(c, f"{field}.{i}" if len(corpora) > 1 else field),
                        tokenizer, c.max_len or data.max_len, data.truncate)
            for i, c in enumerate(corpora)]


def collate(chunks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention mask and labels (-100 on padding)."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
