"""Loading models and tokenizers from hub ids, local folders or the embedded benchmark."""

from __future__ import annotations

import warnings

import torch

from blurctl.bench.build import resolve
from blurctl.errors import InputError
from blurctl.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: ModelConfig):
    """The recipe's tokenizer, right-padded, with a pad token (EOS where it has none)."""
    from transformers import AutoTokenizer

    source = resolve(cfg.tokenizer or cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise InputError(f"model.tokenizer: cannot load tokenizer from {source!r} "
                           f"({exc.__class__.__name__})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(cfg: ModelConfig, path: str | None = None,
               field_name: str = "model.path") -> torch.nn.Module:
    """The causal LM named by ``cfg`` (or by ``path`` when given, e.g. a checkpoint);
    ``field_name`` names the recipe key in errors."""
    from transformers import AutoModelForCausalLM

    source = resolve(path or cfg.path)
    if cfg.trust_remote_code:
        warnings.warn(f"model.trust_remote_code is on: code from {source!r} will run",
                      stacklevel=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=None if path else cfg.revision,
            dtype=DTYPES.get(cfg.dtype, "auto"), trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise InputError(f"{field_name}: cannot load model from {source!r} "
                           f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers, found from transformers' own metadata.

    The list whose items are of a class the model names in ``_no_split_modules`` (the
    blocks that must stay whole on one device); this works for every architecture that
    declares it, through DDP and FSDP2 wrappers (FSDP2 subclasses the layer's class).
    """
    inner = getattr(model, "module", model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    for module in inner.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 0
                and any(c.__name__ in names for c in type(module[0]).__mro__)):
            return module
    raise InputError(f"model: cannot find the decoder layers of {type(inner).__name__} "
                     "(it declares no _no_split_modules)")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of ``model`` to serve as the reference pi_ref."""
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
