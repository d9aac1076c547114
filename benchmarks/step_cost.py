"""Step time and peak memory of the BLUR step against the weighted-sum (penalty) step.

    python benchmarks/step_cost.py                    # tiny and ~100M-parameter Llamas, CPU
    python benchmarks/step_cost.py --sizes 4096:32    # hidden:layers, on a GPU if present

Three variants, same losses (GA forget + GDR retain) and the same batches:
  blur     two backward passes, g_f set aside, combined by blurctl.unlearn.combine.combine_
  penalty  the same two passes, combined as w_f*g_f + w_r*g_r (blurctl's penalty)
  sum      one backward pass of w_f*f + w_r*r (the cheapest weighted sum)
Times are interleaved in one process, so the ratios share machine conditions. Peak
memory is measured per variant in a fresh process (CUDA allocator peak on GPU,
peak RSS on CPU) and reported in units of one gradient-sized buffer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blurctl.recipe import AlgorithmConfig
from blurctl.unlearn.combine import Weights, combine_
from blurctl.unlearn.loop import take_grads
from blurctl.unlearn.losses import LossContext, ga, gdr

VARIANTS = ("blur", "penalty", "sum")


def build(hidden: int, layers: int, device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(device).train()


def batch(seed: int, bs: int, seq: int, device: str) -> dict:
    ids = torch.randint(3, 4096, (bs, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.to(device)}


def step(model, opt, variant: str, fb: dict, rb: dict) -> None:
    ctx, params = LossContext(AlgorithmConfig()), [p for p in model.parameters()]
    if variant == "sum":
        (ga(model, None, fb, ctx) + gdr(model, None, rb, ctx)).backward()
    else:
        ga(model, None, fb, ctx).backward()
        g_f = take_grads(params)
        gdr(model, None, rb, ctx).backward()
        g_r = take_grads(params)
        combine_(g_f, g_r, variant, Weights())
        for p, d in zip(params, g_r, strict=True):
            p.grad = d
        del g_f
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(hidden: int, layers: int, steps: int, bs: int, seq: int, device: str) -> dict:
    model = build(hidden, layers, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    fb, rb = batch(0, bs, seq, device), batch(1, bs, seq, device)
    for v in VARIANTS:  # warm-up
        step(model, opt, v, fb, rb)
    totals = dict.fromkeys(VARIANTS, 0.0)
    for _ in range(steps):
        for v in VARIANTS:
            sync(device)
            t = time.perf_counter()
            step(model, opt, v, fb, rb)
            sync(device)
            totals[v] += time.perf_counter() - t
    return {v: totals[v] / steps for v in VARIANTS}


def peak_memory(variant: str, hidden: int, layers: int, bs: int, seq: int, device: str) -> dict:
    """Run in a fresh process: bytes of parameters and peak bytes during 3 steps."""
    model = build(hidden, layers, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    fb, rb = batch(0, bs, seq, device), batch(1, bs, seq, device)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step(model, opt, variant, fb, rb)  # first step: allocator warm-up, optimizer state
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
    for _ in range(3):
        step(model, opt, variant, fb, rb)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()
    return {"grad_bytes": grad_bytes, "peak_bytes": peak}


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["128:4", "1024:8"], help="hidden:layers")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-probe", nargs=3, metavar=("VARIANT", "HIDDEN", "LAYERS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        v, h, layer_count = args.memory_probe
        print(json.dumps(peak_memory(v, int(h), int(layer_count), args.batch, args.seq, args.device)))
        return

    rows = []
    for size in args.sizes:
        hidden, layers = map(int, size.split(":"))
        times = time_variants(hidden, layers, args.steps, args.batch, args.seq, args.device)
        mem = {}
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--memory-probe", v, str(hidden),
                                  str(layers), "--batch", str(args.batch), "--seq", str(args.seq),
                                  "--device", args.device], capture_output=True, text=True, check=True)
            mem[v] = json.loads(out.stdout.strip().splitlines()[-1])
        grad = mem["sum"]["grad_bytes"]
        rows.append({
            "size": size, "params_M": round(grad / 4 / 1e6, 1),
            **{f"{v}_ms": round(1000 * times[v], 1) for v in VARIANTS},
            "blur/penalty": round(times["blur"] / times["penalty"], 3),
            "blur/sum": round(times["blur"] / times["sum"], 3),
            "extra_buffers_blur_vs_sum": round((mem["blur"]["peak_bytes"] - mem["sum"]["peak_bytes"]) / grad, 2),
            "extra_buffers_blur_vs_penalty": round((mem["blur"]["peak_bytes"] - mem["penalty"]["peak_bytes"]) / grad, 2),
        })
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
