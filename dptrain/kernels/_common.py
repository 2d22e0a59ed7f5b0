"""Shared plumbing for the kernel ops: optional Triton import, backend dispatch, input checks, chunking."""

from __future__ import annotations

import os
from typing import Iterator

import torch

__all__ = [
    "BACKENDS",
    "STRATEGIES",
    "HAS_TRITON",
    "INTERPRETED",
    "DOT_FP32",
    "dot_acc",
    "MEMORY_CAP_BYTES",
    "triton",
    "tl",
    "use_triton",
    "check_strategy",
    "as_3d",
    "check_linear_inputs",
    "batch_chunks",
    "is_half",
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

if HAS_TRITON:

    @triton.jit
    def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
        """acc + a @ b with fp32 accumulation (operands upcast first when DOT_FP32)."""
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc)

else:  # pragma: no cover - depends on the environment
    dot_acc = None


def is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


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
