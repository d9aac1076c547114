"""The unlearning loop: forget pass, retain pass, combine, step.

``Unlearner`` holds one run's training objects: ``setup()`` loads data and models and
builds the optimizer, ``step(i)`` performs optimizer step ``i`` and returns its log row,
``finish()`` saves the model. ``unlearn`` drives them with the log, checkpoints, progress
bar and signal handling.

Each optimizer step sees ``grad_accum`` forget micro-batches and as many retain
micro-batches. The forget gradients are accumulated first and set aside (the one
extra gradient-sized buffer), then the retain gradients; ``combine_`` turns the
pair into the update direction, which is clipped and handed to the optimizer.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import torch

from blurctl.data.corpora import collate, corpus_chunks
from blurctl.errors import BlurctlError
from blurctl.models import (
    check_model_config,
    enable_gradient_checkpointing,
    frozen_copy,
    load_model,
    load_tokenizer,
    prepare_for_training,
    release_memory,
)
from blurctl.progress import progress_bar
from blurctl.recipe import Recipe, grad_accum, per_corpus
from blurctl.rundir import RunDir
from blurctl.unlearn import checkpoint as ckpt
from blurctl.unlearn import lora
from blurctl.unlearn.batches import BatchPlan, steps_per_epoch
from blurctl.unlearn.combine import Weights, combine_
from blurctl.unlearn.losses import (
    FORGET_LOSSES,
    RETAIN_LOSSES,
    LossContext,
    control_vector,
    sequence_logprob,
)
from blurctl.unlearn.methods import METHODS
from blurctl.unlearn.optim import make_optimizer
from blurctl.unlearn.strategy import make_strategy
from blurctl.unlearn.tracking import flat_config, score_values


class Unlearner:
    """One run's training objects and its step."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        from accelerate import Accelerator

        self.recipe, self.run_dir = recipe, RunDir(run_dir)
        hw = recipe.hardware
        self.accelerator = Accelerator(cpu=hw.device == "cpu" or not torch.cuda.is_available(),
                                       mixed_precision=hw.mixed_precision,
                                       log_with=recipe.train.report_to or None,
                                       project_dir=self.run_dir.tracking)
        self.uses_lora = recipe.peft is not None  # LoRA (peft): the adapters' states are saved
        self.strategy = (lora.AdapterStates(self.accelerator) if self.uses_lora
                         else make_strategy(self.accelerator, hw.strategy))
        self.method = METHODS.get(recipe.algorithm.combiner)
        self.accum = grad_accum(recipe)

    def setup(self, resume: bool = False) -> int:
        """Load data and models, build the optimizer; the step to start from."""
        from accelerate.utils import set_seed

        set_seed(self.recipe.seed)
        self.tokenizer = load_tokenizer(self.recipe.model)
        self._load_data()
        # from the config alone, before any weights load
        check_model_config(self.recipe, self.tokenizer)
        self._load_models()
        world = self.accelerator.num_processes
        self.per_epoch = steps_per_epoch(sum(len(f) for f in self.forget_sets), self.recipe, world)
        self.total = self.recipe.train.max_steps or self.per_epoch * self.recipe.train.epochs
        model = self.strategy.shard(self.model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer, self.scheduler = make_optimizer(self.params, self.recipe, self.total)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer)
        if self.reference is not None:
            self.reference = self.reference.to(self.accelerator.device)
        self.ref_logps = self._reference_logps() if self.recipe.train.precompute_reference else None
        start = 0
        if resume:
            start = ckpt.restore_latest(self.run_dir.path, self.model, self.optimizer,
                                        self.scheduler, self.strategy)
            if start >= self.total:
                self.accelerator.print(f"resume: run already finished at step {start}")
        return start

    def _load_data(self) -> None:
        """Token chunks of every corpus and the batch plan drawing from each."""
        recipe, data = self.recipe, self.recipe.data
        self.forget_sets = corpus_chunks(data.forget, "data.forget", self.tokenizer, data)
        self.retain_sets = (corpus_chunks(data.retain, "data.retain", self.tokenizer, data)
                            if data.retain and recipe.algorithm.retain_loss else [])
        world, rank = self.accelerator.num_processes, self.accelerator.process_index

        def plan(chunks: list, seed: int) -> BatchPlan:
            return BatchPlan(len(chunks), recipe.train.batch_size, world, rank, seed, data.shuffle)
        self.forget_plans = [plan(f, recipe.seed + 1000 * c) for c, f in enumerate(self.forget_sets)]
        self.retain_plans = [plan(r, recipe.seed + 1000 * c + 1)
                             for c, r in enumerate(self.retain_sets)]

    def _load_models(self) -> None:
        """The model (RMU: only its steered parameters train; LoRA: only the adapters), pi_ref
        where a loss needs it, the starting weights where the method rewrites the final ones,
        the losses."""
        recipe, alg, steering = self.recipe, self.recipe.algorithm, self.recipe.steering
        self.model = load_model(recipe.model)
        if self.uses_lora:  # adapters train: on RMU's modules, or peft's targets
            enable_gradient_checkpointing(self.model, recipe)
            self.model = lora.wrap(self.model, recipe)
        else:
            prepare_for_training(self.model, recipe)  # RMU's parameters, gradient checkpointing
        self.reference = None
        if alg.reference_losses and not recipe.train.precompute_reference:
            if self.uses_lora and recipe.model.reference == "copy":
                self.reference = lora.AdaptersDisabled(self.model)  # the base model, no copy
            else:
                self.reference = frozen_copy(self.model if recipe.model.reference == "copy" else
                                             load_model(recipe.model, path=recipe.model.reference,
                                                        field_name="model.reference"))
        self.start_state = None
        if self.method is not None and self.method.finish is not None and not self.uses_lora:
            self.start_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.contexts = [LossContext(alg, steering,
                                     control_vector(self.model.config.hidden_size, steering.seed + c)
                                     if steering else None,
                                     per_corpus(steering.coeff, c) if steering else 0.0)
                         for c in range(len(self.forget_sets))]
        self.weights = [Weights(alg.forget_weight, per_corpus(alg.retain_weight, c), alg.eps)
                        for c in range(len(self.forget_sets))]
        self.forget_fn = (self.method and self.method.forget_fn) or FORGET_LOSSES[alg.forget_loss].fn
        self.retain_fn = RETAIN_LOSSES[alg.retain_loss].fn if alg.retain_loss else None
        self.combiner = self.method.combiner if self.method else alg.combiner
        self.model.train()

    def _reference_logps(self) -> list[torch.Tensor]:
        """log pi_ref of every forget chunk, per corpus: read from the run folder (a resumed
        run) or computed once with the starting model (or ``model.reference``) and saved."""
        cache = self.run_dir.reference_logps
        if cache.is_file():
            return torch.load(cache)
        recipe, size = self.recipe, self.recipe.train.batch_size
        ref = self.model if recipe.model.reference == "copy" else load_model(
            recipe.model, path=recipe.model.reference, field_name="model.reference").to(
            self.accelerator.device)
        ref.eval()
        logps = []
        batches = sum(math.ceil(len(chunks) / size) for chunks in self.forget_sets)
        with torch.no_grad(), progress_bar("reference log-probs", batches) as advance:
            for chunks in self.forget_sets:
                values = []
                for i in range(0, len(chunks), size):
                    batch = collate(chunks[i:i + size], self.tokenizer.pad_token_id)
                    with self.accelerator.autocast():
                        values.append(sequence_logprob(ref, {k: v.to(self.accelerator.device)
                                                             for k, v in batch.items()})[0].cpu())
                    advance()
                logps.append(torch.cat(values))
        self.model.train()
        if self.accelerator.is_main_process:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(logps, cache)
        return logps

    def _micro_batches(self, plan: BatchPlan, chunks: list[list[int]], step: int,
                       ref_logps: torch.Tensor | None = None) -> list[dict]:
        """The step's micro-batches on the device, each carrying the global token counts
        that make per-rank, per-micro-batch losses add up to the step's mean (and, where
        precomputed, each chunk's log pi_ref)."""
        accelerator, world = self.accelerator, self.accelerator.num_processes
        batches = []
        for k in range(self.accum):
            indices = plan.indices(step * self.accum + k)
            batches.append(collate([chunks[i] for i in indices], self.tokenizer.pad_token_id))
            if ref_logps is not None:
                batches[-1]["ref_logp"] = ref_logps[indices]
        counts = torch.tensor([[(b["labels"][:, 1:] != -100).sum(), b["attention_mask"].sum()]
                               for b in batches], dtype=torch.float64).sum(0)
        if world > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        norm = counts / (world * self.accum)
        for b in batches:
            b["target_tokens"], b["input_tokens"] = norm[0].float(), norm[1].float()
        return [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches]

    def _accumulate(self, loss_fn, batches: list[dict], ctx: LossContext) -> torch.Tensor:
        """Backward through every micro-batch (gradients synchronised on the last); the loss."""
        total = torch.zeros((), device=self.accelerator.device)
        for k, batch in enumerate(batches):
            with self.strategy.sync(self.model, last=k == len(batches) - 1), \
                    self.accelerator.autocast():
                loss = loss_fn(self.model, self.reference, batch, ctx) / self.accum
            self.accelerator.backward(loss)
            total += loss.detach()
        return total

    def step(self, step: int) -> dict:
        """Optimizer step ``step`` (0-based); its log row. Raises before the update when a
        logged value is not finite, so no weights change."""
        n_corpora = len(self.forget_sets)
        corpus, turn = step % n_corpora, step // n_corpora  # forget corpora take turns
        r_corpus = corpus if len(self.retain_sets) > 1 else 0
        ctx = self.contexts[corpus]
        f_loss = self._accumulate(self.forget_fn, self._micro_batches(
            self.forget_plans[corpus], self.forget_sets[corpus], turn,
            self.ref_logps[corpus] if self.ref_logps else None), ctx)
        g_f = take_grads(self.params)
        if self.retain_fn is not None:
            if self.recipe.train.offload_forget_grad:  # off the accelerator for the retain pass
                g_f = [g.to("cpu") for g in g_f]
            r_loss = self._accumulate(self.retain_fn, self._micro_batches(
                self.retain_plans[r_corpus], self.retain_sets[r_corpus], turn), ctx)
            g_r = take_grads(self.params)
            g_f = [f.to(r.device) for f, r in zip(g_f, g_r, strict=True)]
        else:  # a zero retain gradient, allocated each step, so one combine serves all
            r_loss = torch.zeros((), device=f_loss.device)
            g_r = [torch.zeros_like(g) for g in g_f]
        local = self.strategy.local
        stats = combine_([local(g) for g in g_f], [local(g) for g in g_r], self.combiner,
                         self.weights[corpus], self.strategy.all_reduce)
        for p, d in zip(self.params, g_r, strict=True):
            p.grad = d
        del g_f
        losses = self.accelerator.reduce(torch.stack([f_loss, r_loss]), reduction="mean").tolist()
        row = {"step": step + 1, "epoch": step // self.per_epoch + 1, "corpus": corpus,
               "lr": self.scheduler.get_last_lr()[0],
               "forget_loss": losses[0], "retain_loss": losses[1], **stats.as_floats()}
        self._check_finite(row)
        if self.recipe.train.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.recipe.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return row

    def _check_finite(self, row: dict) -> None:
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            also = f" (also {', '.join(bad[1:])})" if bad[1:] else ""
            raise BlurctlError(
                f"step {row['step']}: {bad[0]} is {row[bad[0]]}{also}; stopped before the "
                "update, so no weights were changed by this step"
                + ckpt.last_good_hint(self.run_dir.path))

    def save_checkpoint(self, step: int) -> Path:
        """Checkpoint after ``step`` optimizer steps (every rank takes part); it also holds
        the model's config (LoRA: the adapter in peft's layout) and tokenizer, so
        ``blurctl eval --model`` can load it."""
        def describe(folder: Path) -> None:
            model = self.accelerator.unwrap_model(self.model)
            if self.uses_lora:  # loadable as base + adapter
                lora.describe(model, folder)
            else:
                model.config.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
        saved = ckpt.save(self.run_dir.path, step, self.model, self.optimizer, self.scheduler,
                          self.strategy, self.accelerator.is_main_process,
                          self.recipe.train.keep_checkpoints, describe)
        self.accelerator.wait_for_everyone()
        return saved

    def save_model(self, target: Path) -> Path:
        """Save the model as it is now into ``target`` (a loadable model folder), rewritten
        by the method's finish (task vector) where it has one; LoRA: the adapter beside it
        (``RunDir.adapter_of``) and the merged model in it. Every rank takes part."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        state = self.strategy.model_state(self.model)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.model)
            if self.uses_lora:
                if self.method is not None and self.method.finish_adapter is not None:
                    state = self.method.finish_adapter(state, self.recipe.algorithm)
                model, state = lora.save(model, state, self.run_dir.adapter_of(target),
                                         self.tokenizer)
            elif self.start_state is not None:
                state = self.method.finish(state, self.start_state, self.recipe.algorithm)
            ckpt.save_model_atomically(model, self.tokenizer, target, state)
        accelerator.wait_for_everyone()
        return target

    def finish(self) -> Path:
        """Save the trained model in the run folder's ``model/``; its folder."""
        return self.save_model(self.run_dir.model)

    def train(self, resume: bool = False) -> Path:
        """Set up, run every step (logged, checkpointed, per-epoch models saved, stopped
        cleanly by SIGTERM/SIGINT), save the model; its folder."""
        start = self.setup(resume)
        tr, accelerator = self.recipe.train, self.accelerator
        accelerator.init_trackers(self.run_dir.path.name, config=flat_config(self.recipe))
        stop = StopOnSignal()
        log = self.run_dir.open_log(start) if accelerator.is_main_process else None
        try:
            with progress_bar(self.description, self.total, start) as advance:
                for step in range(start, self.total):
                    row = self.step(step)
                    if log is not None:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
                    done = step + 1
                    if tr.save_every_epoch and (done % self.per_epoch == 0 or done == self.total):
                        self.save_model(self.run_dir.epoch(math.ceil(done / self.per_epoch)))
                    stopping = stop.requested(accelerator) and done < self.total
                    if stopping or (tr.save_every and done % tr.save_every == 0 and done < self.total):
                        saved = self.save_checkpoint(done)
                    if stopping:
                        raise Interrupted(f"stopped by {stop.name} after step {done}; "
                                          f"checkpoint saved in {saved}; continue with --resume")
                    advance(f=row["forget_loss"], r=row["retain_loss"], cos=row["cosine"])
        finally:
            stop.restore()
            if log is not None:
                log.close()
        return self.finish()

    def release(self) -> None:
        """Drop the model, reference and optimizer and free their memory now (the trackers
        stay open)."""
        self.model = self.reference = self.optimizer = self.scheduler = None
        self.params, self.start_state = [], None
        self.accelerator.free_memory()
        release_memory()

    @property
    def description(self) -> str:
        alg = self.recipe.algorithm
        return (f"unlearning ({alg.combiner}: {alg.forget_loss}"
                f"{'+' + alg.retain_loss if alg.retain_loss else ''})")

    def log_scores(self, results: dict) -> None:
        """Send the evaluation scores to the trackers, at the last step."""
        self.accelerator.log(score_values(results), step=self.total)


def take_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Detach the accumulated gradients from ``params`` (zeros where none flowed)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def unlearn(recipe: Recipe, run_dir: Path, resume: bool = False) -> Path:
    """Run unlearning as the recipe says; return the folder of the saved model."""
    run = Unlearner(recipe, run_dir)
    model_dir = run.train(resume)
    run.accelerator.end_training()
    return model_dir


class Interrupted(BlurctlError):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint first."""

    exit_code = 143


class StopOnSignal:
    """Turns SIGTERM/SIGINT into a request to stop after the current step."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True when any rank was signalled (all ranks agree: accelerate's trigger, one
        scalar all-reduce)."""
        if self.name is not None:
            accelerator.set_trigger()
        signalled = accelerator.check_trigger()
        if signalled and self.name is None:
            self.name = "a signal on another rank"
        return signalled

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
