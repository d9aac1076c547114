"""How forget and retain gradients become one update direction (docs/method.md §2).

With g_f, g_r the gradients of the forget and retain losses over *all* trainable
parameters (the inner products run over every tensor, and in sharded training over
every rank's shard via ``all_reduce``):

* ``blur`` (forget-lower, BLUR):  d = w_f g_f + w_r (g_r - <g_r,g_f>/(|g_f|^2+eps) g_f)
                                    = w_r g_r + xi g_f,  xi = w_f - w_r <g_r,g_f>/(|g_f|^2+eps)
* ``blur_upper`` (roles swapped): d = w_f (g_f - <g_r,g_f>/(|g_r|^2+eps) g_r) + w_r g_r
                                    = w_f g_f + xi g_r,  xi = w_r - w_f <g_r,g_f>/(|g_r|^2+eps)
* ``penalty`` (weighted sum):     d = w_f g_f + w_r g_r

The reductions are one dot product per tensor and in-place foreach ops: no host
synchronisation and no gradient-sized buffer beyond g_f and g_r (half-precision gradients
are upcast one tensor at a time for their dot products).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Weights:
    forget: float = 1.0
    retain: float = 1.0
    eps: float = 1e-12


@dataclass(frozen=True)
class CombineStats:
    """Tensors (0-d) describing one combination; ``as_floats`` syncs them to the host once."""

    dot: torch.Tensor
    forget_sq: torch.Tensor
    retain_sq: torch.Tensor
    xi: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        packed = torch.stack([self.dot, self.forget_sq, self.retain_sq, self.xi]).double().tolist()
        dot, nf, nr, xi = packed
        denom = (nf * nr) ** 0.5 if nf >= 0 and nr >= 0 else float("nan")
        cosine = dot / denom if denom > 0 else (0.0 if denom == 0 else float("nan"))
        return {"dot": dot, "forget_sq": nf, "retain_sq": nr, "xi": xi, "cosine": cosine}


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> as a 0-d tensor, accumulated in at least float32 (a half-precision tensor is
    upcast, one tensor-sized copy at a time)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.dot(a.reshape(-1), b.reshape(-1))


def inner_products(g_f: list[torch.Tensor], g_r: list[torch.Tensor],
                   all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, ...]:
    """<g_r,g_f>, |g_f|^2, |g_r|^2 over all tensors, summed across ranks by ``all_reduce``."""
    if g_f:
        three = torch.stack([torch.stack([_dot(r, f), _dot(f, f), _dot(r, r)])
                             for f, r in zip(g_f, g_r, strict=True)]).sum(0)
    else:
        three = torch.zeros(3)
    if all_reduce is not None:
        three = all_reduce(three)
    return three[0], three[1], three[2]


@dataclass(frozen=True)
class Rule:
    """A registered combiner: from <g_r,g_f>, |g_f|^2, |g_r|^2 and the weights, the scales
    (s_r, s_f, xi) of d = s_r g_r + s_f g_f, xi being the one docs/method.md §2 logs."""

    name: str
    scales: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Weights],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    bilevel: bool  # projects one gradient on the other: needs a retain loss and whole gradients


COMBINERS: dict[str, Rule] = {}


def register(name: str, bilevel: bool):
    """Make a scales function available as ``algorithm.combiner: <name>``."""
    def add(scales):
        COMBINERS[name] = Rule(name, scales, bilevel)
        return scales
    return add


@register("blur", bilevel=True)
def _forget_lower(dot, nf, nr, w: Weights):
    xi = w.forget - w.retain * dot / (nf + w.eps)
    return torch.as_tensor(w.retain, dtype=dot.dtype), xi, xi


@register("blur_upper", bilevel=True)
def _forget_upper(dot, nf, nr, w: Weights):
    xi = w.retain - w.forget * dot / (nr + w.eps)
    return xi, torch.as_tensor(w.forget, dtype=dot.dtype), xi


@register("penalty", bilevel=False)
def _weighted_sum(dot, nf, nr, w: Weights):
    w_f = torch.as_tensor(w.forget, dtype=dot.dtype)
    return torch.as_tensor(w.retain, dtype=dot.dtype), w_f, w_f


def combine_(g_f: list[torch.Tensor], g_r: list[torch.Tensor], combiner: str,
             weights: Weights, all_reduce: AllReduce | None = None) -> CombineStats:
    """Overwrite ``g_r`` with the update direction d; ``g_f`` is used as scratch space.

    ``g_f`` and ``g_r`` are matching lists of gradient tensors (or local shards).
    Returns the statistics docs/method.md §2 lists.
    """
    if len(g_f) != len(g_r):
        raise ValueError(f"gradient lists differ in length: {len(g_f)} vs {len(g_r)}")
    if combiner not in COMBINERS:
        raise ValueError(f"unknown combiner {combiner!r}; expected one of {', '.join(COMBINERS)}")
    dot, nf, nr = inner_products(g_f, g_r, all_reduce)
    scale_r, scale_f, xi = COMBINERS[combiner].scales(dot, nf, nr, weights)
    if g_r:
        device = g_r[0].device
        torch._foreach_mul_(g_r, scale_r.to(device))
        torch._foreach_mul_(g_f, scale_f.to(device))
        torch._foreach_add_(g_r, g_f)
    return CombineStats(dot=dot, forget_sq=nf, retain_sq=nr, xi=xi.to(dot.dtype))


def combine(g_f: list[torch.Tensor], g_r: list[torch.Tensor], combiner: str = "blur",
            weights: Weights = Weights()) -> tuple[list[torch.Tensor], CombineStats]:
    """Pure form of ``combine_``: returns (d, stats) and leaves its inputs untouched."""
    d = [g.clone() for g in g_r]
    stats = combine_([g.clone() for g in g_f], d, combiner, weights)
    return d, stats
