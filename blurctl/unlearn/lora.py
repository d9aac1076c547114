"""LoRA through peft (the recipe's ``peft`` section): the wrapped model, pi_ref as the base
model with the adapters disabled, the states that checkpoints hold, and the saved adapter
beside the merged model (docs/method.md §3).

Only the adapters train, so BLUR's inner products run over the adapter parameters. With
the rmu losses the adapters go on the module that holds ``steering.param_suffix``, in
``steering.update_layers`` only: the low-rank version of what RMU trains in full.
peft is imported only when a recipe has a ``peft`` section.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blurctl.errors import InputError
from blurctl.unlearn.strategy import Replicated, State

if TYPE_CHECKING:
    from blurctl.recipe import Recipe

ADAPTER = "default"            # peft's name for the one adapter
PREFIX = "base_model.model."   # how a PeftModel names the wrapped model's entries
MARK = ".lora_"                # in the name of every adapter entry, and no other


def lora_config(recipe: Recipe, config):
    """peft's LoraConfig for the recipe (RMU: on the steered module of the updated layers,
    the family's MLP output projection unless ``steering.param_suffix`` names another)."""
    from peft import LoraConfig

    from blurctl.models import rmu_param_suffix

    cfg, steering = recipe.peft, recipe.steering
    where: dict = {"target_modules": cfg.target_modules}
    if recipe.algorithm.uses_rmu and steering is not None:
        suffix = rmu_param_suffix(recipe, config)
        where = {"target_modules": [suffix.removesuffix(".weight")],
                 "layers_to_transform": list(steering.update_layers)}
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      task_type="CAUSAL_LM", **where)


def wrap(model: torch.nn.Module, recipe: Recipe):
    """``model`` with LoRA adapters (a PeftModel): only the adapters require gradients.
    InputError naming the recipe key when peft finds nothing to adapt."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear, LoraLayer

    key = "steering.param_suffix" if recipe.algorithm.uses_rmu else "peft.target_modules"
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = get_peft_model(model, lora_config(recipe, model.config),
                                     revision=recipe.model.revision)
    except ValueError as exc:  # no such module, or no default for the model type
        raise InputError(f"{key}: {str(exc).splitlines()[0]}") from None
    other = [(n, type(m).__name__) for n, m in wrapped.named_modules()
             if isinstance(m, LoraLayer) and not isinstance(m, Linear)]
    if other:
        raise InputError(f"{key}: only linear layers can be adapted; "
                         f"{other[0][0].removeprefix(PREFIX)} is a {other[0][1]}")
    return wrapped


def adapter_problems(recipe: Recipe, config) -> list[str]:
    """peft is installed and finds the layers to adapt in the model (its config alone, no
    weights); one line per problem."""
    if recipe.peft is None:
        return []
    if importlib.util.find_spec("peft") is None:
        return ["peft: the peft library is not installed (pip install 'blurctl[peft]')"]
    from blurctl.models import model_skeleton

    try:
        wrap(model_skeleton(config, recipe), recipe)
    except InputError as exc:
        return [str(exc)]
    return []


def adapter_parameter_count(recipe: Recipe, config) -> int:
    """How many parameters the adapters add, and train (from the config, no weights)."""
    from blurctl.models import model_skeleton

    wrapped = wrap(model_skeleton(config, recipe), recipe)
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


class AdaptersDisabled(torch.nn.Module):
    """pi_ref of a LoRA run: the trained model with its adapters disabled, that is the base
    model, in eval mode and without gradients; no copy of the weights.

    Called like a model. ``module`` is the PeftModel, so ``decoder_layers`` and forward
    hooks (RMU's ``hidden_at``) reach the shared layers. It is not registered as a
    submodule: ``.to()``, ``.eval()`` or ``requires_grad_`` on pi_ref leave the model alone.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["module"] = model

    def forward(self, *args, **kwargs):
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            with torch.no_grad(), self.module.disable_adapter():
                return self.module(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training


class AdapterStates(Replicated):
    """A whole model per process whose state is its adapters: checkpoints hold them alone
    (megabytes, not the base's gigabytes), and resuming loads them over the base, which is
    read again from ``model.path`` (``--resume`` checks its fingerprint)."""

    def model_state(self, model: torch.nn.Module) -> State:
        """The adapter entries of the PeftModel's state dict, on CPU."""
        state = self.accelerator.unwrap_model(model).state_dict()
        return {k: v.detach().cpu() for k, v in state.items() if MARK in k}

    def load(self, model, optimizer, model_state: State, optimizer_state: dict) -> None:
        """Load adapter states; RuntimeError when they are not exactly the model's adapters."""
        result = self.accelerator.unwrap_model(model).load_state_dict(model_state, strict=False)
        wrong = result.unexpected_keys or [k for k in result.missing_keys if MARK in k]
        if wrong:
            raise RuntimeError(f"adapter entries differ: {wrong[0]}")
        optimizer.load_state_dict(optimizer_state)


def merged_state(model, adapters: State) -> State:
    """The base model's state under its own names (CPU) with every adapter merged:
    W + (alpha/r)·B·A, computed in float32 and stored in W's dtype. ``model`` is the
    PeftModel (for the base weights and each layer's scaling); ``adapters`` gives A and B."""
    from peft.tuners.lora import LoraLayer

    merged = {k.removeprefix(PREFIX).replace(".base_layer.", "."): v.detach().cpu()
              for k, v in model.state_dict().items() if MARK not in k}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            a = adapters[f"{name}.lora_A.{ADAPTER}.weight"].float()
            b = adapters[f"{name}.lora_B.{ADAPTER}.weight"].float()
            delta = (b @ a) * layer.scaling[ADAPTER]
            key = f"{name.removeprefix(PREFIX)}.weight"
            w = merged[key]
            merged[key] = (w.float() + (delta.T if layer.fan_in_fan_out else delta)).to(w.dtype)
    return merged


def save(model, adapters: State, folder: Path, tokenizer) -> tuple[torch.nn.Module, State]:
    """Write the adapter (peft's layout, with the tokenizer) atomically into ``folder``;
    return the base model and the merged state, to be saved as a whole model."""
    from blurctl.unlearn.checkpoint import save_model_atomically

    save_model_atomically(model, tokenizer, folder, adapters, save_embedding_layers=False)
    return model.get_base_model(), merged_state(model, adapters)


def describe(model, folder: Path) -> None:
    """Make a checkpoint folder loadable as base + adapter (transformers reads
    ``adapter_config.json`` and loads the base model it names)."""
    model.save_pretrained(folder, save_embedding_layers=False)
