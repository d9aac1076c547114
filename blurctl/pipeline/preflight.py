"""Pre-flight: check a recipe against the world before any model is loaded.

Every corpus is read (exists, readable, not empty), the tokenizer and the model's
config load, RMU layers exist, and the estimated training memory fits the stated
hardware. All problems are collected and reported together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from blurctl.data.sources import resolve
from blurctl.errors import BlurctlError
from blurctl.models import length_problems, load_config, model_skeleton, steering_problems
from blurctl.recipe import Recipe
from blurctl.unlearn.lora import adapter_problems
from blurctl.unlearn.optim import optimizer_problems
from blurctl.unlearn.tracking import tracker_problems

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> content fingerprint


def estimate_training_bytes(n_params: int, recipe: Recipe, trainable: int | None = None) -> int:
    """Weights + gradient + the set-aside gradient + AdamW's two fp32 moments (+ reference)."""
    width = BYTES[recipe.model.dtype]
    trainable = n_params if trainable is None else trainable
    total = n_params * width + 2 * trainable * width
    total += trainable * (8 if recipe.train.optimizer == "adamw" else 0)
    if recipe.algorithm.reference_losses:
        total += n_params * width
    return total


def available_bytes(recipe: Recipe) -> tuple[int, str]:
    """Memory the run may use: all GPUs it asks for, or this machine's free RAM."""
    import psutil
    import torch

    if recipe.hardware.device != "cpu" and torch.cuda.is_available():
        per_gpu = min(torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count()))
        shards = recipe.hardware.world_size
        usable = per_gpu * (shards if recipe.hardware.strategy == "fsdp" else 1)
        return usable, f"{shards} GPU(s) of {per_gpu / 2**30:.0f} GiB ({recipe.hardware.strategy})"
    return psutil.virtual_memory().available, "free RAM"


def _count_params(model, recipe: Recipe) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    steer = recipe.steering
    if steer and recipe.algorithm.uses_rmu:
        return total, sum(p.numel() for n, p in model.named_parameters() if steer.trains(n))
    return total, total


def _check_output_dir(recipe: Recipe, corpora: list[Path]) -> list[str]:
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir: {out} exists and is not a folder"]
    parent = _existing_parent(out)
    if not parent.is_dir():
        return [f"output_dir: {out} lies under {parent}, which is not a folder"]
    if not os.access(out if out.exists() else parent, os.W_OK):
        return [f"output_dir: {out} is not writable"]
    inside = [c for c in corpora if c.is_dir() and out.resolve().is_relative_to(c.resolve())]
    if inside:
        return [f"output_dir: {out} lies inside the corpus folder {inside[0]}; its files would "
                "be read as corpus"]
    return []


def _other_model_config(recipe: Recipe, path: str, field_name: str):
    """The config of another model the recipe names (reference, retrained), or InputError."""
    from blurctl.recipe import ModelConfig

    return load_config(recipe, ModelConfig(path=path, trust_remote_code=recipe.model.trust_remote_code),
                       field_name)


def _eval_problems(recipe: Recipe, check) -> list[str]:
    """The evaluation's inputs, found before training rather than after it."""
    from blurctl.evaluate.muse import MUSE_FILES

    problems, muse = [], recipe.eval.muse
    if muse is not None:
        corpus = Path(resolve(muse.corpus))
        missing = [f for f in MUSE_FILES if not (corpus / f).is_file()]
        if missing:
            problems.append(f"eval.muse.corpus: {corpus}: missing {', '.join(missing)} "
                            "(MUSE's layout)")
        if muse.retrained_model:
            check("eval.muse.retrained_model", lambda: _other_model_config(
                recipe, muse.retrained_model, "eval.muse.retrained_model"))
    if recipe.eval.lm_eval is not None:
        from blurctl.evaluate.harness import task_manager

        check("eval.lm_eval.tasks", lambda: task_manager(recipe.eval.lm_eval))
    return problems


def check_inputs(recipe: Recipe) -> Preflight:
    """Every problem with the recipe's inputs, found without loading weights.

    Corpora (read, not empty), tokenizer, model and reference configs, RMU layers and
    sequence length, the LoRA layers, the optimizer's package and GPU, the evaluation's
    corpus, models and lm-eval tasks, the output folder, the hardware, and the training
    memory estimate against it. Also
    records a fingerprint of every input (``Preflight.inputs``) for ``--resume``.
    """
    from blurctl.data.corpora import load_texts
    from blurctl.models import load_tokenizer
    from blurctl.pipeline.fingerprint import model_fingerprint, texts_fingerprint

    report = Preflight()

    def check(what, fn):
        try:
            return fn()
        except BlurctlError as exc:
            report.problems.append(str(exc))
        except Exception as exc:  # a library failure still becomes one line
            report.problems.append(f"{what}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
        return None

    corpora = [(f"data.forget.{i}" if len(recipe.data.forget) > 1 else "data.forget", c)
               for i, c in enumerate(recipe.data.forget)]
    corpora += [(f"data.retain.{i}" if len(recipe.data.retain) > 1 else "data.retain", c)
                for i, c in enumerate(recipe.data.retain or [])]
    real = {}
    for name, corpus in corpora:
        texts = check(name, lambda c=corpus, n=name: load_texts(c, n))
        if texts is not None:
            report.notes.append(f"{name} {corpus.path}: {len(texts)} texts")
            report.inputs[name] = texts_fingerprint(texts)
        local = Path(resolve(corpus.path))
        if local.exists():
            real.setdefault(local.resolve(), []).append(name)
    for names in real.values():
        if any(n.startswith("data.forget") for n in names) and any(
                n.startswith("data.retain") for n in names):
            report.problems.append("data.retain: the same file as data.forget")
    report.problems += _check_output_dir(recipe, list(real))
    report.problems += hardware_problems(recipe)
    report.problems += tracker_problems(recipe)
    report.problems += optimizer_problems(recipe)

    check("model.tokenizer", lambda: load_tokenizer(recipe.model))
    config = check("model.path", lambda: load_config(recipe))
    reference = recipe.model.reference
    if recipe.algorithm.reference_losses and reference not in ("copy", "none"):
        check("model.reference", lambda: _other_model_config(recipe, reference, "model.reference"))
    report.problems += _eval_problems(recipe, check)
    if config is None:
        return report
    report.problems += length_problems(recipe, config)
    report.inputs["model"] = model_fingerprint(recipe.model)
    skeleton = check("model.path", lambda: model_skeleton(config, recipe))
    if skeleton is None:
        return report
    report.problems += steering_problems(recipe, config, skeleton)
    report.problems += adapter_problems(recipe, config)
    counted = _count_params(skeleton, recipe)
    if counted:
        need = estimate_training_bytes(counted[0], recipe, counted[1])
        have, where = available_bytes(recipe)
        report.notes.append(f"memory: about {need / 2**30:.2f} GiB needed, {have / 2**30:.1f} GiB in {where}")
        if need > have:
            report.problems.append(f"hardware: training needs about {need / 2**30:.1f} GiB but "
                                   f"{where} offers {have / 2**30:.1f} GiB")
    return report


def hardware_problems(recipe: Recipe) -> list[str]:
    """Settings this machine cannot honour (rather than silently running otherwise)."""
    import torch

    hw, problems = recipe.hardware, []
    gpu = torch.cuda.is_available()
    if hw.device == "cuda" and not gpu:
        problems.append("hardware.device: 'cuda', but no GPU is visible here "
                        "(use device: cpu or auto)")
    if hw.mixed_precision == "fp16" and (hw.device == "cpu" or not gpu):
        problems.append("hardware.mixed_precision: fp16 needs a GPU; on CPU use bf16 or 'no'")
    return problems


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path
