"""The optimizer and learning-rate schedule a recipe asks for."""

from __future__ import annotations

import torch

from blurctl.recipe import Recipe


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe, total_steps: int):
    """(optimizer, scheduler) over ``params`` for ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    tr = recipe.train
    if tr.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=tr.lr, eps=tr.adam_eps, weight_decay=tr.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=tr.lr, weight_decay=tr.weight_decay)
    name = "constant_with_warmup" if tr.scheduler == "constant" else tr.scheduler
    return opt, get_scheduler(name, opt, num_warmup_steps=tr.warmup_steps,
                              num_training_steps=total_steps)
