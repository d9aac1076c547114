"""Step time and peak memory of BLUR against the penalty combiner, through the loop itself.

    python benchmarks/step_cost.py                    # ~0.3M and ~29M-parameter Llamas, CPU
    python benchmarks/step_cost.py --threads 1        # steadier times on a shared CPU
    python benchmarks/step_cost.py --sizes 4096:32    # hidden:layers, on a GPU if present

Each step is ``blurctl.unlearn.loop.Unlearner.step`` on a random Llama with the embedded
tokenizer, the recipe recipes/demo.yaml (NPO forget loss, GDR retain loss, AdamW) with
batch, length and device overridden. Four settings:
  full              every parameter trains, a frozen reference copy
  checkpointing     train.gradient_checkpointing=true
  precomputed ref   train.precompute_reference=true: log pi_ref computed once, no reference
  lora r=8          a peft section with r=8: only the adapters train
and two combiners, blur and penalty; both make the same two backward passes and hold the
forget gradient beside the retain gradient; they differ in how they combine the pair.
Step times of the two combiners are interleaved in one process, on one model (setup not
timed), so their ratio shares machine conditions. Peak memory is measured per (setting,
combiner) in a fresh process: the CUDA allocator's peak on a GPU, peak RSS on the CPU.
Memory differences are given in units of one full-parameter gradient buffer (every
parameter, the model's dtype) and of one trainable-parameter gradient (the adapters with
LoRA). The goal: blur within 1.05x penalty's time and at most one extra trainable
gradient buffer. A second table gives the peak memory the precomputed reference saves
against full. ``--json FILE`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # _steps.py beside this file, however this file is loaded
    sys.path.insert(0, HERE)
from _steps import (  # noqa: E402
    COMBINERS,
    demo_recipe,
    peak_of_steps,
    ready,
    save_random_llama,
    step_overrides,
    time_combiners,
)

SETTINGS: dict[str, list[str]] = {
    "full": [],
    "checkpointing": ["train.gradient_checkpointing=true"],
    "precomputed ref": ["train.precompute_reference=true"],
    "lora r=8": ["peft.r=8"],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEMORY_STEPS = 2
MIB = 2**20


def recipe(model_dir: Path, setting: str, combiner: str, args, out: Path):
    return demo_recipe(model_dir, args.device, out, *step_overrides(args.batch, args.seq),
                       f"algorithm.combiner={combiner}", *SETTINGS[setting])


def time_setting(model_dir: Path, setting: str, args) -> dict:
    """Both combiners' mean step seconds in one setting, interleaved step by step."""
    with tempfile.TemporaryDirectory() as tmp:
        run = ready(recipe(model_dir, setting, "blur", args, Path(tmp)), Path(tmp))
        times = time_combiners(run, args.device, steps=1, rounds=args.steps)
        trainable = {"trainable": sum(p.numel() for p in run.params),
                     "trainable_bytes": sum(p.numel() * p.element_size() for p in run.params)}
        run.release()
    return {**trainable, **{c: times[c]["step_s"] for c in COMBINERS}}


def memory_probe(model_dir: Path, setting: str, combiner: str, args) -> dict:
    """In this (fresh) process: peak bytes during the steps of one setting and combiner."""
    with tempfile.TemporaryDirectory() as tmp:
        run = ready(recipe(model_dir, setting, combiner, args, Path(tmp)), Path(tmp))
        return {"peak_bytes": peak_of_steps(run, args.device, MEMORY_STEPS)}


def peak_in_fresh_process(model_dir: Path, setting: str, combiner: str, args) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-probe", setting, combiner,
                          str(model_dir), "--batch", str(args.batch), "--seq", str(args.seq),
                          "--device", args.device,
                          *([] if args.threads is None else ["--threads", str(args.threads)])],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"memory probe {setting}/{combiner} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def model_size(text: str) -> str:
    """``--sizes`` items: hidden:layers, both positive whole numbers."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not hidden:layers (e.g. 512:8)")
    return text


def measure(size: str, args) -> list[dict]:
    """One row per setting for the model ``hidden:layers``."""
    hidden, layers = map(int, size.split(":"))
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        heads = hidden // 64 if hidden % 64 == 0 else 1  # heads of 64 dimensions where they fit
        params = save_random_llama(model_dir, hidden, layers, 3 * hidden, heads, dtype)
        buffer = params * dtype.itemsize  # one full-parameter gradient buffer
        rows = []
        for setting in SETTINGS:
            times = time_setting(model_dir, setting, args)
            peaks = {c: peak_in_fresh_process(model_dir, setting, c, args) for c in COMBINERS}
            extra = peaks["blur"] - peaks["penalty"]
            rows.append({
                "model": f"{params / 1e6:.1f}M ({size})", "params": params,
                "buffer_bytes": buffer, "setting": setting,
                "trainable_M": times["trainable"] / 1e6,
                "trainable_bytes": times["trainable_bytes"],
                "blur_ms": 1000 * times["blur"], "penalty_ms": 1000 * times["penalty"],
                "blur_over_penalty": times["blur"] / times["penalty"],
                "blur_peak_bytes": peaks["blur"], "penalty_peak_bytes": peaks["penalty"],
                "blur_peak_mib": peaks["blur"] / MIB, "penalty_peak_mib": peaks["penalty"] / MIB,
                "extra_buffers": extra / buffer,
                "extra_trainable_buffers": extra / times["trainable_bytes"],
            })
    return rows


def savings(rows: list[dict]) -> list[dict]:
    """Per model and combiner: peak memory of the precomputed reference against full."""
    out = []
    for full in (r for r in rows if r["setting"] == "full"):
        pre = next(r for r in rows if r["model"] == full["model"]
                   and r["setting"] == "precomputed ref")
        for c in COMBINERS:
            saved = full[f"{c}_peak_bytes"] - pre[f"{c}_peak_bytes"]
            out.append({"model": full["model"], "combiner": c,
                        "full_mib": full[f"{c}_peak_bytes"] / MIB,
                        "precomputed_mib": pre[f"{c}_peak_bytes"] / MIB,
                        "saved_mib": saved / MIB, "saved_buffers": saved / full["buffer_bytes"]})
    return out


def table(rows: list[dict], columns: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |",
             "| " + " | ".join("---" if k in ("model", "setting", "combiner") else "---:"
                               for k in columns) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[k]) for k in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def report(rows: list[dict], saved: list[dict], args) -> str:
    memory = "CUDA allocator peak" if args.device == "cuda" else "peak RSS"
    threads = f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else ""
    head = (f"{args.device}{threads}, {args.dtype}, batch {args.batch} x {args.seq} tokens "
            f"(forget and retain), {args.steps} timed steps per combiner; peak: {memory} "
            f"over {MEMORY_STEPS} steps")
    steps = table(rows, {"model": "model", "setting": "setting", "trainable_M": "trainable M",
                         "blur_ms": "blur ms", "penalty_ms": "penalty ms",
                         "blur_over_penalty": "blur / penalty", "blur_peak_mib": "blur peak MiB",
                         "penalty_peak_mib": "penalty peak MiB",
                         "extra_buffers": "blur - penalty, buffers",
                         "extra_trainable_buffers": "blur - penalty, trainable buffers"})
    pre = table(saved, {"model": "model", "combiner": "combiner", "full_mib": "full peak MiB",
                        "precomputed_mib": "precomputed ref peak MiB", "saved_mib": "saved MiB",
                        "saved_buffers": "saved buffers"})
    sizes = ", ".join(f"{r['model']}: {r['buffer_bytes'] / MIB:.1f} MiB"
                      for r in rows if r["setting"] == "full")
    legend = (f"buffers: one full-parameter gradient ({sizes}); trainable buffers: one gradient "
              "of the trainable parameters (the adapters with LoRA). Goal: blur / penalty <= "
              "1.05, blur - penalty <= 1 trainable buffer."
              + (" Peak RSS is coarse: a MiB or two either way is noise." if args.device == "cpu"
                 else ""))
    return (f"{head}\n\n{steps}\n\n{legend}\n\nPrecomputed reference against full:\n\n"
            f"{pre}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=model_size, default=["64:2", "512:8"],
                    help="hidden:layers")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per combiner")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64, help="tokens per chunk (data.max_len)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--memory-probe", nargs=3, metavar=("SETTING", "COMBINER", "MODEL_DIR"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from blurctl.progress import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("BLURCTL_NO_PROGRESS", "1")  # the reference log-probs' bar
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        setting, combiner, model_dir = args.memory_probe
        print(json.dumps(memory_probe(Path(model_dir), setting, combiner, args)))
        return 0
    rows = [row for size in args.sizes for row in measure(size, args)]
    saved = savings(rows)
    print(report(rows, saved, args))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "precomputed_saving": saved}, indent=1)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
