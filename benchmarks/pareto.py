"""BLUR against the weighted sum of the same losses: forget/utility fronts with error bars.

For each loss pair (NPO+GDR, GA+GDR), each combiner (blur, penalty), each retain weight and
each seed, one run of the embedded benchmark under MUSE's protocol: the model is evaluated
after every epoch and the run reports the first epoch whose KnowMem_f is at or below the
retrained model's (else the last). Then, per setting, mean ± sd over seeds of KnowMem_f,
PrivLeak and KnowMem_r, written to pareto.json / pareto.md and plotted in pareto.png
(KnowMem_f and PrivLeak against KnowMem_r, both fronts of each loss pair on one plot).

    python benchmarks/pareto.py --out runs/pareto --jobs 2   # the full grid, 2 runs at a time
    python benchmarks/pareto.py --out /tmp/p --quick         # a smoke run (minutes)

Finished runs in ``--out`` are kept and summarised again, so an interrupted grid continues
where it stopped. ``--jobs N`` runs N interleaved parts of the grid in parallel processes
(one CPU thread each on a CPU), which suits models this small better than threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from blurctl.pipeline.sweep import expand, run_points
from blurctl.progress import quiet_libraries
from blurctl.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
PAIRS = {"npo+gdr": ("npo", "gdr"), "ga+gdr": ("ga", "gdr")}
COMBINERS = ("blur", "penalty")
METRICS = ("knowmem_f", "privleak", "knowmem_r", "verbmem_f")
PROTOCOL = ["train.save_every_epoch=true", "eval.every_epoch=true",
            "eval.selection=muse_first_below_retrained", "eval.lm_eval=null"]
QUICK = ["train.epochs=2", "data.max_len=64", "train.batch_size=8", "eval.muse.max_examples=8",
         "eval.bootstrap=0"]


def grid(out: Path, weights: list[str], seeds: list[str], extra: list[str]):
    """Every (loss pair, combiner, retain weight, seed) as a validated sweep point."""
    variants = {f"{name}_{combiner}": [f"algorithm.forget_loss={f}", f"algorithm.retain_loss={r}",
                                       f"algorithm.combiner={combiner}"]
                for name, (f, r) in PAIRS.items() for combiner in COMBINERS}
    axes = [f"algorithm.retain_weight={','.join(weights)}", f"seed={','.join(seeds)}"]
    return expand(DEMO, axes, base=[*PROTOCOL, *extra, f"output_dir={out}"], variants=variants)


def summarise(run_dirs: list[Path]) -> dict:
    """Per setting (loss pair, combiner, retain weight): mean and sd over seeds of each metric
    of the selected epoch, the epochs it chose, and the retrained model's scores."""
    groups: dict[tuple, list[dict]] = {}
    retrained = None
    for path in run_dirs:
        run = RunDir(path)
        recipe, results = run.read_recipe(), run.read_results()
        alg = recipe["algorithm"]
        key = (f"{alg['forget_loss']}+{alg['retain_loss']}", alg["combiner"], alg["retain_weight"])
        groups.setdefault(key, []).append({**results["models"]["unlearned"],
                                           "epoch": results["selected"]["epoch"]})
        retrained = retrained or results["models"].get("retrained")
    settings = []
    for (pair, combiner, weight), runs in sorted(groups.items()):
        row = {"pair": pair, "combiner": combiner, "retain_weight": weight, "seeds": len(runs),
               "epochs": [r["epoch"] for r in runs]}
        for m in METRICS:
            values = [r[m] for r in runs]
            row[m] = statistics.mean(values)
            row[f"{m}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        settings.append(row)
    return {"settings": settings, "retrained": {m: retrained[m] for m in METRICS if m in retrained}}


def to_markdown(summary: dict) -> str:
    lines = ["| losses | combiner | w_r | KnowMem_f ↓ | PrivLeak →0 | KnowMem_r ↑ | VerbMem_f ↓ | epochs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in summary["settings"]:
        cells = [f"{s[m]:.1f} ± {s[f'{m}_sd']:.1f}" for m in ("knowmem_f", "privleak", "knowmem_r",
                                                              "verbmem_f")]
        lines.append(f"| {s['pair']} | {s['combiner']} | {s['retain_weight']} | "
                     + " | ".join(cells) + f" | {', '.join(map(str, s['epochs']))} |")
    ref = summary["retrained"]
    lines.append(f"| retrained (no D_f) | | | {ref.get('knowmem_f', float('nan')):.1f} | "
                 f"{ref.get('privleak', float('nan')):.1f} | {ref.get('knowmem_r', float('nan')):.1f} | "
                 f"{ref.get('verbmem_f', float('nan')):.1f} | |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """KnowMem_f and PrivLeak against KnowMem_r: one line per (losses, combiner) through its
    retain weights, error bars of one sd over seeds both ways, the retrained model starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    styles = {"blur": "-o", "penalty": "--s"}
    colors = {pair: f"C{i}" for i, pair in enumerate(PAIRS)}
    for ax, y in zip(axes, ("knowmem_f", "privleak"), strict=True):
        for pair in PAIRS:
            for combiner in COMBINERS:
                rows = sorted((s for s in summary["settings"]
                               if s["pair"] == pair and s["combiner"] == combiner),
                              key=lambda s: s["knowmem_r"])
                if not rows:
                    continue
                ax.errorbar([s["knowmem_r"] for s in rows], [s[y] for s in rows],
                            xerr=[s["knowmem_r_sd"] for s in rows], yerr=[s[f"{y}_sd"] for s in rows],
                            fmt=styles[combiner], color=colors[pair], capsize=3,
                            label=f"{pair} {combiner}")
                for s in rows:
                    ax.annotate(f"{s['retain_weight']:g}", (s["knowmem_r"], s[y]), fontsize=7,
                                textcoords="offset points", xytext=(4, 3))
        ref = summary["retrained"]
        if y in ref and "knowmem_r" in ref:
            ax.plot(ref["knowmem_r"], ref[y], "k*", markersize=12, label="retrained")
        ax.set_xlabel("KnowMem_r ↑ (utility)")
        ax.set_ylabel({"knowmem_f": "KnowMem_f ↓", "privleak": "PrivLeak (0 is ideal)"}[y])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("BLUR (solid) vs weighted sum (dashed), same losses; labels: w_r; "
                 "mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_part(points: list, overwrite: bool) -> list[str]:
    """Run the points whose folder holds no results yet; the names of those that failed."""
    todo = [p for p in points if overwrite or not RunDir(Path(p.recipe.output_dir)).results.is_file()]
    _, failed = run_points(todo, overwrite=True,
                           on_start=lambda i, p: print(f"[{i}/{len(todo)}] {p.name}", flush=True),
                           on_error=lambda p, e: print(f"{p.name}: {e}", flush=True))
    return failed


def run_parallel(jobs: int, argv: list[str]) -> None:
    """This script once per part, ``jobs`` at a time, one CPU thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--part", f"{k}/{jobs}"], env=env)
             for k in range(jobs)]
    if any(p.wait() for p in procs):
        raise SystemExit("pareto: a part failed (see its output above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pareto"))
    parser.add_argument("--weights", default="5,20", help="retain weights w_r")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny settings")
    parser.add_argument("--overwrite", action="store_true", help="rerun finished runs too")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_libraries()
    points = grid(args.out, args.weights.split(","), args.seeds.split(","),
                  QUICK if args.quick else [])
    if args.part:  # one of --jobs parts: every N-th point
        k, n = map(int, args.part.split("/"))
        failed = run_part(points[k::n], args.overwrite)
        raise SystemExit(1 if failed else 0)
    if args.jobs > 1:
        argv = ["--out", str(args.out), "--weights", args.weights, "--seeds", args.seeds,
                *(["--quick"] if args.quick else []), *(["--overwrite"] if args.overwrite else [])]
        run_parallel(args.jobs, argv)
    elif failed := run_part(points, args.overwrite):
        raise SystemExit(f"pareto: {len(failed)} runs failed: {', '.join(failed)}")
    summary = summarise([Path(p.recipe.output_dir) for p in points])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pareto.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "pareto.md").write_text(to_markdown(summary))
    plot(summary, args.out / "pareto.png")
    print(to_markdown(summary))
    print(f"pareto: {args.out}/pareto.md, pareto.json, pareto.png")


if __name__ == "__main__":
    main()
