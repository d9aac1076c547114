"""Models: loading them and their tokenizers (hub ids, local folders, the embedded benchmark),
where evaluation runs, preparing a model for training, checking a recipe against a model's
config before any weights load, finding the decoder layers and RMU's parameters, and scoring
tokens."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blurctl.data.sources import resolve
from blurctl.errors import InputError

if TYPE_CHECKING:  # the recipe's schema imports the loss registry, which imports this module
    from blurctl.recipe import ModelConfig, Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The MLP output projection of a decoder layer, named within the layer, by config.model_type:
# what RMU trains when steering.param_suffix is not given (WMDP trains Zephyr's
# mlp.down_proj). tests/test_model_families.py checks every entry against transformers.
MLP_OUTPUT = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "phi3", "olmo", "olmo2", "granite", "stablelm", "cohere"),
                    "mlp.down_proj.weight"),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), "mlp.dense_4h_to_h.weight"),
    **dict.fromkeys(("gpt2", "gpt_bigcode", "starcoder2"), "mlp.c_proj.weight"),
    "opt": "fc2.weight",
    "phi": "mlp.fc2.weight",
    "gptj": "mlp.fc_out.weight",
}


@dataclass(frozen=True)
class Placement:
    """Where models load for evaluation, and in which dtype (None: the checkpoint's own)."""

    device: str
    dtype: torch.dtype | None


def eval_placement(recipe: Recipe) -> Placement:
    """The device and dtype evaluation loads models in (docs/method.md §9).

    Device: ``hardware.device``; ``auto`` is the GPU when one is visible, else the CPU.
    Dtype: ``model.dtype`` when set; when ``auto``, on a GPU the dtype of the training's
    mixed precision (bf16 → bfloat16, fp16 → float16), else the checkpoint's own dtype.
    """
    hw = recipe.hardware
    gpu = torch.cuda.is_available()
    if hw.device == "cuda" and not gpu:
        raise InputError("hardware.device: 'cuda', but no GPU is visible here (evaluate on the "
                         "CPU with hardware.device=cpu)")
    device = "cuda" if hw.device == "cuda" or (hw.device == "auto" and gpu) else "cpu"
    if recipe.model.dtype != "auto":
        return Placement(device, DTYPES[recipe.model.dtype])
    if device == "cuda" and hw.mixed_precision in MIXED_PRECISION:
        return Placement(device, MIXED_PRECISION[hw.mixed_precision])
    return Placement(device, None)


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


def load_model(cfg: ModelConfig, path: str | None = None, field_name: str = "model.path",
               placement: Placement | None = None) -> torch.nn.Module:
    """The causal LM named by ``cfg`` (or by ``path`` when given, e.g. a checkpoint);
    ``field_name`` names the recipe key in errors. With ``placement`` the weights load
    straight onto its device in its dtype; without, onto the CPU in ``model.dtype``."""
    from transformers import AutoModelForCausalLM

    source = resolve(path or cfg.path)
    if cfg.trust_remote_code:
        warnings.warn(f"model.trust_remote_code is on: code from {source!r} will run",
                      stacklevel=2)
    options = {} if cfg.attn_implementation is None else {
        "attn_implementation": cfg.attn_implementation}
    if placement is not None:
        options["device_map"] = placement.device
        dtype = placement.dtype or "auto"
    else:
        dtype = DTYPES.get(cfg.dtype, "auto")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=None if path else cfg.revision, dtype=dtype,
            trust_remote_code=cfg.trust_remote_code, **options)
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


def layers_prefix(model: torch.nn.Module) -> str:
    """The name of the decoder layers' list within ``model`` (``model.layers`` for Llama,
    ``model.decoder.layers`` for OPT, ``gpt_neox.layers`` for GPT-NeoX)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def rmu_param_suffix(recipe: Recipe, config) -> str:
    """The parameter RMU trains in each updated layer: ``steering.param_suffix``, else the
    family's MLP output projection (``MLP_OUTPUT``); InputError for a family not listed."""
    given = recipe.steering.param_suffix
    if given is not None:
        return given
    suffix = MLP_OUTPUT.get(getattr(config, "model_type", None))
    if suffix is None:
        raise InputError(f"steering.param_suffix: no default for model type "
                         f"{getattr(config, 'model_type', None)!r}; name the parameter of a "
                         "decoder layer to train")
    return suffix


def rmu_parameter_names(model: torch.nn.Module, recipe: Recipe) -> list[str]:
    """Full names of the parameters RMU trains: the ``rmu_param_suffix`` parameter of each
    layer in ``steering.update_layers``, by index within ``decoder_layers``. InputError when
    one is missing, listing the layer's parameter names."""
    steer = recipe.steering
    layers, prefix = decoder_layers(model), layers_prefix(model)
    try:
        suffix = rmu_param_suffix(recipe, model.config)
    except InputError as exc:
        own = ", ".join(n for n, _ in layers[0].named_parameters())
        raise InputError(f"{exc} (a layer's parameters: {own})") from None
    out_of_range = [i for i in steer.update_layers if i >= len(layers)]
    if out_of_range:
        raise InputError(f"steering.update_layers: layer {out_of_range[0]} out of range; the "
                         f"model has {len(layers)} layers (0..{len(layers) - 1})")
    missing = [i for i in steer.update_layers
               if suffix not in dict(layers[i].named_parameters())]
    if missing:
        own = ", ".join(n for n, _ in layers[missing[0]].named_parameters())
        raise InputError(f"steering.param_suffix: {suffix!r} names no parameter of layer(s) "
                         f"{missing} (a layer's parameters: {own})")
    return [f"{prefix}.{i}.{suffix}" for i in steer.update_layers]


def select_trainable(model: torch.nn.Module, recipe: Recipe) -> None:
    """RMU trains only its chosen parameters (``rmu_parameter_names``); other methods all."""
    if recipe.algorithm.uses_rmu:
        chosen = set(rmu_parameter_names(model, recipe))
        for name, p in model.named_parameters():
            p.requires_grad_(name in chosen)


def prepare_for_training(model: torch.nn.Module, recipe: Recipe) -> None:
    """Make a freshly loaded model ready for the loop: the trainable parameters, and
    gradient checkpointing where the recipe asks for it."""
    select_trainable(model, recipe)
    enable_gradient_checkpointing(model, recipe)


def enable_gradient_checkpointing(model: torch.nn.Module, recipe: Recipe) -> None:
    """``train.gradient_checkpointing``: transformers' non-reentrant activation checkpointing
    of every decoder layer, with the key-value cache off (it has no use in training)."""
    if recipe.train.gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # reentrant checkpoints lose frozen-input gradients
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name (transformers 5)
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False


def release_memory() -> None:
    """Free the memory of models no longer referenced, now: a transformers model can sit in
    reference cycles, and then ``del`` alone leaves its weights allocated until the garbage
    collector runs; then hand the GPU's cached blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of ``model`` to serve as the reference pi_ref."""
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def model_skeleton(config, recipe: Recipe):
    """The model's modules with no weights allocated (meta device), tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=recipe.model.trust_remote_code)
    model.tie_weights()  # from_config leaves meta-device weights untied
    return model


def steering_problems(recipe: Recipe, config, skeleton=None) -> list[str]:
    """RMU's layers must exist and its parameter (``rmu_param_suffix``) in each updated one."""
    steer = recipe.steering
    if steer is None or not recipe.algorithm.uses_rmu:
        return []
    model = skeleton or model_skeleton(config, recipe)
    layers = len(decoder_layers(model))
    for i in [steer.layer, *steer.update_layers]:
        if i >= layers:
            return [f"steering: layer {i} out of range; the model has {layers} layers "
                    f"(0..{layers - 1})"]
    try:
        rmu_parameter_names(model, recipe)
    except InputError as exc:
        return [str(exc)]
    return []


def attention_problems(recipe: Recipe) -> list[str]:
    """``model.attn_implementation: flash_attention_2`` needs the flash-attn package, a GPU
    and 16-bit weights or 16-bit mixed precision."""
    if recipe.model.attn_implementation != "flash_attention_2":
        return []
    if importlib.util.find_spec("flash_attn") is None:
        return ["model.attn_implementation: flash_attention_2 needs the flash-attn package, "
                "which is not installed (pip install flash-attn; or use sdpa)"]
    if recipe.hardware.device == "cpu" or not torch.cuda.is_available():
        return ["model.attn_implementation: flash_attention_2 runs on a GPU only (use sdpa)"]
    if recipe.model.dtype == "float32" and recipe.hardware.mixed_precision == "no":
        return ["model.attn_implementation: flash_attention_2 computes in 16 bits; set "
                "model.dtype to bfloat16 or hardware.mixed_precision to bf16"]
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


def check_model_config(recipe: Recipe, tokenizer=None) -> None:
    """Raise InputError for an unloadable model, a tokenizer with tokens the model has no
    embedding for, or a bad RMU setup, from the config alone."""
    config = load_config(recipe)
    problems = length_problems(recipe, config) + steering_problems(recipe, config)
    if tokenizer is not None:
        problems += vocabulary_problems(recipe, tokenizer, config)
    if problems:
        raise InputError(problems[0])


def vocabulary_problems(recipe: Recipe, tokenizer, config) -> list[str]:
    """A tokenizer whose token ids reach past the model's embedding rows (``vocab_size``):
    its base vocabulary, or the BOS/EOS/padding ids every batch uses (an added token that
    no text contains is harmless)."""
    rows = getattr(config, "vocab_size", None) or getattr(
        getattr(config, "text_config", None), "vocab_size", None)
    if rows is None:
        return []
    specials = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id,
                            tokenizer.pad_token_id) if i is not None]
    needed = max([tokenizer.vocab_size, *(i + 1 for i in specials)])
    if needed <= rows:
        return []
    source = recipe.model.tokenizer or recipe.model.path
    return [f"model.tokenizer: {source} needs {needed} token ids but the model at "
            f"{recipe.model.path} embeds only {rows} (vocab_size); use the model's own tokenizer"]


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
