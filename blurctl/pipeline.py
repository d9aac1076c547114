"""A whole job: prepare the run folder, unlearn, evaluate, write results."""

from __future__ import annotations

import json
import os
from pathlib import Path

from blurctl.bench.build import resolve
from blurctl.envinfo import environment
from blurctl.errors import BlurctlError
import yaml

from blurctl.recipe import Recipe, recipe_yaml, validate_dict

RESOLVED_RECIPE = "recipe.yaml"
ENVIRONMENT = "environment.json"
RESULTS = "results.json"
EXAMPLES = "eval_examples.json"


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def prepare_run_dir(recipe: Recipe, resume: bool = False) -> Path:
    """Create the run folder and record the recipe and environment in it."""
    from blurctl.checkpoint import checkpoint_dirs

    run_dir = Path(recipe.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise BlurctlError(f"output_dir: {run_dir} exists and is not a folder")
    saved = run_dir / RESOLVED_RECIPE
    if resume:
        if not saved.exists():
            raise BlurctlError(f"--resume: {run_dir} holds no earlier run ({saved} is missing)")
        before = validate_dict(yaml.safe_load(saved.read_text()), str(saved)).model_dump()
        changed = sorted(_changed_keys(before, recipe.model_dump()))
        if changed:
            raise BlurctlError(f"--resume: the recipe differs from {saved} in "
                               f"{', '.join(changed)}; resume with the same recipe")
    elif checkpoint_dirs(run_dir):
        raise BlurctlError(f"output_dir: {run_dir} holds checkpoints of an earlier run; "
                           "pass --resume to continue it or choose another output_dir")
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESOLVED_RECIPE).write_text(recipe_yaml(recipe))
        (run_dir / ENVIRONMENT).write_text(json.dumps(environment(), indent=1) + "\n")
    return run_dir


def evaluate(recipe: Recipe, model_dir: str | None, run_dir: Path) -> dict:
    """Evaluate the unlearned model (and, if asked, the base and retrained models)."""
    from blurctl.models import load_model, load_tokenizer
    from blurctl.muse import evaluate_muse, forget_auc, privleak

    cfg = recipe.eval.muse
    if cfg is None:
        return {}
    corpus = Path(resolve(cfg.corpus, recipe.seed))
    tokenizer = load_tokenizer(recipe.model, recipe.seed)
    kwargs = dict(verbmem_tokens=cfg.verbmem_max_new_tokens, knowmem_tokens=cfg.knowmem_max_new_tokens,
                  batch_size=cfg.batch_size, limit=cfg.max_examples)

    retrained_auc = cfg.retrained_auc
    models: dict[str, str | None] = {"unlearned": model_dir}
    if recipe.eval.compare_base:
        models = {"base": None, **models}
    if cfg.retrained_model:
        retrained = load_model(recipe.model, recipe.seed, path=cfg.retrained_model)
        if recipe.eval.compare_base:
            models["retrained"] = cfg.retrained_model
        else:
            retrained_auc = forget_auc(retrained, tokenizer, corpus, cfg.batch_size, cfg.max_examples)
        del retrained
    results, examples = {}, {}
    for name, path in models.items():
        model = load_model(recipe.model, recipe.seed, path=path)
        scores, records = evaluate_muse(model, tokenizer, corpus, **kwargs)
        results[name], examples[name] = scores, records
        if name == "retrained":
            retrained_auc = scores["privleak_auc"]
    if retrained_auc is not None:
        for scores in results.values():
            scores["privleak"] = privleak(scores["privleak_auc"], retrained_auc)
    out = {"muse": results, "retrained_auc": retrained_auc}
    (run_dir / RESULTS).write_text(json.dumps(out, indent=1) + "\n")
    (run_dir / EXAMPLES).write_text(json.dumps(examples, indent=1) + "\n")
    return out


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _changed_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def run(recipe: Recipe, resume: bool = False) -> dict:
    from blurctl.train import unlearn

    run_dir = prepare_run_dir(recipe, resume)
    model_dir = unlearn(recipe, run_dir, resume)
    if not is_main_process():
        return {}
    return evaluate(recipe, str(model_dir), run_dir)
