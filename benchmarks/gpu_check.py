"""One-GPU check: BLUR and penalty steps on a ~100M-parameter random Llama in bf16 with
gradient checkpointing, then `blurctl run` on it and evaluation on the GPU.

    python benchmarks/gpu_check.py                      # on the GPU (scripts/gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code on a 0.2M model, CPU

Prints, per combiner: step time, peak memory (torch.cuda.max_memory_allocated; none on
CPU), tokens per second; the blur / penalty ratios; and for the pipeline: the time of a
few `blurctl run` steps, the GPU memory still allocated after them, and the evaluation's
time, device, dtype and peak memory.
Everything is written to OUT/gpu_check.json as well.

The steps are the loop's own ``Unlearner.step`` (blurctl/unlearn/loop.py) on
recipes/demo.yaml: NPO forget loss against a frozen copy, GDR retain loss, two backward
passes, the forget gradient set aside, ``combine_``, AdamW; setup is not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # _steps.py beside this file, however this file is loaded
    sys.path.insert(0, HERE)
from _steps import (  # noqa: E402
    demo_recipe,
    ready,
    save_random_llama,
    step_overrides,
    time_combiners,
    tokens_per_step,
)

# hidden, layers, intermediate, heads: ~101M parameters with the embedded 1536-token vocabulary
FULL = (768, 14, 2048, 12)
TINY = (64, 2, 172, 4)


def build_model(folder: Path, tiny: bool) -> int:
    """A random bf16 Llama with the embedded tokenizer, saved into ``folder``; its
    parameter count."""
    return save_random_llama(folder, *(TINY if tiny else FULL), dtype=torch.bfloat16)


def recipe_for(model_dir: Path, device: str, out: Path, *extra: str):
    return demo_recipe(model_dir, device, out, "model.dtype=bfloat16",
                       "train.gradient_checkpointing=true", *extra)


def time_steps(recipe, device: str, steps: int) -> dict[str, dict]:
    """Per combiner: mean step time (ms), peak memory (GiB, GPU only), tokens per second.

    Blocks of each combiner alternate, twice, on one model (``_steps.time_combiners``);
    the peak is measured per block from a reset."""
    with tempfile.TemporaryDirectory() as tmp:
        run = ready(recipe, Path(tmp))
        measured = time_combiners(run, device, steps, rounds=2)
        run.release()
    tokens = tokens_per_step(recipe)
    return {c: {"step_ms": 1000 * m["step_s"],
                "peak_gib": None if m["peak_bytes"] is None else m["peak_bytes"] / 2**30,
                "tokens_per_s": tokens / m["step_s"]} for c, m in measured.items()}


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
        recipe = recipe_for(model_dir, args.device, out / "timing",
                            *step_overrides(batch, length))
        variants = time_steps(recipe, args.device, steps)
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
