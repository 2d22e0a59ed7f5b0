"""Per-sample clipping of a micro-batch's contributions into the clipped sums.

Each sample's norm over a group, its clip factor (or automatic normalisation) and the sum of the clipped
per-sample gradients, accumulated in fp32 into ``clipped_sum``; the route each parameter takes comes from the
``RoutePlanner``. Contributions are of the batch loss: a mean loss's per-sample gradients are B times larger,
and that scale goes into the norms and clip factors (one scalar) instead of into every activation tensor.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dptrain import kernels
from dptrain.grad_sample.contributions import (
    Contribution,
    batch_size_of,
    clip_sq_norms,
    device_of,
    per_sample_sq_norms,
    weighted_sum,
)
from dptrain.grad_sample.grouping import ClipGroup
from dptrain.grad_sample.routes import Pending, RoutePlanner, Routes
from dptrain.grad_sample.statistics import NormEntry, NormLog

__all__ = ["Clipper"]


class Clipper:
    """Clips pending contributions group by group (per-layer) or all at once (flat, automatic)."""

    def __init__(self, clipping: str, loss_reduction: str, automatic_gamma: float, track_unclipped: bool,
                 planner: Optional[RoutePlanner], norm_log: NormLog, defer_sums: bool = False):
        if planner is None:  # the default routes; deferred sums: the factored one alone
            planner = RoutePlanner(dense_budget_bytes=0, fuse=False) if defer_sums else RoutePlanner()
        if defer_sums and (planner.dense_budget_bytes or planner.fuse):
            raise ValueError("deferred clipped sums need the factored route alone: pass "
                             "RoutePlanner(dense_budget_bytes=0, fuse=False)")
        self.clipping = clipping
        self.loss_reduction = loss_reduction
        self.automatic_gamma = automatic_gamma
        self.track_unclipped = track_unclipped
        self.planner = planner
        self.norm_log = norm_log
        self.clipped_sum: Dict[nn.Parameter, torch.Tensor] = {}
        self.unclipped_sum: Dict[nn.Parameter, torch.Tensor] = {}  # error feedback's input, when tracked
        self.defer_sums = defer_sums
        self.deferred: Dict[nn.Parameter, List[Tuple[Sequence[Contribution], torch.Tensor]]] = {}  # (uses, weights)

    def reset(self) -> None:
        self.clipped_sum, self.unclipped_sum, self.deferred = {}, {}, {}

    def take_sum(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        """The deferred clipped sum of ``p`` (fp32, full size; None if it has none), forgotten by the clipper."""
        out = None
        with kernels.ieee_fp32_matmul():
            for uses, weights in self.deferred.pop(p, []):
                out = weighted_sum(uses, weights, p.shape, out=out)
        return out

    def process(self, groups: Sequence[ClipGroup]) -> None:
        """Clip and sum the pending contributions of ``groups``, then clear them."""
        groups = [g for g in groups if g.pending]
        if not groups:
            return
        try:
            with kernels.ieee_fp32_matmul():
                if self.clipping == "per_layer":
                    for g in groups:
                        self._clip(g.pending, g.max_norm, g.name)
                else:  # one norm per sample over every group
                    pending = {p: uses for g in groups for p, uses in g.pending.items()}
                    self._clip(pending, groups[0].max_norm, groups[0].name)
        finally:
            for g in groups:
                g.pending = {}

    def _clip(self, pending: Pending, max_norm: float, count_as: str) -> None:
        """Clip ``pending`` with one norm per sample and add the clipped sums."""
        batch = batch_size_of(next(iter(pending.values()))[0])
        scale = float(batch) if self.loss_reduction == "mean" and batch else 1.0
        routes = self.planner.plan(pending, batch, per_layer=self.clipping == "per_layer")
        parts = {p: clip_sq_norms(uses) for p, uses in routes.factored.items()}  # {p: (B,)}
        sq = _total(parts.values()) if parts else torch.zeros(batch, device=device_of(next(iter(pending.values()))[0]))
        entry = functools.partial(NormEntry, count_as, max_norm)  # entry(norms, parts, blame)
        if routes.fused is not None:
            weights = self._clip_fused(routes.fused, pending[routes.fused][0], sq, scale, max_norm, parts, entry)
        elif routes.dense:
            weights = self._clip_dense(routes, pending, sq, scale, parts, entry)
        else:
            weights = self._weights(entry(sq.sqrt() * scale, parts, None), scale)
        for p, uses in routes.factored.items():
            self._accumulate(p, uses, weights)
        if self.track_unclipped:
            for p, uses in pending.items():
                full = torch.full((batch,), scale, dtype=torch.float32, device=device_of(uses[0]))
                self.unclipped_sum[p] = weighted_sum(uses, full, p.shape, out=self.unclipped_sum.get(p))

    def _clip_fused(self, p, use, sq, scale, max_norm, parts, entry) -> torch.Tensor:
        """Norm, clip factor and clipped sum of one big matrix in one pass; returns the (B,) weights."""
        grad, norms = kernels.fused_clip_linear_grad(*use.kernel_args, max_norm / scale, extra_sq_norms=sq,
                                                     out_dtype=torch.float32)
        weights = self._weights(entry(scale * norms, parts, p), scale)
        clipped = grad.reshape(p.shape).mul_(scale)
        self.clipped_sum[p] = self.clipped_sum[p].add_(clipped) if p in self.clipped_sum else clipped
        return weights

    def _clip_dense(self, routes: Routes, pending: Pending, sq, scale, parts, entry) -> torch.Tensor:
        """Densified parameters chunk by chunk (each chunk's norms include the factored parts); (B,) weights."""
        batch = sq.shape[0]
        whole = routes.chunk >= batch  # one chunk: no slicing
        weights = [self._clip_dense_chunk(routes, pending, sl, sq if whole else sq[sl],
                                          parts if whole else {p: part[sl] for p, part in parts.items()}, scale, entry)
                   for sl in (slice(i, min(batch, i + routes.chunk)) for i in range(0, batch, routes.chunk))]
        return torch.cat(weights) if len(weights) > 1 else weights[0]

    def _clip_dense_chunk(self, routes: Routes, pending: Pending, sl: slice, sq, parts, scale, entry) -> torch.Tensor:
        """The samples ``sl``: their per-sample gradients (freed on return, before the next chunk's), norms, weights
        (returned) and clipped sums."""
        grads = self.planner.densify(routes, pending, sl)  # {p: (b, *p.shape)}
        chunk_parts = {p: per_sample_sq_norms([d]) for p, d in grads.items()}
        chunk_sq = _total(chunk_parts.values(), sq)
        chunk_parts.update(parts)
        weights = self._weights(entry(chunk_sq.sqrt_().mul_(scale), chunk_parts, None), scale)
        for p, d in grads.items():
            self._accumulate(p, [d], weights)
        return weights

    def _weights(self, entry: NormEntry, scale: float) -> torch.Tensor:
        """Per-sample weights of the gradients, (b,): the clip factor (or automatic normalisation) times the loss
        scale. The norms are logged for the end-of-micro-batch check (NaN/inf, clip counts)."""
        self.norm_log.entries.append(entry)
        if self.clipping == "automatic":
            return (entry.max_norm * scale) / (entry.norms + self.automatic_gamma)
        return kernels.clip_factors(entry.norms, entry.max_norm).mul_(scale)

    def _accumulate(self, p: nn.Parameter, uses: Sequence[Contribution], weights: torch.Tensor) -> None:
        """clipped_sum[p] += sum_i weights_i G_i (in place after the first), or kept for ``take_sum``."""
        if self.defer_sums:
            self.deferred.setdefault(p, []).append((uses, weights))
        else:
            self.clipped_sum[p] = weighted_sum(uses, weights, p.shape, out=self.clipped_sum.get(p))


def _total(parts, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of per-sample tensors without the extra op that ``sum()``'s integer start costs."""
    parts = iter(parts)
    total = next(parts) if start is None else start + next(parts)
    for part in parts:
        total = total + part
    return total
