"""Models: loading them and their tokenizers (hub ids, local folders, the embedded benchmark),
checking a recipe against a model's config before any weights load, finding the decoder
layers, and scoring tokens."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blurctl.data.sources import resolve
from blurctl.errors import InputError

if TYPE_CHECKING:  # the recipe's schema imports the loss registry, which imports this module
    from blurctl.recipe import ModelConfig, Recipe

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


def model_skeleton(config, recipe: Recipe):
    """The model's modules with no weights allocated (meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)


def steering_problems(recipe: Recipe, config, skeleton=None) -> list[str]:
    """RMU's layers must exist and ``param_suffix`` must name one parameter in each."""
    steer = recipe.steering
    if steer is None or not recipe.algorithm.uses_rmu:
        return []
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None:
        for i in [steer.layer, *steer.update_layers]:
            if i >= layers:
                return [f"steering: layer {i} out of range; the model has {layers} layers "
                        f"(0..{layers - 1})"]
    model = skeleton or model_skeleton(config, recipe)
    names = [n for n, _ in model.named_parameters()]
    missing = [i for i, suffix in zip(steer.update_layers, steer.trained_suffixes, strict=True)
               if not any(n.endswith(suffix) for n in names)]
    if missing:
        return [f"steering.param_suffix: {steer.param_suffix!r} names no parameter of layer(s) "
                f"{missing}"]
    return []


def load_config(recipe: Recipe, model=None, field_name: str = "model.path"):
    """The config (no weights) of the recipe's model (or ``model``), or InputError naming
    ``field_name``."""
    from transformers import AutoConfig

    model = model or recipe.model
    source = resolve(model.path)
    try:
        return AutoConfig.from_pretrained(source, revision=model.revision,
                                          trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, ...
        raise InputError(f"{field_name}: cannot load model from {source!r} "
                         f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None


def check_model_config(recipe: Recipe) -> None:
    """Raise InputError for an unloadable model or a bad RMU setup, from the config alone."""
    config = load_config(recipe)
    problems = length_problems(recipe, config) + steering_problems(recipe, config)
    if problems:
        raise InputError(problems[0])


def length_problems(recipe: Recipe, config) -> list[str]:
    """Chunks no longer than the model's positions (``data.max_len`` only where a corpus
    has no ``max_len`` of its own)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return []
    corpora = [(f"data.{kind}.{i}.max_len", c) for kind, group in
               (("forget", recipe.data.forget), ("retain", recipe.data.retain or []))
               for i, c in enumerate(group)]
    lengths = [(where, c.max_len) for where, c in corpora if c.max_len is not None]
    if any(c.max_len is None for _, c in corpora):
        lengths.insert(0, ("data.max_len", recipe.data.max_len))
    return [f"{where}: {n} is beyond the model's {limit} positions" for where, n in lengths if n > limit]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each next token and the mask of positions that count."""
    targets = labels[:, 1:]
    mask = targets != -100
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                            targets.clamp(min=0).flatten(), reduction="none")
    return logp.view_as(targets) * mask, mask
