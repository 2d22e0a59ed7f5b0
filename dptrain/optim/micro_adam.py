"""MicroAdam (Modoranu, Safaryan, Malinovsky, Kurtic, Robert, Richtarik, Alistarh, NeurIPS 2024, arXiv 2405.15593).

Adam statistics rebuilt from the last ``m`` top-k sparsified gradients, with 4-bit compressed error feedback
(Algorithm 1 of the paper). Every parameter, whatever its shape, is treated as a flat vector of ``d`` entries:

1. ``a = g + Q^-1(e)``: the gradient plus the dequantised error of the previous step;
2. block-wise top-k: ``a`` is cut into blocks of ``topk_block_size`` entries (the last block may be shorter)
   and each keeps its ``ceil(density * block)`` entries of largest ``|a|``; their block-local indices (int16)
   and values (bf16) go to row ``(t - 1) mod m`` of a ring buffer of ``m`` rows;
3. ``e = Q(a with the kept entries set to 0)``: 4-bit asymmetric quantisation in blocks of
   ``quant_block_size`` entries, ``code = floor((x - min) / u + 1/2)``, ``u = (max - min) / 15``,
   ``Q^-1(code) = min + code * u`` (two codes per byte);
4. Adam statistics from the ring buffer, a row of age ``s`` (written ``s`` steps ago) weighted ``beta^s``:
   ``m_hat = (1 - b1) / (1 - b1^t) sum_rows b1^s v``, ``v_hat = (1 - b2) / (1 - b2^t) sum_rows b2^s v^2``
   (values scattered to their indices, rows not yet written skipped); update ``m_hat / (sqrt(v_hat) + eps)``;
5. ``p <- p (1 - lr wd) - lr * update``.

State per parameter: ``m k`` int16 indices and ``m k`` bf16 values (``k ~ density d``), ``ceil(d / 2)`` bytes
of error, two statistics per quantisation block: about ``4 m density + 0.5`` bytes per entry, 0.9 at the
defaults against 8 for fp32 AdamW. Differences from the authors' CUDA release: the error's min/max are kept in
the computation dtype (fp32 or wider, not bf16) and the statistics are computed in that dtype; the top-k block
size is an option (theirs follows the GPU's shared memory). The gradient ``.grad`` is only read.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dptrain.validation import check_fraction, check_positive_int

from ._base import LowMemoryOptimizer
from ._common import adam_compute_dtype

__all__ = ["MicroAdam", "dequantize_4bit", "quantize_4bit"]

_MAX_TOPK_BLOCK = 2**15  # block-local indices are stored as int16


def _as_blocks(x: Tensor, size: int) -> Tensor:
    """``(d,)`` -> ``(ceil(d / size), size)``; the last block is padded with copies of the last entry."""
    pad = -x.numel() % size
    if pad:
        x = torch.cat([x, x[-1:].expand(pad)])
    return x.view(-1, size)


def quantize_4bit(x: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """4-bit block-wise asymmetric quantisation of ``x`` (d,): packed codes ``(ceil(d/2),)`` uint8, min, max."""
    blocks = _as_blocks(x, block_size)  # (nb, q)
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)  # (nb,)
    unit = (hi - lo) / 15
    unit = torch.where(unit > 0, unit, torch.ones_like(unit))  # a constant block: code 0 decodes to lo exactly
    codes = torch.floor((blocks - lo[:, None]) / unit[:, None] + 0.5).clamp_(0, 15)  # (nb, q)
    codes = codes.to(torch.uint8).view(-1)[: x.numel()]  # (d,)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return (codes[0::2] << 4) | codes[1::2], lo, hi  # (ceil(d/2),), (nb,), (nb,)


def dequantize_4bit(packed: Tensor, lo: Tensor, hi: Tensor, numel: int, block_size: int) -> Tensor:
    """Inverse of :func:`quantize_4bit`: ``min + code * (max - min) / 15`` per entry, ``(numel,)``."""
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:numel]  # (d,)
    blocks = _as_blocks(codes.to(lo.dtype), block_size)  # (nb, q)
    return (lo[:, None] + blocks * ((hi - lo) / 15)[:, None]).view(-1)[:numel]  # (d,)


def _topk_layout(numel: int, block: int, density: float) -> tuple[int, int, int, int]:
    """``(block, full_blocks, k_per_full_block, k_last_block)`` of the block-wise top-k of ``numel`` entries."""
    block = min(block, numel)
    full = numel // block
    return block, full, math.ceil(density * block), math.ceil(density * (numel - full * block))


class MicroAdam(LowMemoryOptimizer):
    """MicroAdam: Adam from a ring buffer of ``m`` top-k gradients with 4-bit error feedback.

    Args:
        lr, betas, eps, weight_decay: as AdamW (decoupled weight decay).
        m: rows of the ring buffer (number of past sparse gradients the statistics are built from).
        density: fraction k of each top-k block kept per step, in (0, 1].
        topk_block_size: entries per top-k block (at most 32768: indices are block-local int16).
        quant_block_size: entries per quantisation block of the error (one min and max each).

    Every parameter, matrices and vectors alike, gets this rule (as in the paper).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, m: int = 10, density: float = 0.01, topk_block_size: int = 16384,
                 quant_block_size: int = 100_000) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=m, density=density,
                        topk_block_size=topk_block_size, quant_block_size=quant_block_size)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_positive_int("m", group["m"])
        check_fraction("density", group["density"], closed_right=True)
        if check_positive_int("topk_block_size", group["topk_block_size"]) > _MAX_TOPK_BLOCK:
            raise ValueError(f"topk_block_size must be <= {_MAX_TOPK_BLOCK} (int16 indices), "
                             f"found {group['topk_block_size']}")
        check_positive_int("quant_block_size", group["quant_block_size"])

    def _tensor_direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> Tensor:
        t, rows, qblock = state["step"], group["m"], group["quant_block_size"]
        beta1, beta2 = group["betas"]
        dtype = adam_compute_dtype(grad.dtype)
        d = grad.numel()
        if d == 0:
            return torch.zeros_like(grad)
        block, full, k_full, k_last = _topk_layout(d, group["topk_block_size"], group["density"])
        k = full * k_full + k_last
        if "ring_indices" not in state:
            nq = math.ceil(d / qblock)
            state["ring_indices"] = torch.zeros(rows, k, dtype=torch.int16, device=grad.device)  # (m, k)
            state["ring_values"] = torch.zeros(rows, k, dtype=torch.bfloat16, device=grad.device)  # (m, k)
            state["error"] = torch.zeros(math.ceil(d / 2), dtype=torch.uint8, device=grad.device)  # (ceil(d/2),)
            state["error_min"] = torch.zeros(nq, dtype=dtype, device=grad.device)  # (nq,)
            state["error_max"] = torch.zeros(nq, dtype=dtype, device=grad.device)  # (nq,)
        # block start of each of the k kept entries: local index + offset = flat index
        offsets = torch.cat([torch.arange(full, device=grad.device).repeat_interleave(k_full) * block,
                             torch.full((k_last,), full * block, device=grad.device)])  # (k,)

        # 1. error feedback; 2. block-wise top-k into ring row (t - 1) mod m
        acc = grad.reshape(-1).to(dtype) + dequantize_4bit(state["error"], state["error_min"], state["error_max"],
                                                           d, qblock)  # (d,)
        mag = acc.abs()
        local = [torch.topk(mag[: full * block].view(full, block), k_full, dim=1, sorted=False).indices.view(-1)]
        if k_last:
            local.append(torch.topk(mag[full * block:], k_last, sorted=False).indices)
        local = torch.cat(local)  # (k,)
        flat = local + offsets  # (k,)
        row = (t - 1) % rows
        state["ring_indices"][row] = local.to(torch.int16)
        state["ring_values"][row] = acc[flat].to(torch.bfloat16)
        # 3. the rest becomes the new 4-bit error
        acc[flat] = 0
        packed, lo, hi = quantize_4bit(acc, qblock)
        state["error"].copy_(packed)
        state["error_min"].copy_(lo)
        state["error_max"].copy_(hi)

        # 4. Adam statistics from the ring buffer: row j was written (t - 1 - j) mod m steps ago
        filled = min(t, rows)
        ages = [(t - 1 - j) % rows for j in range(filled)]
        w1 = torch.tensor([beta1**s for s in ages], dtype=dtype, device=grad.device)[:, None]  # (filled, 1)
        w2 = torch.tensor([beta2**s for s in ages], dtype=dtype, device=grad.device)[:, None]  # (filled, 1)
        values = state["ring_values"][:filled].to(dtype)  # (filled, k)
        where = (state["ring_indices"][:filled].long() + offsets).view(-1)  # (filled * k,)
        first = torch.zeros(d, dtype=dtype, device=grad.device).index_add_(0, where, (w1 * values).view(-1))
        second = torch.zeros(d, dtype=dtype, device=grad.device).index_add_(0, where, (w2 * values * values).view(-1))
        c1 = (1 - beta1) / (1 - beta1**t)
        c2 = (1 - beta2) / (1 - beta2**t)
        return ((c1 * first) / ((c2 * second).sqrt() + group["eps"])).view(grad.shape)  # (d,) -> grad's shape
