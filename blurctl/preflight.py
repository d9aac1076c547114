"""Pre-flight: check a recipe against the world before any model is loaded.

Every corpus is read (exists, readable, not empty), the tokenizer and the model's
config load, RMU layers exist, and the estimated training memory fits the stated
hardware. All problems are collected and reported together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from blurctl.bench.build import resolve
from blurctl.errors import BlurctlError
from blurctl.losses import needs_reference
from blurctl.recipe import Recipe

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def estimate_training_bytes(n_params: int, recipe: Recipe, trainable: int | None = None) -> int:
    """Weights + gradient + the set-aside gradient + AdamW's two fp32 moments (+ reference)."""
    width = BYTES[recipe.model.dtype]
    trainable = n_params if trainable is None else trainable
    total = n_params * width + 2 * trainable * width
    total += trainable * (8 if recipe.train.optimizer == "adamw" else 0)
    if needs_reference(recipe.algorithm):
        total += n_params * width
    return total


def available_bytes(recipe: Recipe) -> tuple[int, str]:
    """Memory the run may use: all GPUs it asks for, or this machine's free RAM."""
    import psutil
    import torch

    if recipe.hardware.device != "cpu" and torch.cuda.is_available():
        per_gpu = min(torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count()))
        shards = recipe.hardware.num_processes * recipe.hardware.num_machines
        usable = per_gpu * (shards if recipe.hardware.strategy == "fsdp" else 1)
        return usable, f"{shards} GPU(s) of {per_gpu / 2**30:.0f} GiB ({recipe.hardware.strategy})"
    return psutil.virtual_memory().available, "free RAM"


def _count_params(config, recipe: Recipe) -> tuple[int, int]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    steer = recipe.steering
    if steer and "rmu" in (recipe.algorithm.forget_loss, recipe.algorithm.retain_loss):
        wanted = tuple(f"layers.{i}.{steer.param_suffix}" for i in steer.update_layers)
        return total, sum(p.numel() for n, p in model.named_parameters() if n.endswith(wanted))
    return total, total


def run_preflight(recipe: Recipe) -> Preflight:
    from transformers import AutoConfig

    from blurctl.data import load_texts
    from blurctl.models import load_tokenizer

    report = Preflight()

    def check(what, fn):
        try:
            return fn()
        except BlurctlError as exc:
            report.problems.append(str(exc))
        except Exception as exc:  # a library failure still becomes one line
            report.problems.append(f"{what}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
        return None

    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        report.problems.append(f"output_dir: {out} exists and is not a folder")
    elif not os.access(out if out.exists() else _existing_parent(out), os.W_OK):
        report.problems.append(f"output_dir: {out} is not writable")

    corpora = [("data.forget", c) for c in recipe.data.forget] + [
        ("data.retain", c) for c in (recipe.data.retain or [])]
    real = {}
    for name, corpus in corpora:
        texts = check(name, lambda c=corpus, n=name: load_texts(c, n, recipe.seed))
        if texts is not None:
            report.notes.append(f"{name} {corpus.path}: {len(texts)} texts")
        local = Path(resolve(corpus.path, recipe.seed))
        if local.exists():
            real.setdefault(local.resolve(), []).append(name)
    for names in real.values():
        if {"data.forget", "data.retain"} <= set(names):
            report.problems.append("data.retain: the same file as data.forget")

    check("model.tokenizer", lambda: load_tokenizer(recipe.model, recipe.seed))
    source = resolve(recipe.model.path, recipe.seed)
    config = check("model.path", lambda: AutoConfig.from_pretrained(
        source, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code))
    if config is None:
        return report
    steer = recipe.steering
    layers = getattr(config, "num_hidden_layers", None)
    if steer is not None and layers is not None:
        for i in [steer.layer, *steer.update_layers]:
            if i >= layers:
                report.problems.append(f"steering: layer {i} out of range; the model has {layers} layers")
                break
    counted = check("model.path", lambda: _count_params(config, recipe))
    if counted:
        need = estimate_training_bytes(counted[0], recipe, counted[1])
        have, where = available_bytes(recipe)
        report.notes.append(f"memory: about {need / 2**30:.2f} GiB needed, {have / 2**30:.1f} GiB in {where}")
        if need > have:
            report.problems.append(f"hardware: training needs about {need / 2**30:.1f} GiB but "
                                   f"{where} offers {have / 2**30:.1f} GiB")
    return report


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path
