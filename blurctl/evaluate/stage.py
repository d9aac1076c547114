"""The eval stage: MUSE metrics and lm-eval tasks for the unlearned, base and retrained
models, and, with ``eval.every_epoch``, the MUSE metrics of every epoch's model and the
choice among them (``eval.selection``)."""

from __future__ import annotations

import sys
from pathlib import Path

from blurctl.recipe import Recipe
from blurctl.rundir import RunDir


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


class _Scorer:
    """Scores one model at a time with what the recipe asks for."""

    def __init__(self, recipe: Recipe) -> None:
        from blurctl.data.muse_corpus import MuseCorpus
        from blurctl.models import eval_placement, load_tokenizer

        self.recipe = recipe
        self.placement = eval_placement(recipe)  # the device and dtype models load in
        self.tokenizer = load_tokenizer(recipe.model)
        self.corpus = MuseCorpus(recipe.eval.muse.corpus) if recipe.eval.muse else None

    def __call__(self, path: str | None, muse: bool = True,
                 lm_eval: bool = True) -> tuple[dict, dict]:
        """(scores, per-example records) of the model at ``path`` (None: the base model)."""
        from blurctl.evaluate.harness import run_lm_eval
        from blurctl.evaluate.muse import evaluate_muse
        from blurctl.models import load_model, release_memory

        cfg, m = self.recipe.eval, self.recipe.eval.muse
        model = load_model(self.recipe.model, path=path, placement=self.placement)
        scores, examples = {}, {}
        if m is not None and muse:
            scores, examples = evaluate_muse(
                model, self.tokenizer, self.corpus, verbmem_tokens=m.verbmem_max_new_tokens,
                knowmem_tokens=m.knowmem_max_new_tokens, batch_size=m.batch_size,
                limit=m.max_examples, bootstrap=cfg.bootstrap)
        if cfg.lm_eval is not None and lm_eval:
            for task, res in run_lm_eval(model, self.tokenizer, cfg.lm_eval, self.recipe.seed,
                                         self.placement).items():
                scores[f"acc:{task}"] = res["acc"]
                scores[f"acc:{task}_stderr"] = res["acc_stderr"]
        del model
        release_memory()  # before the next model loads onto the same device
        return scores, examples


def select_epoch(epochs: list[dict], rule: str, retrained: dict | None) -> dict:
    """The epoch ``rule`` picks (``eval.selection``): the last ('final'); the first whose
    KnowMem_f is at or below the retrained model's, else the last (MUSE's protocol); or the
    best by ``max:<metric>`` / ``min:<metric>`` (the first of equals)."""
    if rule == "muse_first_below_retrained":
        bar = retrained["knowmem_f"]
        return next((e for e in epochs if e["knowmem_f"] <= bar), epochs[-1])
    if rule == "final":
        return epochs[-1]
    goal, _, metric = rule.partition(":")
    pick = max if goal == "max" else min
    return pick(epochs, key=lambda e: e[metric])


def reference_identity(recipe: Recipe) -> str:
    """What the base and retrained models' scores depend on: the model and eval sections
    (and the seed, where lm-eval samples few-shot examples with it)."""
    import json

    lm = recipe.eval.lm_eval
    seeded = lm is not None and bool(lm.num_fewshot)
    return json.dumps({"model": recipe.model.model_dump(mode="json"),
                       "eval": recipe.eval.model_dump(mode="json", exclude={"every_epoch", "selection"}),
                       "seed": recipe.seed if seeded else None}, sort_keys=True)


def _reusable(recipe: Recipe, earlier: Path | None) -> tuple[dict, dict]:
    """The base/retrained scores and records of an earlier run evaluated the same way."""
    if earlier is None:
        return {}, {}
    from blurctl.recipe import validate_dict

    run = RunDir(earlier)
    results = run.read_results()
    if not results or not run.examples.is_file() or not run.recipe.is_file() or \
            reference_identity(validate_dict(run.read_recipe())) != reference_identity(recipe):
        return {}, {}
    examples = run.read_json(run.examples)
    names = [n for n in ("base", "retrained") if n in results["models"] and n in examples]
    return ({n: results["models"][n] for n in names}, {n: examples[n] for n in names})


def evaluate(recipe: Recipe, model_dir: str | None, out_dir: Path,
             reuse_from: Path | None = None) -> dict:
    """Evaluate and write ``results.json`` and ``eval_examples.json`` into ``out_dir``.
    Each model loads straight onto the evaluation device in its dtype (``eval_placement``).

    ``reuse_from``: a run folder whose base and retrained scores are taken over when it was
    evaluated the same way (a sweep evaluates them once)."""
    score = _Scorer(recipe)
    wanted = models_to_evaluate(recipe, model_dir)
    results, examples = _reusable(recipe, reuse_from)
    reused = sorted(n for n in results if n in wanted)
    for name in ("base", "retrained"):
        if name in wanted and name not in results:
            results[name], examples[name] = score(wanted[name])
    out: dict = {"models": results}
    if reused:
        out["reused"] = {"models": reused, "from": str(reuse_from)}
    if "unlearned" in wanted:
        epochs = RunDir(out_dir).epoch_models() if recipe.eval.every_epoch else []
        if epochs:
            unlearned, examples["unlearned"], out["epochs"], out["selected"] = \
                _evaluate_epochs(recipe, score, epochs, results.get("retrained"), out_dir)
        else:
            unlearned, examples["unlearned"] = score(wanted["unlearned"])
        results["unlearned"] = unlearned
    out["models"] = {name: results[name] for name in wanted}  # base, unlearned, retrained
    examples = {name: examples[name] for name in wanted}
    out["retrained_auc"] = _add_privleak(recipe, score, out)
    RunDir(out_dir).write_results(out, examples)
    return out


def _evaluate_epochs(recipe: Recipe, score: _Scorer, epochs: list[tuple[int, Path]],
                     retrained: dict | None, out_dir: Path):
    """MUSE scores of every epoch's model, the chosen epoch's full scores and records,
    every epoch's scores and the choice."""
    rows, records = [], {}
    for n, path in epochs:
        scores, records[n] = score(str(path), lm_eval=False)
        rows.append({"epoch": n, "model": str(path.relative_to(out_dir)), **scores})
    chosen = select_epoch(rows, recipe.eval.selection, retrained)
    scores = {k: v for k, v in chosen.items() if k not in ("epoch", "model")}
    if recipe.eval.lm_eval is not None:
        scores.update(score(str(out_dir / chosen["model"]), muse=False)[0])
    selected = {"rule": recipe.eval.selection, "epoch": chosen["epoch"], "model": chosen["model"]}
    return scores, records[chosen["epoch"]], rows, selected


def _add_privleak(recipe: Recipe, score: _Scorer, out: dict) -> float | None:
    """PrivLeak of every scored model and epoch from the retrained model's AUC; that AUC."""
    from blurctl.evaluate.muse import forget_auc, privleak
    from blurctl.models import load_model

    muse, results = recipe.eval.muse, out["models"]
    if muse is None:
        return None
    retrained_auc = muse.retrained_auc
    if "retrained" in results:
        retrained_auc = results["retrained"]["privleak_auc"]
    elif muse.retrained_model:
        model = load_model(recipe.model, path=muse.retrained_model,
                           field_name="eval.muse.retrained_model", placement=score.placement)
        retrained_auc = forget_auc(model, score.tokenizer, score.corpus, muse.batch_size,
                                   muse.max_examples)
    if retrained_auc == 0:  # PrivLeak divides by it; MUSE would print inf
        print("warning: PrivLeak is undefined: the retrained model's privleak AUC is 0 and "
              "PrivLeak divides by it (more texts, eval.muse.max_examples, may help)",
              file=sys.stderr)
    elif retrained_auc is not None:
        for scores in [*results.values(), *out.get("epochs", [])]:
            scores["privleak"] = privleak(scores["privleak_auc"], retrained_auc)
            ci = scores.get("privleak_auc_ci")
            if ci:
                scores["privleak_ci"] = [privleak(ci[0], retrained_auc),
                                         privleak(ci[1], retrained_auc)]
    return retrained_auc
