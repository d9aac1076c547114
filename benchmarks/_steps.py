"""What the step benchmarks (step_cost.py, gpu_check.py) share: a random Llama with the
embedded tokenizer, a recipe for it from recipes/demo.yaml, and timed calls of the loop's
own ``Unlearner.step`` (so they measure what ``blurctl run`` runs, setup excluded)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
COMBINERS = ("blur", "penalty")
WARMUP = 1  # untimed steps per combiner before the timed ones


def save_random_llama(folder: Path, hidden: int, layers: int, intermediate: int, heads: int,
                      dtype: torch.dtype = torch.float32) -> int:
    """A seeded random Llama with the embedded tokenizer, saved into ``folder``; its
    parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from blurctl.data.bench.build import ensure_benchmark

    tokenizer = AutoTokenizer.from_pretrained(ensure_benchmark() / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_benchmark() / "tokenizer" / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def demo_recipe(model_dir: Path, device: str, out: Path, *overrides: str):
    """recipes/demo.yaml (NPO + GDR on the embedded corpus) on the model in ``model_dir``,
    on ``device``, writing under ``out``; ``overrides`` as on the command line."""
    from blurctl.recipe import load_recipe

    return load_recipe(DEMO, [f"model.path={model_dir}", f"hardware.device={device}",
                              f"output_dir={out}", *overrides])


def step_overrides(batch: int, length: int) -> list[str]:
    """Batches of ``batch`` chunks of ``length`` tokens, and a small learning rate (random
    weights stay finite over many steps)."""
    return [f"train.batch_size={batch}", f"data.max_len={length}", "train.lr=1e-5"]


def ready(recipe, run_dir: Path):
    """``Unlearner(recipe, run_dir)`` after ``setup()``: data, model, reference (or the
    precomputed log-probabilities), optimizer."""
    from blurctl.unlearn.loop import Unlearner

    run = Unlearner(recipe, run_dir)
    run.setup()
    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_combiners(run, device: str, steps: int, rounds: int) -> dict[str, dict]:
    """Per combiner: mean seconds of ``run.step`` and, on CUDA, the allocator's peak bytes
    (else None).

    One model, one optimizer: each round runs a block of ``steps`` steps per combiner
    (``run.combiner`` switched between blocks, which goes first alternating by round), on
    the same batches, so both combiners see the same batches and machine conditions.
    ``WARMUP`` steps per combiner first warm up kernels, the allocator and the optimizer's
    state (a fresh model's first steps run slow on the CPU); the peak is taken per block,
    from a reset."""
    cuda = device == "cuda"
    seconds = dict.fromkeys(COMBINERS, 0.0)
    peaks: dict[str, int | None] = dict.fromkeys(COMBINERS)
    for i in range(WARMUP):
        for combiner in COMBINERS:
            run.combiner = combiner
            run.step(i)
    for r in range(rounds):
        for combiner in COMBINERS[::-1] if r % 2 else COMBINERS:  # neither always goes first
            run.combiner = combiner
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for k in range(steps):
                run.step(WARMUP + r * steps + k)
            sync(device)
            seconds[combiner] += time.perf_counter() - start
            if cuda:
                peaks[combiner] = max(peaks[combiner] or 0, torch.cuda.max_memory_allocated())
    return {c: {"step_s": seconds[c] / (steps * rounds), "peak_bytes": peaks[c]}
            for c in COMBINERS}


def peak_of_steps(run, device: str, steps: int) -> int:
    """Peak bytes while ``run.step`` runs ``steps`` times after a warm-up step: the CUDA
    allocator's peak, or on the CPU the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs; Linux)."""
    run.step(0)  # the optimizer's state, the allocator's pools
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    for i in range(1, steps + 1):
        run.step(i)
    sync(device)
    return torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tokens_per_step(recipe) -> int:
    """Tokens a step feeds forward: a forget and a retain batch of ``data.max_len``
    (padded) tokens per micro-batch."""
    from blurctl.recipe import grad_accum

    return 2 * recipe.train.batch_size * grad_accum(recipe) * recipe.data.max_len
