"""Compare runs: one table (markdown, CSV, JSON) and a forget-vs-utility plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from blurctl.errors import BlurctlError
from blurctl.evaluation import RESULTS

COLUMNS = [("verbmem_f", "VerbMem_f ↓"), ("knowmem_f", "KnowMem_f ↓"),
           ("knowmem_r", "KnowMem_r ↑"), ("privleak", "PrivLeak →0")]


def method_name(recipe: dict) -> str:
    alg = recipe.get("algorithm", {})
    losses = alg.get("forget_loss", "?") + (f"+{alg['retain_loss']}" if alg.get("retain_loss") else "")
    return f"{alg.get('combiner', '?')} ({losses})"


def collect(run_dirs: list[Path]) -> list[dict]:
    """Rows: the base and retrained references (from the first run that has them), then each run."""
    rows, refs = [], {}
    for run_dir in run_dirs:
        results_path = run_dir / RESULTS
        if not results_path.is_file():
            raise BlurctlError(f"{run_dir}: no {RESULTS}; evaluate it with: blurctl eval {run_dir}")
        results = json.loads(results_path.read_text())
        recipe_path = run_dir / "recipe.yaml"
        recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else {}
        models = results.get("models", {})
        for ref, label in (("base", "target (before unlearning)"), ("retrained", "retrained (no D_f)")):
            if ref in models and ref not in refs:
                refs[ref] = {"run": label, "method": "reference", **models[ref]}
        if "unlearned" in models:
            rows.append({"run": run_dir.name, "method": method_name(recipe), **models["unlearned"]})
    return list(refs.values()) + rows


def accuracy_keys(score_dicts) -> list[str]:
    """The lm-eval accuracy keys (``acc:<task>``) present in any of ``score_dicts``, sorted."""
    return sorted({k for s in score_dicts for k in s if k.startswith("acc:") and not k.endswith("_stderr")})


def metric_keys(rows: list[dict]) -> list[str]:
    return [k for k, _ in COLUMNS] + accuracy_keys(rows)


def format_score(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def to_markdown(rows: list[dict]) -> str:
    keys = metric_keys(rows)
    titles = dict(COLUMNS)
    head = ["run", "method", *(titles.get(k, k) for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join([r["run"], r["method"], *(format_score(r.get(k)) for k in keys)]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    keys = ["run", "method", *metric_keys(rows)]
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
        ax.scatter(r[utility_key], r[forget_key], marker="*" if ref else "o",
                   s=160 if ref else 50, color="black" if ref else None, zorder=3)
        ax.annotate(r["run"], (r[utility_key], r[forget_key]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    titles = dict(COLUMNS)
    ax.set_xlabel(f"{titles.get(utility_key, utility_key)} (utility)")
    ax.set_ylabel(f"{titles.get(forget_key, forget_key)} (remaining knowledge of D_f)")
    ax.set_title("Forget vs utility: lower right is better")
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
