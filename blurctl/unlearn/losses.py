"""Forget and retain losses (docs/method.md §3), each a function of (model, reference, batch, context).

A batch is a dict with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where a
token is padding or prompt). Token log-likelihoods skip those positions.

Each loss is registered with ``@register(kind, name, needs_reference=...)``; the recipe's
allowed ``algorithm.forget_loss`` / ``retain_loss`` values and the reference-model rule
come from this registry. A new loss is one decorated function here (plus its test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blurctl.models import decoder_layers, token_logprobs

if TYPE_CHECKING:  # the recipe derives its loss names from this module's registry
    from blurctl.recipe import AlgorithmConfig, SteeringConfig

Batch = dict[str, torch.Tensor]


@dataclass
class LossContext:
    """What a loss needs besides the models and the batch."""

    alg: AlgorithmConfig
    steering: SteeringConfig | None = None
    control: torch.Tensor | None = None  # RMU: the fixed random unit vector u
    coeff: float = 0.0  # RMU: the steering coefficient c for this forget corpus


LossFn = Callable[[torch.nn.Module, "torch.nn.Module | None", Batch, LossContext], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """A registered loss: its recipe name, whether it needs the frozen reference pi_ref."""

    name: str
    kind: str  # "forget" or "retain"
    fn: LossFn
    needs_reference: bool = False
    # needs only log pi_ref(x) of each chunk, which can be computed once before training
    # (``train.precompute_reference``) and arrives as ``batch["ref_logp"]``
    precomputable: bool = False


FORGET_LOSSES: dict[str, Loss] = {}
RETAIN_LOSSES: dict[str, Loss] = {}


def register(kind: str, name: str, needs_reference: bool = False,
             precomputable: bool = False) -> Callable[[LossFn], LossFn]:
    """Make ``fn`` available as ``algorithm.<kind>_loss: <name>``."""
    table = {"forget": FORGET_LOSSES, "retain": RETAIN_LOSSES}[kind]

    def add(fn: LossFn) -> LossFn:
        table[name] = Loss(name, kind, fn, needs_reference, precomputable)
        return fn
    return add


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def sequence_logprob(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(x) (sum of token log-probs) per sequence, and the number of tokens counted."""
    logp, mask = token_logprobs(_logits(model, batch), batch["labels"])
    return logp.sum(-1), mask.sum(-1)


def token_mean(values: torch.Tensor, mask: torch.Tensor, batch: Batch, key: str) -> torch.Tensor:
    """Sum of ``values`` over ``mask`` divided by the batch's token count.

    The training loop sets ``batch[key]`` so that per-rank, per-micro-batch losses add
    up to the mean over every token of the global step; alone, it is this batch's count.
    """
    count = batch.get(key)
    if count is None:
        count = mask.sum().clamp(min=1)
    return (values * mask).sum() / count


def nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean token cross-entropy over the tokens that count."""
    logp, mask = token_logprobs(_logits(model, batch), batch["labels"])
    return -token_mean(logp, mask, batch, "target_tokens")


@register("forget", "ga")
def ga(model, ref, batch, ctx) -> torch.Tensor:
    """Gradient ascent: the negated NLL on the forget batch."""
    return -nll(model, batch)


@register("forget", "npo", needs_reference=True, precomputable=True)
def npo(model, ref, batch, ctx) -> torch.Tensor:
    """Sequence-level NPO: -(2/beta) mean log sigmoid(-beta (log pi(x) - log pi_ref(x))).

    log pi_ref(x) comes from ``batch["ref_logp"]`` when precomputed, else from ``ref``."""
    logp, _ = sequence_logprob(model, batch)
    ref_logp = batch.get("ref_logp")
    if ref_logp is None:
        with torch.no_grad():
            ref_logp, _ = sequence_logprob(ref, batch)
    return -(2.0 / ctx.alg.beta) * F.logsigmoid(-ctx.alg.beta * (logp - ref_logp)).mean()


@register("forget", "simnpo")
def simnpo(model, ref, batch, ctx) -> torch.Tensor:
    """SimNPO: -(2/beta) mean log sigmoid(-(beta/|x|) log pi(x) - delta), no reference."""
    logp, length = sequence_logprob(model, batch)
    return -(2.0 / ctx.alg.beta) * F.logsigmoid(
        -(ctx.alg.beta / length.clamp(min=1)) * logp - ctx.alg.delta).mean()


@register("retain", "gdr")
def gdr(model, ref, batch, ctx) -> torch.Tensor:
    """Gradient descent on retain: NLL of the retain batch."""
    return nll(model, batch)


@register("retain", "klr", needs_reference=True)
def klr(model, ref, batch, ctx) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per retain token, averaged over the tokens that count."""
    logits = _logits(model, batch)[:, :-1].float()
    with torch.no_grad():
        ref_logits = _logits(ref, batch)[:, :-1].float()
    mask = batch["labels"][:, 1:] != -100
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1),
                  log_target=True, reduction="none").sum(-1)
    return token_mean(kl, mask, batch, "target_tokens")


def hidden_at(model: torch.nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """Output of decoder layer ``layer`` (0-based) itself, for every token.

    Read with a forward hook on the layer, as the WMDP code does. ``hidden_states[l + 1]``
    would differ at the last layer, where transformers returns the output after the
    final norm.
    """
    captured: list[torch.Tensor] = []

    def keep(module, args, output) -> None:  # noqa: ARG001 (hook signature)
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[layer].register_forward_hook(keep)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return captured[0]


def _masked_mse(a: torch.Tensor, b: torch.Tensor, batch: Batch) -> torch.Tensor:
    per_token = (a.float() - b.float()).pow(2).mean(-1)
    return token_mean(per_token, batch["attention_mask"], batch, "input_tokens")


@register("forget", "rmu")
def rmu_forget(model, ref, batch, ctx) -> torch.Tensor:
    """RMU: push layer-l activations on forget tokens towards c*u (mean squared error)."""
    h = hidden_at(model, batch, ctx.steering.layer)
    target = (ctx.coeff * ctx.control).to(h.device)
    return _masked_mse(h, target.expand_as(h), batch)


@register("retain", "rmu", needs_reference=True)
def rmu_retain(model, ref, batch, ctx) -> torch.Tensor:
    """RMU: keep layer-l activations on retain tokens equal to the frozen model's."""
    h = hidden_at(model, batch, ctx.steering.layer)
    with torch.no_grad():
        h_ref = hidden_at(ref, batch, ctx.steering.layer)
    return _masked_mse(h, h_ref, batch)


def control_vector(hidden_size: int, seed: int) -> torch.Tensor:
    """RMU's fixed random direction u: uniform [0, 1) entries, normalised to unit length."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()

