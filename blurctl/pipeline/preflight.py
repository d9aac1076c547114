"""Pre-flight: check a recipe against the world before any model is loaded.

Every corpus is read (exists, readable, not empty), the tokenizer and the model's
config load, RMU layers exist, and the estimated training memory fits the stated
hardware. All problems are collected and reported together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from blurctl.errors import BlurctlError
from blurctl.models import (
    attention_problems,
    length_problems,
    load_config,
    model_skeleton,
    steering_problems,
    vocabulary_problems,
)
from blurctl.pipeline.memory import available_bytes, estimate, gib, memory_problems, model_shape
from blurctl.recipe import Recipe
from blurctl.unlearn.lora import adapter_problems
from blurctl.unlearn.optim import optimizer_problems
from blurctl.unlearn.tracking import tracker_problems


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> content fingerprint


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
    from blurctl.data.muse_corpus import MuseCorpus

    problems, muse = [], recipe.eval.muse
    if muse is not None:
        problems += MuseCorpus(muse.corpus).problems()
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
    from blurctl.data.corpora import corpus_identity, load_texts
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
    real = {}  # local corpora by identity: file, or dataset folder + configuration + split
    for name, corpus in corpora:
        texts = check(name, lambda c=corpus, n=name: load_texts(c, n))
        if texts is not None:
            report.notes.append(f"{name} {corpus.path}: {len(texts)} texts")
            report.inputs[name] = texts_fingerprint(texts)
        identity = corpus_identity(corpus)
        if identity is not None:
            real.setdefault(identity, []).append(name)
    for identity, names in real.items():
        if any(n.startswith("data.forget") for n in names) and any(
                n.startswith("data.retain") for n in names):
            report.problems.append(f"data.retain: the same corpus as data.forget ({identity[0]})")
    report.problems += _check_output_dir(recipe, [identity[0] for identity in real])
    report.problems += hardware_problems(recipe) + attention_problems(recipe)
    report.problems += tracker_problems(recipe)
    report.problems += optimizer_problems(recipe)

    tokenizer = check("model.tokenizer", lambda: load_tokenizer(recipe.model))
    config = check("model.path", lambda: load_config(recipe))
    reference = recipe.model.reference
    if recipe.algorithm.reference_losses and reference not in ("copy", "none"):
        check("model.reference", lambda: _other_model_config(recipe, reference, "model.reference"))
    report.problems += _eval_problems(recipe, check)
    if config is None:
        return report
    report.problems += length_problems(recipe, config)
    if tokenizer is not None:
        report.problems += vocabulary_problems(recipe, tokenizer, config)
    report.inputs["model"] = model_fingerprint(recipe.model)
    skeleton = check("model.path", lambda: model_skeleton(config, recipe))
    if skeleton is None:
        return report
    steering = steering_problems(recipe, config, skeleton)
    adapters = adapter_problems(recipe, config)
    report.problems += steering + adapters
    if not steering and not adapters:
        shape = model_shape(skeleton, recipe)
        have, where = available_bytes(recipe)
        need = estimate(recipe, shape).total
        report.notes.append(f"memory: about {gib(need)} GiB needed per device, {gib(have)} GiB "
                            f"in {where} (the table: blurctl memory RECIPE)")
        report.problems += memory_problems(recipe, shape, have, where)
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
