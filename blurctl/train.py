"""The unlearning loop: forget pass, retain pass, combine, step. Reads top to bottom.

Each optimizer step sees ``grad_accum`` forget micro-batches and as many retain
micro-batches. The forget gradients are accumulated first and set aside (the one
extra gradient-sized buffer), then the retain gradients; ``combine_`` turns the
pair into the update direction, which is clipped and handed to the optimizer.
Batches are drawn from seeded permutations indexed by the global step, so a run
is reproducible and every rank of a distributed run takes its slice of the same
global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from blurctl.combine import Weights, combine_
from blurctl.data import chunk_texts, collate, load_texts
from blurctl.errors import BlurctlError
from blurctl.losses import FORGET_LOSSES, NEEDS_REFERENCE, RETAIN_LOSSES
from blurctl.models import frozen_copy, load_model, load_tokenizer
from blurctl.progress import progress_bar
from blurctl.recipe import Recipe

MODEL_DIRNAME = "model"
LOG_FILENAME = "train_log.jsonl"


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each rank uses at each micro-step, from seeded permutations."""

    size: int
    micro_batch: int
    world: int
    rank: int
    seed: int

    def indices(self, position: int) -> list[int]:
        """Indices of this rank's slice of global micro-batch number ``position``."""
        span = self.micro_batch * self.world
        out = []
        for q in range(position * span + self.rank * self.micro_batch,
                       position * span + (self.rank + 1) * self.micro_batch):
            epoch, offset = divmod(q, self.size)
            out.append(self._perm(epoch)[offset])
        return out

    def _perm(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()


def steps_per_epoch(n_forget: int, recipe: Recipe, world: int) -> int:
    per_step = recipe.train.batch_size * recipe.train.grad_accum * world
    return max(1, math.ceil(n_forget / per_step))


def _make_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    hw = recipe.hardware
    return Accelerator(cpu=hw.device == "cpu" or not torch.cuda.is_available(),
                       mixed_precision=hw.mixed_precision)


def _optimizer(params: list[torch.nn.Parameter], recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    tr = recipe.train
    if tr.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=tr.lr, weight_decay=tr.weight_decay)
    name = "constant_with_warmup" if tr.scheduler == "constant" else tr.scheduler
    return opt, get_scheduler(name, opt, num_warmup_steps=tr.warmup_steps,
                              num_training_steps=total_steps)


def _take_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Detach the accumulated gradients from ``params`` (zeros where none flowed)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def save_model_atomically(model, tokenizer, target: Path, state_dict=None) -> None:
    """Write to a sibling temporary folder, then rename: ``target`` is never half-written."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def unlearn(recipe: Recipe, run_dir: Path) -> Path:
    """Run unlearning as the recipe says; return the folder of the saved model."""
    from accelerate.utils import set_seed

    accelerator = _make_accelerator(recipe)
    set_seed(recipe.seed)
    alg, tr = recipe.algorithm, recipe.train

    tokenizer = load_tokenizer(recipe.model, recipe.seed)
    forget = chunk_texts(load_texts(recipe.data.forget, "data.forget", recipe.seed),
                         tokenizer, recipe.data.max_len)
    retain = (chunk_texts(load_texts(recipe.data.retain, "data.retain", recipe.seed),
                          tokenizer, recipe.data.max_len) if recipe.data.retain else [])

    model = load_model(recipe.model, recipe.seed)
    needs_ref = {alg.forget_loss, alg.retain_loss} & NEEDS_REFERENCE
    ref = frozen_copy(model) if needs_ref else None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = steps_per_epoch(len(forget), recipe, world)
    total = tr.max_steps or per_epoch * tr.epochs
    optimizer, scheduler = _optimizer(params, recipe, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    if ref is not None:
        ref = ref.to(accelerator.device)

    forget_plan = BatchPlan(len(forget), tr.batch_size, world, rank, recipe.seed)
    retain_plan = BatchPlan(max(len(retain), 1), tr.batch_size, world, rank, recipe.seed + 1)
    forget_fn = FORGET_LOSSES[alg.forget_loss]
    retain_fn = RETAIN_LOSSES[alg.retain_loss] if alg.retain_loss else None
    weights = Weights(alg.forget_weight, alg.retain_weight, alg.eps)
    all_reduce = None  # DDP has already averaged the gradients across ranks
    pad = tokenizer.pad_token_id

    def accumulate(loss_fn, plan: BatchPlan, chunks: list[list[int]], step: int) -> torch.Tensor:
        total_loss = torch.zeros((), device=accelerator.device)
        for k in range(tr.grad_accum):
            batch = collate([chunks[i] for i in plan.indices(step * tr.grad_accum + k)], pad)
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            sync = k == tr.grad_accum - 1
            with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                loss = loss_fn(model, ref, batch, alg) / tr.grad_accum
            accelerator.backward(loss)
            total_loss += loss.detach()
        return total_loss

    log_path = run_dir / LOG_FILENAME
    log = open(log_path, "w") if accelerator.is_main_process else None
    try:
        with progress_bar(f"unlearning ({alg.combiner}: {alg.forget_loss}"
                          f"{'+' + alg.retain_loss if alg.retain_loss else ''})", total) as advance:
            for step in range(total):
                f_loss = accumulate(forget_fn, forget_plan, forget, step)
                g_f = _take_grads(params)
                if retain_fn is not None:
                    r_loss = accumulate(retain_fn, retain_plan, retain, step)
                    g_r = _take_grads(params)
                else:
                    r_loss = torch.zeros(())
                    g_r = [torch.zeros_like(g) for g in g_f]
                stats = combine_(g_f, g_r, alg.combiner, weights, all_reduce)
                for p, d in zip(params, g_r):
                    p.grad = d
                del g_f
                losses = accelerator.reduce(torch.stack([f_loss, r_loss.to(f_loss.device)]),
                                            reduction="mean").tolist()
                row = {"step": step + 1, "epoch": step // per_epoch + 1,
                       "lr": scheduler.get_last_lr()[0],
                       "forget_loss": losses[0], "retain_loss": losses[1], **stats.as_floats()}
                bad = [k for k, v in row.items() if not math.isfinite(v)]
                if bad:
                    also = f" (also {', '.join(bad[1:])})" if bad[1:] else ""
                    raise BlurctlError(
                        f"step {step + 1}: {bad[0]} is {row[bad[0]]}{also}; stopped before "
                        "the update, so no weights were changed by this step")
                if tr.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, tr.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                advance(f=row["forget_loss"], r=row["retain_loss"], cos=row["cosine"])
    finally:
        if log is not None:
            log.close()

    accelerator.wait_for_everyone()
    target = run_dir / MODEL_DIRNAME
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_model_atomically(accelerator.unwrap_model(model), tokenizer, target, state)
    accelerator.wait_for_everyone()
    return target
