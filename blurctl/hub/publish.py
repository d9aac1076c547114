"""Publish an evaluated run to the Hugging Face Hub with a model card.

A LoRA run (recipe section ``peft``) uploads its merged model when ``peft.merge`` is true,
else its adapter alone, with a card whose ``base_model`` is the recipe's model.

The card's metadata carries the evaluation results as ``model-index`` (built with
huggingface_hub's ModelCardData/EvalResult). The token comes from ``HF_TOKEN`` or
the Hugging Face credential store, through huggingface_hub; blurctl never reads,
prints or writes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from blurctl.errors import BlurctlError
from blurctl.evaluate.metrics import (
    ACCURACY_PREFIX,
    BY_KEY,
    MUSE_METRICS,
    accuracy_keys,
    markdown_table,
)
from blurctl.rundir import ENVIRONMENT, LOG, RECIPE, RESULTS, RunDir

STAGE_DIRNAME = "publish"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
RUN_FILES = (RECIPE, RESULTS, ENVIRONMENT, LOG)


def _eval_results(results: dict, corpus_name: str):
    from huggingface_hub import EvalResult

    scores = results.get("models", {}).get("unlearned", {})
    out = []
    for m in MUSE_METRICS:
        if isinstance(scores.get(m.key), (int, float)):
            out.append(EvalResult(task_type="text-generation", task_name="MUSE unlearning",
                                  dataset_type=corpus_name, dataset_name=corpus_name,
                                  metric_type=m.hub_type, metric_name=m.name,
                                  metric_value=round(float(scores[m.key]), 4)))
    for key in accuracy_keys([scores]):
        if isinstance(scores[key], (int, float)):
            task = key.removeprefix(ACCURACY_PREFIX)
            out.append(EvalResult(task_type="multiple-choice", dataset_type=task, dataset_name=task,
                                  metric_type="accuracy", metric_name=f"{task} accuracy",
                                  metric_value=round(float(scores[key]), 4)))
    return out


def _results_table(results: dict) -> str:
    models = results.get("models", {})
    keys = [m.key for m in MUSE_METRICS if any(m.key in s for s in models.values())]
    keys += accuracy_keys(models.values())
    return markdown_table(["model"], [([name], scores) for name, scores in models.items()], keys,
                          header=lambda k: BY_KEY[k].name if k in BY_KEY else k, intervals=True)


def model_card(run_dir: Path, repo_id: str, tags: list[str]):
    """The model card of a run: metadata with model-index, then a readable summary."""
    from huggingface_hub import ModelCard, ModelCardData

    run = RunDir(run_dir)
    recipe, results = run.read_recipe(), run.read_results()
    env = run.read_json(run.environment) if run.environment.exists() else {}
    base = recipe["model"]["path"]
    data = recipe["data"]
    corpora = data["forget"] + (data.get("retain") or [])
    datasets = sorted({c["path"] for c in corpora if c["path"].count("/") == 1
                       and not c["path"].startswith(("/", ".", "embedded:"))})
    muse = (recipe.get("eval") or {}).get("muse") or {}
    alg, lora = recipe["algorithm"], recipe.get("peft")
    adapter_only = uploads_adapter(recipe)
    card_data = ModelCardData(
        base_model=None if base.startswith("embedded:") else base,
        datasets=datasets or None, library_name="peft" if adapter_only else "transformers",
        model_name=repo_id.split("/")[-1],
        tags=sorted({"unlearning", "blur", "blurctl", alg["combiner"], *tags,
                     *(["lora"] if lora else [])}),
        eval_results=_eval_results(results, muse.get("corpus", "unlearning-eval")) or None)
    versions = "\n".join(f"- {k}: {v}" for k, v in (env.get("packages") or {}).items() if v)
    return ModelCard.from_template(
        card_data, template_path=str(MODEL_CARD_TEMPLATE), model_name=repo_id.split("/")[-1],
        base=base, combiner=alg["combiner"], lora=lora, adapter_only=adapter_only,
        repo_id=repo_id,
        forget_loss=alg["forget_loss"], retain_loss=alg.get("retain_loss"),
        results_table=_results_table(results), metrics=MUSE_METRICS,
        selected=results.get("selected"),
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False).strip(), versions=versions)


def uploads_adapter(recipe: dict) -> bool:
    """Whether a run's upload is its LoRA adapter alone (``peft.merge: false``)."""
    lora = recipe.get("peft")
    return bool(lora) and not lora.get("merge", True)


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (no copy of large weights), copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(run_dir: Path, repo_id: str, tags: list[str]) -> Path:
    """Lay out exactly what will be uploaded in ``RUN_DIR/publish``; return that folder."""
    run = RunDir(run_dir)
    results = run.read_results()
    if results is None:
        raise BlurctlError(f"{run_dir}: no {run.results.name}; a run is published only with its "
                           f"evaluation (run: blurctl eval {run_dir})")
    selected = results.get("selected")  # eval.selection's epoch, when there is one
    model_dir = run / selected["model"] if selected else run.model
    if uploads_adapter(run.read_recipe()):
        model_dir = run.adapter_of(model_dir)
        if not (model_dir / "adapter_config.json").is_file():
            raise BlurctlError(f"{run_dir}: no saved adapter in {model_dir} (peft.merge is false, "
                               "so the adapter is what is published)")
    elif not (model_dir / "config.json").is_file():
        raise BlurctlError(f"{run_dir}: no saved model in {model_dir}")
    stage_dir = run_dir / STAGE_DIRNAME
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name != "README.md":  # the card below is the README
            _place(f, stage_dir / f.name)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, stage_dir / name)
    model_card(run_dir, repo_id, tags).save(stage_dir / "README.md")
    return stage_dir


def upload(stage_dir: Path, repo_id: str, private: bool) -> str:
    """Create the repository if needed and upload the staged folder in one commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=stage_dir, repo_type="model",
                          commit_message="Upload unlearned model (blurctl)")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        hint = " (set HF_TOKEN or run `hf auth login`)" if status in (401, 403) else ""
        raise BlurctlError(f"publish: the Hub refused the upload to {repo_id} "
                           f"(HTTP {status}){hint}") from None
    except OSError as exc:
        raise BlurctlError(f"publish: cannot reach the Hub ({exc.__class__.__name__})") from None
    return str(url)
