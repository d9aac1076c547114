"""The unlearning loop: forget pass, retain pass, combine, step. Reads top to bottom.

Each optimizer step sees ``grad_accum`` forget micro-batches and as many retain
micro-batches. The forget gradients are accumulated first and set aside (the one
extra gradient-sized buffer), then the retain gradients; ``combine_`` turns the
pair into the update direction, which is clipped and handed to the optimizer.
Batches are drawn from seeded permutations indexed by the global step, so a run
is reproducible, resumes exactly, and every rank of a distributed run takes its
slice of the same global batch.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from blurctl.data.corpora import collate, corpus_chunks
from blurctl.errors import BlurctlError
from blurctl.models import (
    check_model_config,
    decoder_layers,
    frozen_copy,
    load_model,
    load_tokenizer,
)
from blurctl.progress import progress_bar
from blurctl.recipe import Recipe, grad_accum, per_corpus
from blurctl.rundir import LOG as LOG_FILENAME
from blurctl.rundir import MODEL as MODEL_DIRNAME
from blurctl.unlearn import checkpoint as ckpt
from blurctl.unlearn.combine import Weights, combine_
from blurctl.unlearn.losses import FORGET_LOSSES, RETAIN_LOSSES, LossContext, control_vector, nll


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each rank uses at each micro-step, from seeded permutations."""

    size: int
    micro_batch: int
    world: int
    rank: int
    seed: int
    shuffle: bool = True

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
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()


def steps_per_epoch(n_forget: int, recipe: Recipe, world: int) -> int:
    per_step = recipe.train.batch_size * grad_accum(recipe) * world
    return max(1, math.ceil(n_forget / per_step))


def select_trainable(model: torch.nn.Module, recipe: Recipe) -> None:
    """RMU trains only the chosen parameters of the chosen layers; other methods train all.

    ``check_model_config`` has already checked that the layers and parameters exist.
    """
    if recipe.algorithm.uses_rmu:
        for name, p in model.named_parameters():
            p.requires_grad_(recipe.steering.trains(name))


def _make_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    hw = recipe.hardware
    return Accelerator(cpu=hw.device == "cpu" or not torch.cuda.is_available(),
                       mixed_precision=hw.mixed_precision)


def _optimizer(params: list[torch.nn.Parameter], recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    tr = recipe.train
    if tr.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=tr.lr, eps=tr.adam_eps, weight_decay=tr.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=tr.lr, weight_decay=tr.weight_decay)
    name = "constant_with_warmup" if tr.scheduler == "constant" else tr.scheduler
    return opt, get_scheduler(name, opt, num_warmup_steps=tr.warmup_steps,
                              num_training_steps=total_steps)


def _shard_fsdp(model: torch.nn.Module) -> None:
    """Shard each decoder layer and the root with torch FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _take_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Detach the accumulated gradients from ``params`` (zeros where none flowed)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def _reference(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """The frozen pi_ref: a copy of the starting model, or the model at ``model.reference``."""
    if recipe.model.reference == "copy":
        return frozen_copy(model)
    return frozen_copy(load_model(recipe.model, path=recipe.model.reference,
                                  field_name="model.reference"))


def _task_vector_loss(model, ref, batch, ctx) -> torch.Tensor:
    """Task vector: fine-tune *towards* D_f; the difference is subtracted afterwards."""
    return nll(model, batch)


def unlearn(recipe: Recipe, run_dir: Path, resume: bool = False) -> Path:
    """Run unlearning as the recipe says; return the folder of the saved model."""
    from accelerate.utils import set_seed

    accelerator = _make_accelerator(recipe)
    set_seed(recipe.seed)
    alg, tr = recipe.algorithm, recipe.train
    world, rank = accelerator.num_processes, accelerator.process_index
    fsdp = recipe.hardware.strategy == "fsdp" and world > 1

    tokenizer = load_tokenizer(recipe.model)

    forget_sets = corpus_chunks(recipe.data.forget, "data.forget", tokenizer, recipe.data)
    retain_sets = (corpus_chunks(recipe.data.retain, "data.retain", tokenizer, recipe.data)
                   if recipe.data.retain and alg.retain_loss else [])
    n_corpora = len(forget_sets)

    check_model_config(recipe)  # from the config alone, before any weights load
    model = load_model(recipe.model)
    select_trainable(model, recipe)
    ref = _reference(model, recipe) if alg.reference_losses else None
    base_state = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                  if alg.combiner == "task_vector" else None)
    contexts = [LossContext(alg, recipe.steering,
                            control_vector(model.config.hidden_size, recipe.steering.seed + c)
                            if recipe.steering else None,
                            per_corpus(recipe.steering.coeff, c) if recipe.steering else 0.0)
                for c in range(n_corpora)]
    model.train()

    per_epoch = steps_per_epoch(sum(len(f) for f in forget_sets), recipe, world)
    total = tr.max_steps or per_epoch * tr.epochs
    if fsdp:
        model.to(accelerator.device)
        _shard_fsdp(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, recipe, total)
    if fsdp:
        all_reduce = _sum_across_ranks
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        all_reduce = None  # DDP has already averaged the gradients across ranks
    if ref is not None:
        ref = ref.to(accelerator.device)

    start = 0
    if resume:
        start = ckpt.restore_latest(run_dir, model, optimizer, scheduler, fsdp)
        if start >= total:
            accelerator.print(f"resume: run already finished at step {start}")

    shuffle = recipe.data.shuffle
    forget_plans = [BatchPlan(len(f), tr.batch_size, world, rank, recipe.seed + 1000 * c, shuffle)
                    for c, f in enumerate(forget_sets)]
    retain_plans = [BatchPlan(len(r), tr.batch_size, world, rank, recipe.seed + 1000 * c + 1, shuffle)
                    for c, r in enumerate(retain_sets)]
    forget_fn = _task_vector_loss if alg.combiner == "task_vector" else FORGET_LOSSES[alg.forget_loss]
    retain_fn = RETAIN_LOSSES[alg.retain_loss] if alg.retain_loss else None
    combiner = "penalty" if alg.combiner == "task_vector" else alg.combiner
    weights = [Weights(alg.forget_weight, per_corpus(alg.retain_weight, c), alg.eps)
               for c in range(n_corpora)]
    pad = tokenizer.pad_token_id
    accum = grad_accum(recipe)

    def micro_batches(plan: BatchPlan, chunks: list[list[int]], step: int) -> list[dict]:
        batches = [collate([chunks[i] for i in plan.indices(step * accum + k)], pad)
                   for k in range(accum)]
        counts = torch.tensor([[(b["labels"][:, 1:] != -100).sum(), b["attention_mask"].sum()]
                               for b in batches], dtype=torch.float64).sum(0)
        if world > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        norm = counts / (world * accum)
        for b in batches:
            b["target_tokens"], b["input_tokens"] = norm[0].float(), norm[1].float()
        return [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches]

    def accumulate(loss_fn, batches: list[dict], ctx: LossContext) -> torch.Tensor:
        total_loss = torch.zeros((), device=accelerator.device)
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1
            if fsdp:
                model.set_requires_gradient_sync(sync)
                context = nullcontext()
            else:
                context = nullcontext() if sync else accelerator.no_sync(model)
            with context, accelerator.autocast():
                loss = loss_fn(model, ref, batch, ctx) / accum
            accelerator.backward(loss)
            total_loss += loss.detach()
        return total_loss

    stop = _StopOnSignal()
    log = ckpt.open_log(run_dir / LOG_FILENAME, start) if accelerator.is_main_process else None
    desc = (f"unlearning ({alg.combiner}: {alg.forget_loss}"
            f"{'+' + alg.retain_loss if alg.retain_loss else ''})")
    try:
        with progress_bar(desc, total, start) as advance:
            for step in range(start, total):
                corpus, turn = step % n_corpora, step // n_corpora  # corpora take turns
                r_corpus = corpus if len(retain_sets) > 1 else 0
                f_loss = accumulate(forget_fn, micro_batches(
                    forget_plans[corpus], forget_sets[corpus], turn), contexts[corpus])
                g_f = _take_grads(params)
                if retain_fn is not None:
                    r_loss = accumulate(retain_fn, micro_batches(
                        retain_plans[r_corpus], retain_sets[r_corpus], turn), contexts[corpus])
                    g_r = _take_grads(params)
                else:
                    r_loss = torch.zeros((), device=f_loss.device)
                    g_r = [torch.zeros_like(g) for g in g_f]
                stats = combine_([_local(g) for g in g_f], [_local(g) for g in g_r],
                                 combiner, weights[corpus], all_reduce)
                for p, d in zip(params, g_r, strict=True):
                    p.grad = d
                del g_f
                losses = accelerator.reduce(torch.stack([f_loss, r_loss]), reduction="mean").tolist()
                row = {"step": step + 1, "epoch": step // per_epoch + 1, "corpus": corpus,
                       "lr": scheduler.get_last_lr()[0],
                       "forget_loss": losses[0], "retain_loss": losses[1], **stats.as_floats()}
                bad = [k for k, v in row.items() if not math.isfinite(v)]
                if bad:
                    also = f" (also {', '.join(bad[1:])})" if bad[1:] else ""
                    raise BlurctlError(
                        f"step {step + 1}: {bad[0]} is {row[bad[0]]}{also}; stopped before "
                        "the update, so no weights were changed by this step"
                        + ckpt.last_good_hint(run_dir))
                if tr.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, tr.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                stopping = stop.requested(accelerator) and step + 1 < total
                if stopping or (tr.save_every and (step + 1) % tr.save_every == 0 and step + 1 < total):
                    saved = ckpt.save(run_dir, step + 1, model, optimizer, scheduler, fsdp,
                                      accelerator.is_main_process, tr.keep_checkpoints)
                    accelerator.wait_for_everyone()
                if stopping:
                    raise Interrupted(f"stopped by {stop.name} after step {step + 1}; checkpoint "
                                      f"saved in {saved}; continue with --resume")
                advance(f=row["forget_loss"], r=row["retain_loss"], cos=row["cosine"])
    finally:
        stop.restore()
        if log is not None:
            log.close()

    accelerator.wait_for_everyone()
    state = ckpt.full_model_state(model, fsdp) if fsdp else accelerator.get_state_dict(model)
    if base_state is not None and accelerator.is_main_process:
        state = {k: base_state[k] - alg.task_vector_scale * (v.to(base_state[k].device) - base_state[k])
                 for k, v in state.items()}
    target = run_dir / MODEL_DIRNAME
    if accelerator.is_main_process:
        ckpt.save_model_atomically(accelerator.unwrap_model(model), tokenizer, target, state)
    accelerator.wait_for_everyone()
    return target


class Interrupted(BlurctlError):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint first."""

    exit_code = 143


class _StopOnSignal:
    """Turns SIGTERM/SIGINT into a request to stop after the current step."""

    def __init__(self) -> None:
        import signal

        self.name: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        import signal

        self.name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True when any rank was signalled (all ranks agree, one scalar all-reduce)."""
        flag = torch.tensor(float(self.name is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        signalled = flag.item() > 0  # one host sync
        if signalled and self.name is None:
            self.name = "a signal on another rank"
        return signalled

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
