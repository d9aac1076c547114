"""The optimizer and learning-rate schedule a recipe asks for.

``OPTIMIZERS`` maps each ``train.optimizer`` name to its constructor; the recipe's allowed
names come from it. The bitsandbytes ones (``BNB_OPTIMIZERS``) run on a GPU only and are
checked before any weights load (``optimizer_problems``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the recipe derives its optimizer names from this module
    from blurctl.recipe import Recipe, TrainConfig

Params = Iterable[torch.nn.Parameter]


def _adamw(params: Params, tr: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=tr.lr, eps=tr.adam_eps, weight_decay=tr.weight_decay)


def _sgd(params: Params, tr: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=tr.lr, weight_decay=tr.weight_decay)


def _adafactor(params: Params, tr: TrainConfig) -> torch.optim.Optimizer:
    """transformers' Adafactor at the recipe's learning rate (and schedule): no relative step,
    no scaling by the parameter's norm, no first moment (beta1 None)."""
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=tr.lr, weight_decay=tr.weight_decay, scale_parameter=False,
                     relative_step=False, warmup_init=False)


def _bnb(class_name: str) -> Callable[[Params, TrainConfig], torch.optim.Optimizer]:
    def build(params: Params, tr: TrainConfig) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return getattr(bnb.optim, class_name)(params, lr=tr.lr, eps=tr.adam_eps,
                                              weight_decay=tr.weight_decay)
    return build


OPTIMIZERS: dict[str, Callable[[Params, TrainConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
    "adafactor": _adafactor,
    "adamw_8bit": _bnb("AdamW8bit"),               # 8-bit moments, block-wise quantised
    "paged_adamw_8bit": _bnb("PagedAdamW8bit"),    # the same in paged (CPU-evictable) memory
}
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


def optimizer_problems(recipe: Recipe) -> list[str]:
    """The bitsandbytes optimizers need the package and a GPU (one line each)."""
    import importlib.util

    name = recipe.train.optimizer
    if name not in BNB_OPTIMIZERS:
        return []
    if importlib.util.find_spec("bitsandbytes") is None:
        problem = "needs bitsandbytes, which is not installed (pip install 'blurctl[bnb]')"
    elif recipe.hardware.device == "cpu" or not torch.cuda.is_available():
        where = ("hardware.device is cpu" if recipe.hardware.device == "cpu"
                 else "no GPU is visible here")
        problem = f"runs on a GPU only, and {where}; use adamw or adafactor"
    else:
        return []
    return [f"train.optimizer: {name!r} {problem}"]


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe, total_steps: int):
    """(optimizer, scheduler) over ``params`` for ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    tr = recipe.train
    opt = OPTIMIZERS[tr.optimizer](params, tr)
    name = "constant_with_warmup" if tr.scheduler == "constant" else tr.scheduler
    return opt, get_scheduler(name, opt, num_warmup_steps=tr.warmup_steps,
                              num_training_steps=total_steps)
