"""Shared pieces of the kernel ops: optional Triton import, shared @triton.jit tiles, autotune tables, backend
dispatch, input checks, chunking."""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

__all__ = [
    "BACKENDS",
    "STRATEGIES",
    "HAS_TRITON",
    "INTERPRETED",
    "DOT_FP32",
    "GRAM_DTYPE",
    "gram_fp64",
    "gram_fp32_blocked",
    "gram_rounding",
    "gram_cost",
    "dot_acc",
    "upper_tile",
    "gram_tile",
    "autotune_configs",
    "min_block",
    "gram_partials",
    "tuning_bucket",
    "rows_2d",
    "row_sq_norms",
    "SUM_BLOCKS",
    "SUM_TABLE",
    "INSTANTIATE_BLOCKS",
    "INSTANTIATE_TABLE",
    "GRAM_BLOCKS",
    "LINEAR_GRAM_TABLE",
    "EMBEDDING_GRAM_TABLE",
    "MEMORY_CAP_BYTES",
    "triton",
    "tl",
    "use_triton",
    "check_strategy",
    "as_3d",
    "check_linear_inputs",
    "batch_chunks",
    "check_per_sample",
]

BACKENDS = ("auto", "torch", "triton")
STRATEGIES = ("auto", "ghost", "instantiate")

# Temporaries of the torch references ((B, T, T) Grams or (B, d_out, d_in) per-sample gradients) are built in
# batch chunks of at most this many bytes, so memory stays bounded for long sequences or wide layers.
MEMORY_CAP_BYTES = 256 * 2**20

try:  # Triton is optional: ``import dptrain.kernels`` must work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

# Triton decides at decoration time whether a kernel is compiled or interpreted, so the mode is fixed when
# this package is imported: TRITON_INTERPRET=1 must be set before that to run kernels on CPU tensors.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

# The interpreter's tl.dot mis-multiplies bfloat16 operands (numpy has no bfloat16), so under the interpreter
# the kernels upcast dot operands to fp32; compiled kernels keep half operands for tensor cores.
DOT_FP32 = INTERPRETED

# Gram (ghost) norms sum d products per entry: in fp32 crafted rows (long, nearly constant) round an entry by up
# to ~d 2^-24 of its terms, enough to state a cancelling sample's norm many times below its gradient's. fp64
# keeps that under 1e-12 of the terms, far inside the cancellation margin (``clip.CANCELLATION_RHO``).
GRAM_DTYPE = torch.float64
# Bytes of one fp64 copy in the torch Gram path, small enough to stay in a CPU's cache (the ghost norm of SmolLM2's
# 49152 x 576 LM head at B 2, T 128: 46 ms in 4 MiB blocks, 111 ms from one fp64 copy, 19 ms in fp32).
GRAM_BLOCK_BYTES = 4 * 2**20


def gram_fp64(v: torch.Tensor) -> torch.Tensor:
    """Per-sample Grams v v^T of (b, T, d) rows, (b, T, T) fp64, summed over blocks of features whose fp64 copies
    take ``GRAM_BLOCK_BYTES`` (exact products, fp64 sums)."""
    b, T, d = v.shape
    block = max(64, GRAM_BLOCK_BYTES // (8 * max(1, b * T)))
    gram = v.new_zeros(b, T, T, dtype=GRAM_DTYPE)
    for k in range(0, d, block):
        part = v[:, :, k : k + block].to(GRAM_DTYPE)  # (b, T, block)
        gram.baddbmm_(part, part.transpose(1, 2))
    return gram


# The CPU's Grams run in fp32 over blocks of features (``gram_fp32_blocked``): each entry is within a known bound of
# exact (``gram_rounding``), which the clip bound adds (``linear_norms.ghost_rounding_allowance``). As fast as one
# fp32 product and 2.5-3x faster than fp64; blocks of 128 keep an entry's rounding depth near its least (~2 sqrt(d))
# at the speed of wider blocks. Beyond GRAM_FP32_MAX_ABS a product could overflow: fp64 instead.
GRAM_FP32_BLOCK = 128
GRAM_FP32_MAX_ABS = 2.0**50


def gram_rounding(d: int) -> tuple[float, float]:
    """(relative, absolute) error bounds of an entry of ``gram_fp32_blocked`` over ``d`` features: it is within
    gamma_D sum_k |v_tk v_sk| + 2 d 2^-126 of exact. D = k + ceil(d / k) + 1 bounds the roundings a product goes
    through (its own, at most k - 1 in its block's product whatever the GEMM's order, one per block added after it),
    gamma_D = D u / (1 - D u); the absolute part, an underflow at each of the ~2d operations, holds even with
    flush-to-zero."""
    depth = GRAM_FP32_BLOCK + -(-d // GRAM_FP32_BLOCK) + 1
    unit = depth * 2.0**-24
    return unit / (1 - unit), 2 * d * 2.0**-126


def gram_fp32_blocked(v: torch.Tensor) -> torch.Tensor | None:
    """Per-sample Grams v v^T of (b, T, d) fp32 rows, (b, T, T) fp32: one product per block of ``GRAM_FP32_BLOCK``
    features, added one by one (not ``baddbmm``, which may fold the running sum into the block's own); None when a
    value is beyond ``GRAM_FP32_MAX_ABS`` or not finite."""
    low, high = torch.aminmax(v)
    if not (-GRAM_FP32_MAX_ABS <= float(low) and float(high) <= GRAM_FP32_MAX_ABS):  # also False for NaN
        return None
    k = GRAM_FP32_BLOCK
    gram = torch.bmm(v[:, :, :k], v[:, :, :k].transpose(1, 2))  # (b, T, T)
    block = torch.empty_like(gram)
    for start in range(k, v.shape[2], k):
        part = v[:, :, start : start + k]  # (b, T, k)
        gram.add_(torch.bmm(part, part.transpose(1, 2), out=block))
    return gram


def gram_cost(device_type: str) -> float:
    """What one Gram multiply-add costs in working-precision ones: 1 on a CPU (fp32 blocks, ``gram_fp32_blocked``),
    15 on an accelerator (fp64 there; an H200's fp64 against its bf16 tensor-core peak, not measured)."""
    return 1.0 if device_type == "cpu" else 15.0

if HAS_TRITON:

    @triton.jit
    def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
        """acc + a @ b with fp32 accumulation (operands upcast first when DOT_FP32). fp32 operands multiply in full
        fp32 ("ieee"): Triton's default TF32 keeps 10 mantissa bits, and a norm off by 1e-3 would let a clipped
        sample exceed C; half operands are exact in the fp32 products of the tensor cores anyway."""
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee")

    @triton.jit
    def upper_tile(p, T, BLOCK_T: tl.constexpr):
        """Program ``p``'s tile of a symmetric (T, T) Gram: row and column offsets, whether it does work (on or
        above the diagonal) and its weight in the sum (2 above the diagonal, 1 on it, 0 below)."""
        n_t = tl.cdiv(T, BLOCK_T)
        tr = p // n_t
        tc = p % n_t
        offs_r = tr * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tc * BLOCK_T + tl.arange(0, BLOCK_T)
        upper = tc >= tr
        weight = tl.where(tc > tr, 2.0, tl.where(upper, 1.0, 0.0))
        return offs_r, offs_c, upper, weight

    @triton.jit
    def gram_tile(base, offs_r, offs_c, T, D, end, stride_t, stride_d, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_T, BLOCK_T) tile of a sample's Gram matrix v v^T, v: (T, D) at ``base``, summed over the
        features [0, end) (end = 0: a skipped tile), fp64 (``GRAM_DTYPE``: operands upcast, products and sums in
        fp64)."""
        offs_k = tl.arange(0, BLOCK_K)
        gram = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float64)
        for k0 in range(0, end, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(base + offs_r[:, None] * stride_t + k[None, :] * stride_d,
                        mask=(offs_r[:, None] < T) & (k[None, :] < D), other=0.0)  # (BLOCK_T, BLOCK_K)
            bt = tl.load(base + offs_c[None, :] * stride_t + k[:, None] * stride_d,
                         mask=(offs_c[None, :] < T) & (k[:, None] < D), other=0.0)  # (BLOCK_K, BLOCK_T)
            gram = tl.dot(a.to(tl.float64), bt.to(tl.float64), gram)
        return gram

else:  # pragma: no cover - depends on the environment
    dot_acc = upper_tile = gram_tile = None


def autotune_configs(names: Sequence[str], table: Sequence[tuple]) -> list:
    """One ``triton.Config`` per row of ``table`` (the block sizes in ``names`` order, then num_warps and
    num_stages); under the interpreter a single small config (every block 16)."""
    if INTERPRETED:
        return [triton.Config({name: 16 for name in names})]
    return [triton.Config(dict(zip(names, row)), num_warps=row[-2], num_stages=row[-1]) for row in table]


def min_block(configs: list, name: str) -> int:
    """The smallest ``name`` block of ``configs`` (sizes the partial-sum buffers so that any config fits)."""
    return min(c.kwargs[name] for c in configs)


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """(B, T, d) as a (B*T, d) tensor with a row stride (copies only if the (B, T) dims cannot merge)."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2])


ROW_NORM_BLOCK = 4096  # elements reduced by one norm before the partial sums are added (a cascade sum)


def row_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every row of ``t`` (B, n), fp32, in two levels: norms of blocks of ``ROW_NORM_BLOCK``
    elements, then the sum of their squares. torch's CPU norm sums a whole row in one running fp32 total (relative
    error -2e-4 at 8M elements, 1.5e-2 at 28M), which would understate a norm and let a clipped sample exceed C."""
    b, n = t.shape
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    if n <= ROW_NORM_BLOCK:  # short rows (biases, norm layers): one norm is accurate
        return torch.linalg.vector_norm(t, dim=1, dtype=work).square().float()
    whole = n - n % ROW_NORM_BLOCK
    blocks = t[:, :whole].reshape(b, whole // ROW_NORM_BLOCK, ROW_NORM_BLOCK)  # a view for a contiguous t
    total = torch.linalg.vector_norm(blocks, dim=2, dtype=work).square().sum(1)  # (b,)
    if whole < n:
        total = total + torch.linalg.vector_norm(t[:, whole:], dim=1, dtype=work).square()
    return total.float()


def tuning_bucket(n: int) -> int:
    """The autotuning key of a size that changes from step to step (a Poisson batch's B * T, a padded length T):
    the next power of two, so a config is tuned once per bucket, not once per batch (each tuning times every
    config: most of a second)."""
    return triton.next_power_of_2(n)


def gram_partials(batch: int, T: int, configs: list, device: torch.device):
    """A Gram kernel's output and grid: a zeroed (batch, n_tiles) fp64 buffer, one partial sum per (T, T) tile,
    sized for the smallest BLOCK_T of ``configs`` so any config fits (summed after: deterministic, no atomics),
    and the launch grid (batch, tiles of the chosen BLOCK_T)."""
    n_t = triton.cdiv(T, min_block(configs, "BLOCK_T"))
    partial = torch.zeros(batch, n_t * n_t, dtype=GRAM_DTYPE, device=device)

    def grid(meta):
        return (batch, triton.cdiv(T, meta["BLOCK_T"]) ** 2)

    return partial, grid


# Autotune tables, one row a config: (blocks in the *_BLOCKS order..., num_warps, num_stages).
# Linear-layer sums (scaled gradient, fused clip): tiles of the (d_out, d_in) output, BLOCK_K rows per step.
SUM_BLOCKS = ("BLOCK_O", "BLOCK_I", "BLOCK_K")
SUM_TABLE = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3),
             (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
# Instantiated per-sample linear gradients: tiles of G_b (d_out, d_in), BLOCK_T tokens per step.
INSTANTIATE_BLOCKS = ("BLOCK_O", "BLOCK_I", "BLOCK_T")
INSTANTIATE_TABLE = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                     (64, 64, 64, 4, 4), (128, 256, 32, 8, 3)]
# Gram kernels: (BLOCK_T, BLOCK_T) tiles of a sample's (T, T) Gram, BLOCK_K features per step.
GRAM_BLOCKS = ("BLOCK_T", "BLOCK_K")
LINEAR_GRAM_TABLE = [(64, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3), (128, 32, 8, 4)]
EMBEDDING_GRAM_TABLE = [(64, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3), (32, 128, 4, 4)]


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend`` for these tensors: True to launch the Triton kernel, False for the torch reference.

    "auto" picks Triton for CUDA tensors of a kernel dtype (fp32/bf16/fp16), the reference otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, found {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return False
    kernel_dtypes = all(t.dtype in _KERNEL_DTYPES for t in tensors if t.is_floating_point())
    if backend == "auto":
        return HAS_TRITON and on_cuda and kernel_dtypes
    if not kernel_dtypes:
        found = sorted({str(t.dtype) for t in tensors if t.is_floating_point()})
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, found {', '.join(found)}")
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not on_cuda:
        if any(t.is_cuda for t in tensors):
            raise ValueError("backend='triton' needs all tensors on one device, found a mix of CUDA and CPU")
        if not INTERPRETED:
            raise RuntimeError(
                "backend='triton' on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing dptrain.kernels, or use backend='torch' / 'auto'"
            )
    return True


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, found {strategy!r}")
    return strategy


def as_3d(t: torch.Tensor, name: str) -> torch.Tensor:
    """View (B, d) as (B, 1, d) and (B, *, d) as (B, T, d)."""
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (B, d) or (B, T, d), found shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, found dtype {t.dtype}")
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def check_linear_inputs(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a linear layer's input ``x`` and output gradient ``g``; return (B, T, d_in), (B, T, d_out) views."""
    if x.shape[:-1] != g.shape[:-1] or x.dim() != g.dim():
        raise ValueError(
            f"x and g must agree in all but the last dimension, found x {tuple(x.shape)} and g {tuple(g.shape)}"
        )
    if x.device != g.device:
        raise ValueError(f"x and g must be on one device, found {x.device} and {g.device}")
    return as_3d(x, "x"), as_3d(g, "g")


def check_per_sample(v: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Validate a (B,) per-sample vector; return it as fp32."""
    v = torch.as_tensor(v)
    if v.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), found {tuple(v.shape)}")
    return v.float()


def batch_chunks(batch: int, bytes_per_sample: int, cap: int | None = None) -> Iterator[slice]:
    """Slices over the batch whose temporaries stay under ``cap`` bytes (at least one sample per chunk)."""
    cap = MEMORY_CAP_BYTES if cap is None else cap
    step = max(1, cap // max(1, bytes_per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))
