"""Which route each parameter's per-sample gradients take through clipping.

- dense: explicit per-sample gradients, built in batch chunks of fp32 buffers (CPU only, where
  for sequences they beat ghost norms; ``densify_gain`` says when);
- fused: the kernel API's norm-clip-sum of one single-use linear weight in one pass (per-layer clipping;
  the GPU path, whose kernels never write per-sample gradients);
- factored: norms from the contributions (ghost/Gram or instantiated), then weighted sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from dptrain.grad_sample.contributions import (
    DENSE_CACHE_BYTES,
    DENSE_PASS_COST,
    Contribution,
    Factored,
    Instantiated,
    dense_pass_cost,
    densify,
    densify_gain,
    device_of,
    select_samples,
)

__all__ = ["RoutePlanner", "Routes", "DENSE_BUDGET_BYTES"]

# Bytes of explicit per-sample gradients alive at once (one batch chunk).
DENSE_BUDGET_BYTES = 48 * 2**20

Pending = Dict[nn.Parameter, List[Contribution]]


@dataclass
class Routes:
    """One clipping call's plan: ``dense`` parameters (an ordered set) in chunks of ``chunk`` samples, at most one
    ``fused`` weight, and the ``factored`` rest."""

    dense: Dict[nn.Parameter, None]
    chunk: int
    fused: Optional[nn.Parameter]
    factored: Pending


class RoutePlanner:
    """Plans the routes within a byte budget for dense per-sample gradients and builds them.

    ``dense_budget_bytes=0`` turns the dense route off; a very negative ``dense_pass_cost`` densifies every
    linear-like use that fits; a chunk of one parameter's per-sample gradients stays within ``cache_bytes`` where a
    sample fits; ``fuse=False`` turns the fused route off."""

    def __init__(self, dense_budget_bytes: int = DENSE_BUDGET_BYTES, dense_pass_cost: float = DENSE_PASS_COST,
                 fuse: bool = True, cache_bytes: int = DENSE_CACHE_BYTES):
        self.dense_budget_bytes = dense_budget_bytes
        self.dense_pass_cost = dense_pass_cost
        self.cache_bytes = cache_bytes
        self.fuse = fuse

    def plan(self, pending: Pending, batch: int, per_layer: bool) -> Routes:
        dense, chunk = self._plan_dense(pending, batch)
        fused = None
        if per_layer and self.fuse and not dense:
            fused = next((p for p, u in pending.items()
                          if len(u) == 1 and isinstance(u[0], Factored) and not u[0].is_index), None)
        factored = {p: u for p, u in pending.items() if p not in dense and p is not fused}
        return Routes(dense, chunk, fused, factored)

    def _plan_dense(self, pending: Pending, batch: int) -> Tuple[Dict[nn.Parameter, None], int]:
        """Parameters worth densifying (CPU only, most work saved per byte first) and the samples per chunk."""
        if batch == 0 or device_of(next(iter(pending.values()))[0]).type != "cpu":
            return {}, 0
        # samples per chunk if every pending parameter were dense (at least that many), and per parameter the most
        # whose per-sample gradients stay in cache: a smaller chunk costs nothing, a spilled one two memory passes
        chunk = min(batch, max(1, self.dense_budget_bytes // max(1, 4 * sum(p.numel() for p in pending))))
        cached = {p: max(1, self.cache_bytes // max(1, 4 * p.numel())) for p in pending}
        gains = {p: densify_gain(u, p.numel(), dense_pass_cost(min(chunk, cached[p]) * p.numel(),
                                                               self.dense_pass_cost, self.cache_bytes))
                 for p, u in pending.items()}
        chosen, per_sample = {}, 0  # an ordered set: `in` on a list would compare tensors
        for p in sorted((p for p in gains if gains[p] > 0), key=lambda p: -gains[p] / p.numel()):
            if 4 * (per_sample + p.numel()) <= self.dense_budget_bytes:
                chosen[p] = None
                per_sample += p.numel()
        return chosen, min([batch, self.dense_budget_bytes // max(1, 4 * per_sample)] + [cached[p] for p in chosen])

    def densify(self, routes: Routes, pending: Pending, sl: slice) -> Dict[nn.Parameter, Instantiated]:
        """Explicit per-sample gradients {p: Instantiated (b, *p.shape)} of the samples ``sl`` of the dense
        parameters, each in a buffer of its own: freed with the chunk, so nothing is held through the next forward
        and backward pass (where memory peaks); malloc serves the next chunk's from the freed chunks."""
        b = sl.stop - sl.start
        return {p: densify([select_samples(c, sl) for c in pending[p]], torch.empty(b, *p.shape)) for p in routes.dense}
