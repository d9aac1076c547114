"""Training memory per device, estimated from the model's config alone (docs/method.md §9).

Weights, the frozen reference, the two gradient buffers, the optimizer's state, autocast's
weight copies, activations (with or without gradient checkpointing) and the logits, each a
row of a table; and, when the total does not fit, the recipe options that would make it fit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from blurctl.recipe import Recipe, apply_overrides, recipe_yaml, validate_dict

GIB = 2**30
WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}


def gib(n: int) -> str:
    """Bytes as GiB, two decimals (more digits below 0.01 GiB)."""
    return f"{n / GIB:.2f}" if n >= 0.01 * GIB else f"{n / GIB:.1e}"


def count(n: int) -> str:
    """A parameter count: 6.74B, 0.9M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know of the model, read from its meta-device skeleton."""

    params: int  # every parameter
    trainable: int  # the parameters that train (RMU: its chosen ones; otherwise all)
    largest_layer: int  # parameters of the largest decoder layer
    layers: int
    first_trained_layer: int  # activations are kept from this layer on
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    dtype_width: int  # bytes per weight of the checkpoint as stored ("auto" loads it so)
    adapters: bool = False  # LoRA: the trainable parameters are float32 adapters


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    how: str


@dataclass(frozen=True)
class Estimate:
    parts: tuple[Part, ...]

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    def table(self) -> list[tuple[str, str, str]]:
        """(part, GiB, how it is counted) rows, the total last."""
        rows = [(p.name, gib(p.bytes), p.how) for p in self.parts]
        return [*rows, ("total", gib(self.total), "per device")]


def model_shape(skeleton: torch.nn.Module, recipe: Recipe) -> Shape:
    """The sizes of a model built on the meta device (no weights allocated)."""
    from blurctl.models import decoder_layers, rmu_parameter_names

    config = skeleton.config
    layers = decoder_layers(skeleton)
    params = sum(p.numel() for p in skeleton.parameters())
    trainable, first = params, 0
    if recipe.steering is not None and recipe.algorithm.uses_rmu:
        chosen = set(rmu_parameter_names(skeleton, recipe))
        trainable = sum(p.numel() for n, p in skeleton.named_parameters() if n in chosen)
        first = min(recipe.steering.update_layers)
    if recipe.peft is not None:
        from blurctl.unlearn.lora import adapter_parameter_count

        trainable = adapter_parameter_count(recipe, config)
    hidden = config.hidden_size
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return Shape(
        params=params, trainable=trainable,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layers=len(layers), first_trained_layer=first, hidden=hidden,
        intermediate=(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                      or getattr(config, "n_inner", None) or 4 * hidden),
        heads=config.num_attention_heads, vocab=config.vocab_size,
        dtype_width=WIDTH.get(stored, 4), adapters=recipe.peft is not None)


def longest_chunk(recipe: Recipe) -> int:
    """Tokens in the longest training chunk any corpus makes."""
    corpora = [*recipe.data.forget, *(recipe.data.retain or [])]
    return max(c.max_len or recipe.data.max_len for c in corpora)


def activation_bytes(recipe: Recipe, shape: Shape, width: int) -> tuple[int, int]:
    """Bytes of the activations autograd keeps for one micro-batch, and of the logits' part.

    A decoder layer keeps about 10 hidden-sized and 4 MLP-sized tensors per token (Llama's:
    norms, q/k/v, attention output, gate, up, their product...), plus a float32 copy of the
    hidden state where the model computes in 16 bits (its norms upcast); eager attention
    also keeps the heads x length attention matrix (float32 softmax and its 16-bit copy).
    With gradient checkpointing a layer keeps only its input, and one layer at a time is
    recomputed in full. Logits: the float32 log-softmax kept for the backward pass, its
    float32 gradient and the logits' gradient at the backward's start. Calibrated on
    autograd's saved tensors (tests/test_memory.py).
    """
    tokens = recipe.train.batch_size * longest_chunk(recipe)
    upcast = 4 if width == 2 else 0
    layer = tokens * ((10 * shape.hidden + 4 * shape.intermediate) * width + upcast * shape.hidden)
    if recipe.model.attn_implementation == "eager":
        layer += tokens * shape.heads * longest_chunk(recipe) * (width + upcast)
    kept = shape.layers - shape.first_trained_layer
    if recipe.train.gradient_checkpointing:
        layers = kept * tokens * shape.hidden * width + layer
    else:
        layers = kept * layer
    alg = recipe.algorithm
    reads_logits = any(loss not in ("rmu", None) for loss in (alg.forget_loss, alg.retain_loss))
    logits = tokens * shape.vocab * (8 + width) if reads_logits else 0
    return layers, logits


def gradient_buffers(recipe: Recipe) -> int:
    """Gradient-sized buffers on the device at once. The loop sets the forget gradient aside
    while the retain gradient accumulates, for every combiner: BLUR's projection needs both,
    and penalty and task_vector take the same two passes. With
    ``train.offload_forget_grad`` the set-aside one waits in CPU memory during the retain
    pass (it comes back for the combination, when the activations are gone)."""
    return 1 if recipe.train.offload_forget_grad else 2


OPTIMIZER_STATE = {  # bytes per trained parameter of the given width; (how it is counted)
    "adamw": (lambda w: 2 * w, "AdamW's two moments in the weights' dtype ({kind})"),
    "sgd": (lambda w: 0, "SGD keeps no state"),
    "adafactor": (lambda w: 0, "Adafactor's factored second moments (a row and a column per "
                               "matrix: about 0 per parameter)"),
    "adamw_8bit": (lambda w: 2, "two 8-bit block-quantised moments"),
    "paged_adamw_8bit": (lambda w: 2, "two 8-bit block-quantised moments (pageable)"),
}


def estimate(recipe: Recipe, shape: Shape) -> Estimate:
    """Peak training memory of one device (one process) for ``recipe`` on a model of ``shape``."""
    hw, tr, alg = recipe.hardware, recipe.train, recipe.algorithm
    width = WIDTH.get(recipe.model.dtype, shape.dtype_width)
    act_width = 2 if width == 2 or hw.mixed_precision != "no" else 4
    shards = hw.world_size if hw.strategy == "fsdp" and hw.world_size > 1 else 1
    per = f" / {shards} ranks (FSDP)" if shards > 1 else ""
    kind = {4: "float32", 2: "16-bit"}[width]
    n, t = shape.params, shape.trainable
    parts = [Part("weights", n * width // shards, f"{count(n)} x {width} B ({kind}){per}")]
    if shards > 1:
        parts.append(Part("gathered layers", 2 * shape.largest_layer * width,
                          "the running and the prefetched decoder layer, unsharded"))
    t_width = 4 if shape.adapters else width  # LoRA adapters are float32 (peft's default)
    if shape.adapters:
        parts.append(Part("adapters", t * 4, f"{count(t)} LoRA parameters, float32"))
    shared_base = recipe.peft is not None and recipe.model.reference == "copy"
    if alg.reference_losses and not tr.precompute_reference and not shared_base:
        parts.append(Part("reference", n * width, "frozen copy, whole on every rank"))
    buffers = gradient_buffers(recipe)
    parts.append(Part("gradients", buffers * t * t_width // shards,
                      f"{buffers} x {count(t)} trainable: "
                      + ("g_r (g_f in CPU memory)" if buffers == 1 else "g_f set aside, g_r")
                      + per))
    state, how = OPTIMIZER_STATE[tr.optimizer]
    if state(t_width):
        trained_kind = {4: "float32", 2: "16-bit"}[t_width]
        parts.append(Part("optimizer", state(t_width) * t // shards,
                          how.format(kind=trained_kind) + per))
    if hw.mixed_precision != "no" and width == 4:
        parts.append(Part("autocast copies", 2 * t // shards,
                          "16-bit copies of the trainable weights during the forward pass"))
    layers, logits = activation_bytes(recipe, shape, act_width)
    seq = f"{tr.batch_size} x {longest_chunk(recipe)} tokens"
    first = shape.first_trained_layer
    kept = f"layers {first}-{shape.layers - 1}" if first else "every layer"
    how = (f"{kept}: inputs + one layer recomputed (gradient checkpointing)"
           if tr.gradient_checkpointing else f"{kept}, in full (no gradient checkpointing)")
    parts.append(Part("activations", layers, f"{seq}: {how}"))
    if logits:
        parts.append(Part("logits", logits, f"{seq} x {shape.vocab} vocabulary, float32 loss"))
    return Estimate(tuple(parts))


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe | None:
    """``recipe`` with dot-list overrides applied, or None where the result is not valid."""
    import yaml

    from blurctl.recipe import RecipeError

    try:
        return validate_dict(apply_overrides(yaml.safe_load(recipe_yaml(recipe)), overrides))
    except RecipeError:
        return None


def fitting_options(recipe: Recipe, shape: Shape, have: int, limit: int = 3) -> list[str]:
    """The smallest sets of recipe changes under which the estimate fits in ``have`` bytes,
    each with its estimate: among gradient checkpointing, bf16 weights, micro-batch 1 (more
    accumulation, the same examples per step), and FSDP over the fewest of 2, 4 or 8 GPUs."""
    tr = recipe.train
    single = []
    if not tr.gradient_checkpointing:
        single.append(["train.gradient_checkpointing=true"])
    if WIDTH.get(recipe.model.dtype, shape.dtype_width) == 4:
        single.append(["model.dtype=bfloat16"])
    if tr.batch_size > 1:
        same_batch = tr.batch_size * tr.grad_accum
        accum = [] if tr.global_batch_size else [f"train.grad_accum={same_batch}"]
        single.append(["train.batch_size=1", *accum])
    now = recipe.hardware.num_processes
    gpus = [now] + [n for n in (2, 4, 8) if n > now]
    found: list[tuple[list[str], int, int]] = []  # changes, GPUs, bytes needed
    for size in range(len(single) + 1):
        for combo in itertools.combinations(single, size):
            changes = [o for group in combo for o in group]
            for n in gpus:
                shard = ([] if n == gpus[0] else
                         ["hardware.strategy=fsdp", f"hardware.num_processes={n}"])
                changed = with_overrides(recipe, changes + shard) if changes or shard else None
                if changed is not None and (need := estimate(changed, shape).total) <= have:
                    found.append((changes, n, need))
                    break
    minimal = [(c, n, need) for c, n, need in found
               if not any(set(c2) <= set(c) and n2 <= n and (set(c2), n2) != (set(c), n)
                          for c2, n2, _ in found)]
    minimal.sort(key=lambda f: (f[1], len(f[0]), f[2]))
    return [" ".join(c + ([] if n == gpus[0] else ["hardware.strategy=fsdp",
                                                  f"hardware.num_processes={n}"]))
            + f" (about {gib(need)} GiB)" for c, n, need in minimal[:limit]]


def available_bytes(recipe: Recipe) -> tuple[int, str]:
    """Memory one process of the run may use: one of the GPUs, or its share of free RAM."""
    import psutil

    if recipe.hardware.device != "cpu" and torch.cuda.is_available():
        per_gpu = min(torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count()))
        return per_gpu, f"one GPU of {per_gpu / GIB:.1f} GiB"
    processes = recipe.hardware.num_processes
    share = psutil.virtual_memory().available // processes
    return share, "free RAM" + (f" / {processes} processes" if processes > 1 else "")


def recipe_shape(recipe: Recipe) -> Shape:
    """The model's shape from its config alone (a Hub model's config.json, never its
    weights); InputError for an unloadable config or a bad RMU setup."""
    from blurctl.errors import InputError
    from blurctl.models import load_config, model_skeleton, steering_problems

    config = load_config(recipe)
    skeleton = model_skeleton(config, recipe)
    problems = steering_problems(recipe, config, skeleton)
    if problems:
        raise InputError(problems[0])
    return model_shape(skeleton, recipe)


def memory_problems(recipe: Recipe, shape: Shape, have: int, where: str) -> list[str]:
    """One line when the estimate does not fit ``have``, saying what would make it fit."""
    need = estimate(recipe, shape).total
    if need <= have:
        return []
    options = fitting_options(recipe, shape, have)
    advice = ("; it would fit with " + "; or ".join(options) if options else
              "; neither gradient checkpointing, bf16 weights, micro-batch 1 nor FSDP over up "
              "to 8 GPUs makes it fit")
    return [f"hardware: training needs about {gib(need)} GiB per device but {where} "
            f"offers {gib(have)} GiB{advice}"]
