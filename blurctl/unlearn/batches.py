"""Which examples each rank uses at each step: seeded permutations indexed by the global
step, so a run is reproducible, resumes exactly, and every rank of a distributed run takes
its slice of the same global batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blurctl.recipe import Recipe, grad_accum


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each rank uses at each micro-step, from seeded permutations."""

    size: int
    micro_batch: int
    world: int
    rank: int
    seed: int
    shuffle: bool = True

    def indices(self, position: int) -> list[int]:
        """Indices of this rank's slice of global micro-batch number ``position``."""
        span = self.micro_batch * self.world
        out = []
        for q in range(position * span + self.rank * self.micro_batch,
                       position * span + (self.rank + 1) * self.micro_batch):
            epoch, offset = divmod(q, self.size)
            out.append(self._perm(epoch)[offset])
        return out

    def _perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()


def steps_per_epoch(n_forget: int, recipe: Recipe, world: int) -> int:
    """Optimizer steps in one pass over ``n_forget`` forget chunks."""
    per_step = recipe.train.batch_size * grad_accum(recipe) * world
    return max(1, math.ceil(n_forget / per_step))
