"""Compare runs: one table (markdown, CSV, JSON) and a forget-vs-utility plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from blurctl.errors import BlurctlError
from blurctl.evaluate.metrics import markdown_table, metric_keys, title
from blurctl.rundir import RunDir


def method_name(recipe: dict) -> str:
    alg = recipe.get("algorithm", {})
    losses = alg.get("forget_loss", "?") + (f"+{alg['retain_loss']}" if alg.get("retain_loss") else "")
    return f"{alg.get('combiner', '?')} ({losses})"


def _setting(recipe: dict) -> str:
    """What a run trained, leaving out its seed and folder: runs that share it are repeats."""
    return json.dumps({k: v for k, v in recipe.items() if k not in ("seed", "output_dir")},
                      sort_keys=True)


def collect(run_dirs: list[Path]) -> list[dict]:
    """Rows: the base and retrained references (from the first run that has them), then each
    run; runs that differ only in ``seed`` become one row of means with ``<metric>_sd``."""
    rows, refs = [], {}
    for run_dir in map(RunDir, run_dirs):
        if not run_dir.path.is_dir():
            raise BlurctlError(f"{run_dir.path}: not a run folder")
        results = run_dir.read_results()
        if results is None:
            raise BlurctlError(f"{run_dir.path}: no {run_dir.results.name}; evaluate it with: "
                               f"blurctl eval {run_dir.path}")
        recipe = run_dir.read_recipe() if run_dir.recipe.is_file() else {}
        models = results.get("models", {})
        for ref, label in (("base", "target (before unlearning)"), ("retrained", "retrained (no D_f)")):
            if ref in models and ref not in refs:
                refs[ref] = {"run": label, "method": "reference", **models[ref]}
        if "unlearned" in models:
            rows.append({"run": run_dir.path.name, "method": method_name(recipe),
                         "setting": _setting(recipe), **models["unlearned"]})
    return list(refs.values()) + aggregate_seeds(rows)


def aggregate_seeds(rows: list[dict]) -> list[dict]:
    """One row per setting: alone as it is; repeated over seeds as mean and sample sd."""
    import re
    import statistics

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.pop("setting"), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        names = {re.sub(r"_?seed-\d+", "", r["run"]) or "default" for r in group}
        row = {"run": names.pop() if len(names) == 1 else group[0]["run"],
               "method": group[0]["method"], "seeds": len(group)}
        for key in metric_keys(group):
            values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
            if len(values) == len(group):
                row[key], row[f"{key}_sd"] = statistics.mean(values), statistics.stdev(values)
        out.append(row)
    return out


SPREAD_NOTE = ("± is the sd over seeds where a row averages seeds, else half the 95% "
               "bootstrap interval of that one run's score.")


def to_markdown(rows: list[dict]) -> str:
    return markdown_table(["run", "method"], [([r["run"], r["method"]], r) for r in rows],
                          metric_keys(rows), intervals=True) + f"\n\n{SPREAD_NOTE}\n"


def to_csv(rows: list[dict]) -> str:
    keys = ["run", "method", "seeds"]
    for k in metric_keys(rows):
        keys += [k, f"{k}_sd"] if any(f"{k}_sd" in r for r in rows) else [k]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot(rows: list[dict], path: Path, forget_key: str = "knowmem_f",
         utility_key: str = "knowmem_r") -> None:
    """Forget (lower is better) against utility (higher is better), references marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for r in rows:
        if forget_key not in r or utility_key not in r:
            continue
        ref = r["method"] == "reference"
        ax.errorbar(r[utility_key], r[forget_key], xerr=r.get(f"{utility_key}_sd"),
                    yerr=r.get(f"{forget_key}_sd"), fmt="*" if ref else "o",
                    markersize=12 if ref else 6, color="black" if ref else None,
                    capsize=3, zorder=3)
        ax.annotate(r["run"], (r[utility_key], r[forget_key]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{title(utility_key)} (utility)")
    ax.set_ylabel(f"{title(forget_key)} (remaining knowledge of D_f)")
    seeded = any(f"{forget_key}_sd" in r for r in rows)
    ax.set_title("Forget vs utility: lower right is better"
                 + (" (mean ± sd over seeds)" if seeded else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dirs: list[Path], out_dir: Path) -> list[dict]:
    rows = collect(run_dirs)
    if not rows:
        raise BlurctlError("report: none of the runs has evaluation results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(to_markdown(rows))
    (out_dir / "report.csv").write_text(to_csv(rows))
    (out_dir / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out_dir / "report.png")
    return rows
