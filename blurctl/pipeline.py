"""A whole job: prepare the run folder, unlearn, evaluate, write results."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from blurctl.envinfo import environment
from blurctl.errors import BlurctlError, InputError
from blurctl.evaluation import evaluate
from blurctl.progress import is_main_process
from blurctl.recipe import Recipe, recipe_yaml, validate_dict

RESOLVED_RECIPE = "recipe.yaml"
ENVIRONMENT = "environment.json"


def prepare_run_dir(recipe: Recipe, resume: bool = False) -> Path:
    """Create the run folder and record the recipe and environment in it."""
    from blurctl.checkpoint import checkpoint_dirs

    run_dir = Path(recipe.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output_dir: {run_dir} exists and is not a folder")
    saved = run_dir / RESOLVED_RECIPE
    if resume:
        if not saved.exists():
            raise InputError(f"--resume: {run_dir} holds no earlier run ({saved} is missing)")
        before = validate_dict(yaml.safe_load(saved.read_text()), str(saved)).model_dump()
        changed = sorted(_changed_keys(before, recipe.model_dump()))
        if changed:
            raise InputError(f"--resume: the recipe differs from {saved} in "
                               f"{', '.join(changed)}; resume with the same recipe")
    elif checkpoint_dirs(run_dir):
        raise InputError(f"output_dir: {run_dir} holds checkpoints of an earlier run; "
                           "pass --resume to continue it or choose another output_dir")
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESOLVED_RECIPE).write_text(recipe_yaml(recipe))
        (run_dir / ENVIRONMENT).write_text(json.dumps(environment(), indent=1) + "\n")
    return run_dir


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
    if not is_main_process() or not (recipe.eval.muse or recipe.eval.lm_eval):
        return {}
    try:
        return evaluate(recipe, str(model_dir), run_dir)
    except Exception as exc:  # the model is safe; say so, in one line, whatever failed
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if not isinstance(exc, BlurctlError):
            detail = f"{exc.__class__.__name__}: {detail}"
        raise BlurctlError(f"evaluation failed: {detail} (the trained model is saved in "
                           f"{model_dir}; finish with: blurctl eval {run_dir})") from None
