"""Loading models and tokenizers from hub ids, local folders or the embedded benchmark."""

from __future__ import annotations

import warnings

import torch

from blurctl.bench.build import resolve
from blurctl.errors import InputError
from blurctl.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: ModelConfig, seed: int = 0, padding_side: str = "right"):
    from transformers import AutoTokenizer

    source = resolve(cfg.tokenizer or cfg.path, seed)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise InputError(f"model.tokenizer: cannot load tokenizer from {source!r} "
                           f"({exc.__class__.__name__})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(cfg: ModelConfig, seed: int = 0, path: str | None = None) -> torch.nn.Module:
    """The causal LM named by ``cfg`` (or by ``path`` when given, e.g. a checkpoint)."""
    from transformers import AutoModelForCausalLM

    source = resolve(path or cfg.path, seed)
    if cfg.trust_remote_code:
        warnings.warn(f"model.trust_remote_code is on: code from {source!r} will run",
                      stacklevel=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=None if path else cfg.revision,
            dtype=DTYPES.get(cfg.dtype, "auto"), trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise InputError(f"model.path: cannot load model from {source!r} "
                           f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of ``model`` to serve as the reference pi_ref."""
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
