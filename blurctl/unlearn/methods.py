"""Methods that are more than a combiner: what they train on and what they do after training.

A method names the combiner used at each step, may replace the forget loss, states the
recipe settings it requires, and may rewrite the final weights (``finish``; with LoRA,
``finish_adapter`` rewrites the adapter instead). The recipe's
``algorithm.combiner`` accepts every registered combiner and method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from blurctl.unlearn.losses import LossFn, nll

if TYPE_CHECKING:
    from blurctl.recipe import AlgorithmConfig

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    combiner: str                      # the combiner used at each step
    requires: dict[str, object] = field(default_factory=dict)  # algorithm settings it needs
    why: str = ""                      # said when a required setting differs
    forget_fn: LossFn | None = None    # replaces the registered forget loss
    finish: Callable[[State, State, AlgorithmConfig], State] | None = None  # (final, start, alg)
    finish_adapter: Callable[[State, AlgorithmConfig], State] | None = None  # (adapter, alg)


def _fine_tune_on_forget(model, ref, batch, ctx) -> torch.Tensor:
    """Task vector: fine-tune *towards* D_f (NLL descent); the change is subtracted after."""
    return nll(model, batch)


def _negate_task_vector(final: State, start: State, alg: AlgorithmConfig) -> State:
    """theta_start - s (theta_ft - theta_start)."""
    return {k: start[k] - alg.task_vector_scale * (v.to(start[k].device) - start[k])
            for k, v in final.items()}


def _negate_adapter(adapter: State, alg: AlgorithmConfig) -> State:
    """The same with LoRA: the fine-tuning changed W by (alpha/r) B A, B starting at zero, so
    scaling B by -s gives W - s (alpha/r) B A; A stays."""
    return {k: -alg.task_vector_scale * v if ".lora_B." in k else v for k, v in adapter.items()}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("task_vector", combiner="penalty",
           requires={"forget_loss": "ga", "retain_loss": None},
           why="task_vector fine-tunes on D_f and subtracts the change, so its net update "
               "follows gradient ascent; set forget_loss: ga and retain_loss: null",
           forget_fn=_fine_tune_on_forget, finish=_negate_task_vector,
           finish_adapter=_negate_adapter),
)}
