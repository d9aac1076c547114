"""The eval stage: MUSE metrics and lm-eval tasks for the unlearned, base and retrained models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from blurctl.data.sources import resolve
from blurctl.recipe import Recipe
from blurctl.rundir import EXAMPLES, RESULTS


def models_to_evaluate(recipe: Recipe, model_dir: str | None) -> dict[str, str | None]:
    """Name -> checkpoint folder (None: the recipe's base model)."""
    models: dict[str, str | None] = {}
    if recipe.eval.compare_base or model_dir is None:
        models["base"] = None
    if model_dir is not None:
        models["unlearned"] = model_dir
    muse = recipe.eval.muse
    if muse and muse.retrained_model and recipe.eval.compare_base:
        models["retrained"] = muse.retrained_model
    return models


def evaluate(recipe: Recipe, model_dir: str | None, out_dir: Path) -> dict:
    """Evaluate and write ``results.json`` and ``eval_examples.json`` into ``out_dir``.

    Each model loads straight onto the evaluation device in its dtype (``eval_placement``).
    """
    from blurctl.evaluate.harness import run_lm_eval
    from blurctl.evaluate.muse import evaluate_muse, forget_auc, privleak
    from blurctl.models import eval_placement, load_model, load_tokenizer, release_memory

    cfg, muse = recipe.eval, recipe.eval.muse
    placement = eval_placement(recipe)
    tokenizer = load_tokenizer(recipe.model)
    corpus = Path(resolve(muse.corpus)) if muse else None
    results: dict[str, dict] = {}
    examples: dict[str, dict] = {}
    for name, path in models_to_evaluate(recipe, model_dir).items():
        model = load_model(recipe.model, path=path, placement=placement)
        scores: dict = {}
        if muse is not None:
            scores, examples[name] = evaluate_muse(
                model, tokenizer, corpus,
                verbmem_tokens=muse.verbmem_max_new_tokens,
                knowmem_tokens=muse.knowmem_max_new_tokens, batch_size=muse.batch_size,
                limit=muse.max_examples, bootstrap=cfg.bootstrap)
        if cfg.lm_eval is not None:
            for task, res in run_lm_eval(model, tokenizer, cfg.lm_eval, recipe.seed,
                                         placement).items():
                scores[f"acc:{task}"] = res["acc"]
                scores[f"acc:{task}_stderr"] = res["acc_stderr"]
        results[name] = scores
        del model
        release_memory()  # before the next model loads onto the same device

    retrained_auc = None
    if muse is not None:
        retrained_auc = muse.retrained_auc
        if "retrained" in results:
            retrained_auc = results["retrained"]["privleak_auc"]
        elif muse.retrained_model:
            model = load_model(recipe.model, path=muse.retrained_model,
                               field_name="eval.muse.retrained_model", placement=placement)
            retrained_auc = forget_auc(model, tokenizer, corpus,
                                       muse.batch_size, muse.max_examples)
        if retrained_auc == 0:  # PrivLeak divides by it; MUSE would print inf
            print("warning: PrivLeak is undefined: the retrained model's privleak AUC is 0 and "
                  "PrivLeak divides by it (more texts, eval.muse.max_examples, may help)",
                  file=sys.stderr)
        elif retrained_auc is not None:
            for scores in results.values():
                scores["privleak"] = privleak(scores["privleak_auc"], retrained_auc)
                ci = scores.get("privleak_auc_ci")
                if ci:
                    scores["privleak_ci"] = [privleak(ci[0], retrained_auc),
                                             privleak(ci[1], retrained_auc)]
    out = {"models": results, "retrained_auc": retrained_auc}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS).write_text(json.dumps(out, indent=1) + "\n")
    (out_dir / EXAMPLES).write_text(json.dumps(examples, indent=1) + "\n")
    return out
