"""Triton kernels vs the torch reference and an einsum oracle.

Runs on CUDA when a GPU is present; on CPU only inside a process started with TRITON_INTERPRET=1 (see
test_triton_interpreter.py, which runs this file that way), otherwise the whole module is skipped.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from dptrain import kernels as K  # noqa: E402
from dptrain.kernels import _common  # noqa: E402
from tests.kernels import oracles  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
elif _common.INTERPRETED:
    DEVICE = "cpu"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (test_triton_interpreter.py runs them so)", allow_module_level=True)

# (B, T, d_in, d_out): odd sizes exercise every mask; the second spans several tiles of 16 in each dimension
SHAPES = [(3, 5, 7, 9), (2, 37, 20, 33)]
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 2e-2), (torch.float16, 1e-3, 5e-3)]


def _inputs(B, T, d_in, d_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=gen).to(device=DEVICE, dtype=dtype)
    g = torch.randn(B, T, d_out, generator=gen).to(device=DEVICE, dtype=dtype)
    return x, g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_linear_norms(shape, dtype, atol, rtol, strategy):
    x, g = _inputs(*shape, dtype)
    got = K.per_sample_linear_grad_norms(x, g, strategy=strategy, backend="triton")
    assert got.dtype == torch.float32 and got.device == x.device
    ref = K.per_sample_linear_grad_norms(x, g, strategy=strategy, backend="torch")
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got.cpu().double(), oracles.linear_norms(x.cpu(), g.cpu()), atol=atol, rtol=rtol)


def test_linear_norms_two_dim_and_non_contiguous_inputs():
    x, g = _inputs(4, 6, 9, 11, torch.float32)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (T*d, 1, T)
    got = K.per_sample_linear_grad_norms(xt, g, strategy="instantiate", backend="triton")
    torch.testing.assert_close(got.cpu().double(), oracles.linear_norms(x.cpu(), g.cpu()), rtol=1e-4, atol=1e-5)
    got2 = K.per_sample_linear_grad_norms(x[:, 0], g[:, 0], backend="triton")
    want2 = x[:, 0].double().norm(dim=1) * g[:, 0].double().norm(dim=1)
    torch.testing.assert_close(got2.double(), want2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_scaled_linear_grad(shape, dtype, atol, rtol):
    x, g = _inputs(*shape, dtype)
    scale = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = K.scaled_linear_grad(x, g, scale, backend="triton")
    assert got.dtype == dtype and got.shape == (shape[3], shape[2])
    want = oracles.scaled_sum(x.cpu(), g.cpu(), scale.cpu())
    tol = atol * math.sqrt(shape[0] * shape[1])
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [1.0, 1e-4])
def test_scaled_sum_of_half_inputs_in_fp32_is_exact_to_fp32(shape, dtype, magnitude):
    """Half inputs, fp32 output: the only rounding left is fp32's. A scale applied to one half operand and rounded
    to it (2^-9 per term) misses the fp64 oracle by ~1e-3 (bf16 hi + lo: ~1e-5) and lets a clipped sample weigh
    more than C; so does an fp16 hi + lo at small magnitudes (lo underflows), hence fp32 products for fp16."""
    x, g = _inputs(*shape, dtype)
    g = (g.float() * magnitude).to(dtype)
    scale = (0.3 + torch.rand(shape[0], generator=torch.Generator().manual_seed(1))).to(DEVICE)
    for backend in ("triton", "torch"):
        got = K.scaled_linear_grad(x, g, scale, backend=backend, out_dtype=torch.float32)
        assert got.dtype == torch.float32
        want = oracles.scaled_sum(x.cpu(), g.cpu(), scale.cpu())
        assert float((got.cpu().double() - want).norm() / want.norm()) < 5e-5, backend


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_fused_clip_with_extra_norms(shape, dtype, atol, rtol, strategy):
    x, g = _inputs(*shape, dtype)
    sq = oracles.clip_sq_norms(x.cpu(), g.cpu(), K.CANCELLATION_RHO)
    max_norm = 0.7 * float(sq.sqrt().median())
    extra = (torch.rand(shape[0], generator=torch.Generator().manual_seed(2)) * max_norm**2).to(DEVICE)
    grad, norms = K.fused_clip_linear_grad(x, g, max_norm, extra_sq_norms=extra, strategy=strategy, backend="triton")
    want_norms = (sq + extra.cpu().double()).sqrt()
    torch.testing.assert_close(norms.cpu().double(), want_norms, atol=atol, rtol=rtol)
    factors = K.clip_factors(want_norms.float(), max_norm).double()
    tol = atol * math.sqrt(shape[0] * shape[1])
    torch.testing.assert_close(grad.cpu().double(), oracles.scaled_sum(x.cpu(), g.cpu(), factors), atol=tol, rtol=rtol)
    ref_grad, _ = K.fused_clip_linear_grad(x, g, max_norm, extra_sq_norms=extra, backend="torch")
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=tol, rtol=rtol)


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
def test_embedding_norms(padding_idx, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (3, 21), generator=gen)
    ids[1, :5] = 3
    g = torch.randn(3, 21, 18, generator=gen).to(dtype)
    got = K.per_sample_embedding_grad_norms(ids.to(DEVICE), g.to(DEVICE), padding_idx=padding_idx, backend="triton")
    want = oracles.embedding_norms_by_autograd(ids, g, 6, padding_idx)
    torch.testing.assert_close(got.cpu().double(), want, atol=atol, rtol=rtol)


@pytest.mark.skipif(DEVICE != "cuda", reason="dispatch of backend='auto' to Triton happens on CUDA tensors only")
def test_auto_backend_uses_triton_on_cuda(monkeypatch):
    import dptrain.kernels.linear_norms as ln

    calls = []
    real = ln.linear_grad_sq_norms_triton
    monkeypatch.setattr(ln, "linear_grad_sq_norms_triton", lambda *a: calls.append(1) or real(*a))
    x, g = _inputs(2, 5, 7, 9, torch.float32)
    K.per_sample_linear_grad_norms(x, g)
    assert calls == [1]


def test_triton_backend_rejects_float64_by_name():
    x, g = _inputs(2, 3, 4, 5, torch.float64)
    with pytest.raises(TypeError, match="found torch.float64"):
        K.per_sample_linear_grad_norms(x, g, backend="triton")


def test_autotuning_keys_take_one_value_per_size_bucket(monkeypatch):
    """Poisson batches change B every step and padded batches change T: each new key would time every config
    again (most of a second per kernel and shape). Sizes in one power-of-two bucket share one key."""
    from dptrain.kernels import embedding_norms, linear_norms, scaled_grad

    kernels = [linear_norms._linear_norms_ghost_kernel, linear_norms._linear_norms_instantiate_kernel,
               embedding_norms._embedding_norms_kernel, scaled_grad._scaled_linear_grad_kernel]
    keys = {k.fn.__name__: set() for k in kernels}
    for kernel in kernels:
        def spy(*args, _kernel=kernel, _run=kernel.run, **kwargs):
            named = {**dict(zip(_kernel.arg_names, args)), **kwargs}
            keys[_kernel.fn.__name__].add(tuple(named[k] for k in _kernel.keys))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    # three batch sizes at T = 16 and three lengths at B = 8: T in two buckets (16, 64), B * T in one (512)
    for B, T in [(17, 16), (23, 16), (32, 16), (8, 33), (8, 50), (8, 64)]:
        x, g = _inputs(B, T, 8, 12, torch.float32)
        K.per_sample_linear_grad_norms(x, g, strategy="ghost", backend="triton")
        K.per_sample_linear_grad_norms(x, g, strategy="instantiate", backend="triton")
        K.scaled_linear_grad(x, g, torch.ones(B, device=DEVICE), backend="triton")
        ids = torch.randint(0, 5, (B, T), generator=torch.Generator().manual_seed(B)).to(DEVICE)
        K.per_sample_embedding_grad_norms(ids, g, strategy="ghost", backend="triton")
    assert {name: len(k) for name, k in keys.items()} == {
        "_linear_norms_ghost_kernel": 2, "_linear_norms_instantiate_kernel": 2, "_embedding_norms_kernel": 2,
        "_scaled_linear_grad_kernel": 1}
