"""Forget and retain losses (SPEC §3), each a function of (model, reference, batch).

A batch is a dict with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where a
token is padding or prompt). Token log-likelihoods skip those positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from blurctl.recipe import AlgorithmConfig

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, "torch.nn.Module | None", Batch, AlgorithmConfig], torch.Tensor]


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each next token and the mask of positions that count."""
    targets = labels[:, 1:]
    mask = targets != -100
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                            targets.clamp(min=0).flatten(), reduction="none")
    return logp.view_as(targets) * mask, mask


def sequence_logprob(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(x) (sum of token log-probs) per sequence, and the number of tokens counted."""
    logp, mask = token_logprobs(_logits(model, batch), batch["labels"])
    return logp.sum(-1), mask.sum(-1)


def nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean token cross-entropy over the tokens that count."""
    logp, mask = token_logprobs(_logits(model, batch), batch["labels"])
    return -logp.sum() / mask.sum().clamp(min=1)


def ga(model, ref, batch, cfg) -> torch.Tensor:
    """Gradient ascent: the negated NLL on the forget batch."""
    return -nll(model, batch)


def npo(model, ref, batch, cfg) -> torch.Tensor:
    """Sequence-level NPO: -(2/beta) mean log sigmoid(-beta (log pi(x) - log pi_ref(x)))."""
    logp, _ = sequence_logprob(model, batch)
    with torch.no_grad():
        ref_logp, _ = sequence_logprob(ref, batch)
    return -(2.0 / cfg.beta) * F.logsigmoid(-cfg.beta * (logp - ref_logp)).mean()


def simnpo(model, ref, batch, cfg) -> torch.Tensor:
    """SimNPO: -(2/beta) mean log sigmoid(-(beta/|x|) log pi(x) - delta), no reference."""
    logp, length = sequence_logprob(model, batch)
    return -(2.0 / cfg.beta) * F.logsigmoid(
        -(cfg.beta / length.clamp(min=1)) * logp - cfg.delta).mean()


def gdr(model, ref, batch, cfg) -> torch.Tensor:
    """Gradient descent on retain: NLL of the retain batch."""
    return nll(model, batch)


def klr(model, ref, batch, cfg) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per retain token, averaged over the tokens that count."""
    logits = _logits(model, batch)[:, :-1].float()
    with torch.no_grad():
        ref_logits = _logits(ref, batch)[:, :-1].float()
    mask = batch["labels"][:, 1:] != -100
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1),
                  log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


FORGET_LOSSES: dict[str, LossFn] = {"ga": ga, "npo": npo, "simnpo": simnpo}
RETAIN_LOSSES: dict[str, LossFn] = {"gdr": gdr, "klr": klr}
NEEDS_REFERENCE = {"npo", "klr"}
