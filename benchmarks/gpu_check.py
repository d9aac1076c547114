"""One-GPU check: BLUR and penalty steps on a ~100M-parameter random Llama in bf16 with
gradient checkpointing, then `blurctl run` on it and evaluation on the GPU.

    python benchmarks/gpu_check.py                      # on the GPU (scripts/gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code on a 0.2M model, CPU

Prints, per combiner: step time, peak memory (torch.cuda.max_memory_allocated; none on
CPU), tokens per second; the blur / penalty ratios; and for the pipeline: the time of a
few `blurctl run` steps, the GPU memory still allocated after them, and the evaluation's
time, device, dtype and peak memory.
Everything is written to OUT/gpu_check.json as well.

The steps are the loop's: NPO forget loss against a frozen copy, GDR retain loss, two
backward passes, the forget gradient set aside, ``combine_``, AdamW. The model is prepared
by ``blurctl.models.prepare_for_training`` (the trainable set and checkpointing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
VARIANTS = ("blur", "penalty")
# hidden, layers, intermediate, heads: ~99.6M parameters with the embedded 768-token vocabulary
FULL = (768, 14, 2048, 12)
TINY = (64, 2, 172, 4)


def build_model(folder: Path, tiny: bool) -> int:
    """A random Llama with the embedded tokenizer, saved into ``folder``; its parameter count."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from blurctl.data.bench.build import ensure_benchmark

    hidden, layers, inter, heads = TINY if tiny else FULL
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=768, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_benchmark() / "tokenizer" / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def recipe_for(model_dir: Path, device: str, out: Path, *extra: str):
    from blurctl.recipe import load_recipe

    return load_recipe(DEMO, [f"model.path={model_dir}", "model.dtype=bfloat16",
                              "train.gradient_checkpointing=true", f"hardware.device={device}",
                              f"output_dir={out}", *extra])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(recipe, device: str, steps: int, batch: int, length: int) -> dict[str, dict]:
    """Per combiner: mean step time (ms), peak memory (GiB, GPU only), tokens per second.

    Blocks of each combiner alternate, twice, so both see the same machine conditions;
    the peak is measured per block from a reset."""
    from blurctl.models import frozen_copy, load_model, prepare_for_training
    from blurctl.unlearn.combine import Weights, combine_
    from blurctl.unlearn.loop import take_grads
    from blurctl.unlearn.losses import LossContext, gdr, npo

    model = load_model(recipe.model)
    prepare_for_training(model, recipe)
    model.to(device).train()
    ref = frozen_copy(model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)

    def make_batch() -> dict:
        ids = torch.randint(3, 768, (batch, length), generator=gen)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": ids.to(device)}

    forget, retain, ctx = make_batch(), make_batch(), LossContext(recipe.algorithm)

    def step(variant: str) -> None:
        npo(model, ref, forget, ctx).backward()
        g_f = take_grads(params)
        gdr(model, ref, retain, ctx).backward()
        g_r = take_grads(params)
        combine_(g_f, g_r, variant, Weights())
        for p, d in zip(params, g_r, strict=True):
            p.grad = d
        del g_f
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, float | None] = dict.fromkeys(VARIANTS)
    for v in VARIANTS:  # warm-up (kernels, allocator, AdamW's state)
        step(v)
    for _ in range(2):
        for v in VARIANTS:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(v)
            _sync(device)
            times[v].append((time.perf_counter() - start) / steps)
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**30
                peaks[v] = max(peaks[v] or 0.0, peak)
    tokens = 2 * batch * length  # a forget and a retain batch per step
    return {v: {"step_ms": 1000 * statistics.mean(times[v]), "peak_gib": peaks[v],
                "tokens_per_s": tokens / statistics.mean(times[v])} for v in VARIANTS}


def pipeline(model_dir: Path, device: str, out: Path, tiny: bool) -> dict:
    """`blurctl run` for a few steps (training only), then evaluation of its model on
    ``device``: times, GPU memory still allocated after the run (its model and optimizer
    should be gone), where evaluation ran, its peak memory."""
    from blurctl.evaluate.stage import evaluate
    from blurctl.models import eval_placement
    from blurctl.pipeline.job import run

    steps = ["train.max_steps=3", "train.batch_size=4", "data.max_len=256"]
    evals = ["eval.compare_base=false", f"eval.muse.max_examples={3 if tiny else 8}",
             "eval.bootstrap=0", f"eval.lm_eval.limit={4 if tiny else 20}"]
    trained = recipe_for(model_dir, device, out / "run", *steps, "eval.muse=null",
                         "eval.lm_eval=null")
    start = time.perf_counter()
    run(trained)
    run_s = time.perf_counter() - start
    left = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    recipe = recipe_for(model_dir, device, out / "run", *steps, *evals)
    placement = eval_placement(recipe)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = evaluate(recipe, str(out / "run" / "model"), out / "run")
    eval_s = time.perf_counter() - start
    return {"run_3_steps_s": run_s, "allocated_after_run_gib": left, "eval_s": eval_s, "eval_device": placement.device,
            "eval_dtype": str(placement.dtype or "checkpoint's own").removeprefix("torch."),
            "eval_peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                              if device == "cuda" else None),
            "scores": results["models"]["unlearned"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 0.2M-parameter model, short runs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block")
    parser.add_argument("--out", type=Path, default=None, help="folder for the model and results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on "
              "a GPU machine, or the CPU version: python benchmarks/gpu_check.py --device cpu "
              "--tiny", file=sys.stderr)
        return 2
    steps = args.steps or (2 if args.tiny else 10)
    batch, length = (2, 64) if args.tiny else (8, 512)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        model_dir = out / "model"
        params = build_model(model_dir, args.tiny)
        recipe = recipe_for(model_dir, args.device, out / "timing")
        variants = time_steps(recipe, args.device, steps, batch, length)
        report = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "params": params, "dtype": "bfloat16", "gradient_checkpointing": True,
            "batch": batch, "length": length, "steps": steps, "variants": variants,
            "blur_over_penalty_time": variants["blur"]["step_ms"] / variants["penalty"]["step_ms"],
            "blur_over_penalty_peak": (
                variants["blur"]["peak_gib"] / variants["penalty"]["peak_gib"]
                if args.device == "cuda" else None),
            "pipeline": pipeline(model_dir, args.device, out, args.tiny),
        }
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        print_report(report)
    return 0


def print_report(r: dict) -> None:
    def gib(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    print(f"{r['device']}: {r['params'] / 1e6:.1f}M-parameter Llama, bf16, gradient "
          f"checkpointing, batch {r['batch']} x {r['length']} tokens, "
          f"{r['steps']} steps x 2 blocks")
    print(f"{'combiner':<10}{'step ms':>10}{'peak GiB':>10}{'tokens/s':>12}")
    for v, row in r["variants"].items():
        print(f"{v:<10}{row['step_ms']:>10.1f}{gib(row['peak_gib']):>10}{row['tokens_per_s']:>12.0f}")
    peak = r["blur_over_penalty_peak"]
    print(f"blur / penalty: time {r['blur_over_penalty_time']:.3f}, peak memory "
          f"{'-' if peak is None else f'{peak:.3f}'}")
    p = r["pipeline"]
    print(f"blurctl run, 3 steps: {p['run_3_steps_s']:.1f} s, "
          f"{gib(p['allocated_after_run_gib'])} GiB still allocated after it; evaluation on "
          f"{p['eval_device']} ({p['eval_dtype']}): {p['eval_s']:.1f} s, "
          f"peak {gib(p['eval_peak_gib'])} GiB")


if __name__ == "__main__":
    sys.exit(main())
