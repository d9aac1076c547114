"""lm-evaluation-harness on an in-memory model or a saved checkpoint (docs/method.md)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from blurctl.data.sources import resolve
from blurctl.errors import InputError
from blurctl.recipe import LmEvalConfig

if TYPE_CHECKING:
    from blurctl.models import Placement


def task_manager(cfg: LmEvalConfig):
    """lm-eval's task index with the recipe's tasks in it; InputError naming any unknown one."""
    from lm_eval.tasks import TaskManager

    include = resolve(cfg.include_path) if cfg.include_path else None
    if include is not None and not os.path.isdir(include):
        raise InputError(f"eval.lm_eval.include_path: {include}: no such folder")
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in cfg.tasks):
        manager = TaskManager(include_path=include, include_defaults=True)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=1) for t in unknown}
        said = ", ".join(f"{t!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for t, h in hints.items())
        raise InputError(f"eval.lm_eval.tasks: unknown task {said}")
    return manager


def run_lm_eval(model, tokenizer, cfg: LmEvalConfig, seed: int = 0,
                placement: Placement | None = None) -> dict[str, dict[str, float]]:
    """Accuracy (and its standard error) per task; ``model`` is a module (evaluated where it
    is) or a checkpoint folder (loaded by lm-eval as ``placement`` says; without one, on the
    GPU when one is visible, in the checkpoint's dtype)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(cfg)
    if isinstance(model, str):
        default = "cuda" if torch.cuda.is_available() else "cpu"
        where = {"device": placement.device if placement else default,
                 "dtype": placement.dtype if placement and placement.dtype else "auto"}
    else:
        where = {"device": str(next(model.parameters()).device)}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, **where)
    out = simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                          limit=cfg.limit, task_manager=manager, log_samples=False,
                          bootstrap_iters=cfg.bootstrap_iters, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    scores = {}
    for task, res in out["results"].items():
        if "acc,none" in res:
            stderr = res.get("acc_stderr,none")
            scores[task] = {"acc": float(res["acc,none"]),
                            "acc_stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return scores
