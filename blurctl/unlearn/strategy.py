"""How training is distributed: one object owns wrapping, gradient sync, the all-reduce of
BLUR's inner products, and the model and optimizer state that checkpoints save and load.

* ``Replicated``: one process, or DDP through accelerate (a whole copy per process; DDP
  averages the gradients, so the inner products need no further reduction).
* ``Sharded``: torch FSDP2 (``fully_shard`` on every decoder layer and the root). Each rank
  holds a shard of every gradient; the three inner products are summed across ranks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from blurctl.models import decoder_layers
from blurctl.unlearn.combine import AllReduce

State = dict[str, torch.Tensor]


class Replicated:
    """A whole model per process (single process or DDP)."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Before the optimizer is built: nothing to do for a replicated model."""
        return model

    def prepare(self, model: torch.nn.Module, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def sync(self, model: torch.nn.Module, last: bool) -> AbstractContextManager:
        """Context of one backward pass; gradients are synchronised on the ``last`` only."""
        return nullcontext() if last else self.accelerator.no_sync(model)

    all_reduce: AllReduce | None = None  # DDP has already averaged the gradients

    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        return t

    def model_state(self, model: torch.nn.Module) -> State:
        """The whole model's state dict on CPU."""
        return {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}

    def optimizer_state(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load(self, model, optimizer, model_state: State, optimizer_state: dict) -> None:
        """Load full (unsharded) states; RuntimeError when they do not match the model."""
        _unwrap(model).load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(optimizer_state)


class Sharded(Replicated):
    """torch FSDP2: parameters, gradients and optimizer state sharded across the ranks."""

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        model.to(self.accelerator.device)
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model

    def prepare(self, model, optimizer):
        return model, optimizer

    def sync(self, model, last: bool) -> AbstractContextManager:
        model.set_requires_gradient_sync(last)
        return nullcontext()

    @staticmethod
    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        """The local shard of a DTensor (a view)."""
        return t.to_local() if hasattr(t, "to_local") else t

    def model_state(self, model) -> State:
        """The whole model's state dict on CPU, gathered from every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        # Gathering unties shared weights (e.g. tied embeddings); keep each once.
        unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return {k: v for k, v in state.items() if k in unique}

    def optimizer_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load(self, model, optimizer, model_state: State, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def make_strategy(accelerator, strategy: str) -> Replicated:
    """FSDP2 when the recipe asks for fsdp and there is more than one process."""
    if strategy == "fsdp" and accelerator.num_processes > 1:
        return Sharded(accelerator)
    return Replicated(accelerator)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
