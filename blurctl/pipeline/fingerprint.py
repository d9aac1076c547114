"""Content fingerprints of a run's inputs, so ``--resume`` can refuse changed ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

from blurctl.data.sources import resolve
from blurctl.recipe import ModelConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")


def texts_fingerprint(texts: list[str]) -> str:
    """sha256 over the corpus's texts as read (whatever file, folder or dataset held them)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def model_fingerprint(model: ModelConfig) -> str:
    """A local model folder: sha256 over its weight, config and tokenizer files. A Hub id:
    the id with its revision and, where the Hub cache has it, the snapshot's commit."""
    source = resolve(model.path)
    folder = Path(source)
    if folder.is_dir():
        digest = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
                digest.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    digest.update(hashlib.file_digest(fh, "sha256").digest())
        return "sha256:" + digest.hexdigest()
    commit = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json", revision=model.revision)
        if isinstance(cached, str):
            commit = Path(cached).parent.name
    except Exception:  # an unusual id or cache: the id and revision still say what was asked
        commit = None
    return f"hub:{source}@{model.revision or 'main'}" + (f" ({commit})" if commit else "")
