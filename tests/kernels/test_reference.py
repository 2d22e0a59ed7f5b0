"""The torch reference ops against einsum / autograd oracles (always run, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from dptrain import kernels as K
from dptrain.kernels.scaled_grad import _mm_fp32, split_bf16
from tests.kernels import oracles

SHAPES = [(3, 5, 7, 9), (1, 1, 4, 3), (4, 17, 6, 5), (2, 3, 33, 2), (2, 4, 40, 48)]  # (B, T, d_in, d_out); ghost: last
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 2e-2), (torch.float16, 1e-3, 5e-3)]


def _inputs(B, T, d_in, d_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=gen).to(dtype)
    g = torch.randn(B, T, d_out, generator=gen).to(dtype)
    return x, g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("strategy", ["ghost", "instantiate", "auto"])
def test_linear_norms_match_einsum(shape, dtype, atol, rtol, strategy):
    x, g = _inputs(*shape, dtype)
    got = K.per_sample_linear_grad_norms(x, g, strategy=strategy, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), oracles.linear_norms(x, g), atol=atol, rtol=rtol)


def test_ghost_and_instantiate_agree_on_wide_and_long_shapes():
    x, g = _inputs(2, 40, 3, 4, torch.float32)  # long: auto picks instantiate
    assert K.choose_linear_strategy(40, 3, 4) == "instantiate"
    assert K.choose_linear_strategy(2, 30, 30) == "ghost"
    a = K.per_sample_linear_grad_norms(x, g, strategy="ghost")
    b = K.per_sample_linear_grad_norms(x, g, strategy="instantiate")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_two_dimensional_inputs_mean_one_token():
    x, g = _inputs(5, 1, 6, 4, torch.float32)
    two_d = K.per_sample_linear_grad_norms(x[:, 0], g[:, 0])
    torch.testing.assert_close(two_d.double(), x[:, 0].double().norm(dim=1) * g[:, 0].double().norm(dim=1))
    grad = K.scaled_linear_grad(x[:, 0], g[:, 0], torch.ones(5))
    torch.testing.assert_close(grad, g[:, 0].T @ x[:, 0], rtol=1e-5, atol=1e-5)


def test_memory_chunking_gives_the_same_norms(monkeypatch):
    x, g = _inputs(7, 6, 5, 4, torch.float32)
    full = K.per_sample_linear_grad_norms(x, g, strategy="ghost")
    full_i = K.per_sample_linear_grad_norms(x, g, strategy="instantiate")
    monkeypatch.setattr("dptrain.kernels._common.MEMORY_CAP_BYTES", 1)  # one sample per chunk
    torch.testing.assert_close(K.per_sample_linear_grad_norms(x, g, strategy="ghost"), full)
    torch.testing.assert_close(K.per_sample_linear_grad_norms(x, g, strategy="instantiate"), full_i)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_scaled_linear_grad_matches_einsum(shape, dtype, atol, rtol):
    x, g = _inputs(*shape, dtype)
    scale = torch.rand(shape[0], generator=torch.Generator().manual_seed(1))
    got = K.scaled_linear_grad(x, g, scale, backend="torch")
    assert got.dtype == dtype and got.shape == (shape[3], shape[2])
    want = oracles.scaled_sum(x, g, scale)
    torch.testing.assert_close(got.double(), want, atol=atol * math.sqrt(shape[0] * shape[1]), rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_extra", [False, True])
def test_fused_clip_matches_oracle_and_bounds_the_norm(shape, with_extra):
    x, g = _inputs(*shape, torch.float32)
    B = shape[0]
    max_norm = 0.5 * float(oracles.linear_norms(x, g).median())
    extra = torch.rand(B, generator=torch.Generator().manual_seed(2)) * max_norm**2 if with_extra else None
    grad, norms = K.fused_clip_linear_grad(x, g, max_norm, extra_sq_norms=extra, backend="torch")
    ghost = K.choose_linear_strategy(shape[1], shape[2], shape[3], "cpu") == "ghost"
    sq = oracles.clip_sq_norms(x, g, K.CANCELLATION_RHO, fp32_grams=ghost) + (extra.double() if with_extra else 0)
    torch.testing.assert_close(norms.double(), sq.sqrt(), rtol=1e-4, atol=1e-5)
    factors = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    torch.testing.assert_close(grad.double(), oracles.scaled_sum(x, g, factors), rtol=1e-4, atol=1e-4)
    # joint clipping: each sample's clipped contribution (weight part and extra part together) is inside the ball
    clipped_joint = factors * sq.sqrt()
    assert bool((clipped_joint <= max_norm * (1 + 1e-6)).all())
    assert bool((clipped_joint < max_norm * 0.999).any() or (sq.sqrt() > max_norm).all())


def test_clip_factors_formula():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0])
    got = K.clip_factors(norms, 1.0)
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 1.0 / (1.0 + 1e-6), 1.0 / (4.0 + 1e-6)]))
    assert K.clip_factors(norms.half(), 2.0).dtype == torch.float32
    with pytest.raises(ValueError, match="max_norm must be > 0, found -1"):
        K.clip_factors(norms, -1.0)


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("strategy", ["ghost", "instantiate", "auto"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
def test_embedding_norms_match_autograd(padding_idx, strategy, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 5, (3, 9), generator=gen)  # few ids: many repeats
    ids[0, :3] = 2  # padding tokens present
    g = torch.randn(3, 9, 4, generator=gen).to(dtype)
    got = K.per_sample_embedding_grad_norms(ids, g, padding_idx=padding_idx, strategy=strategy, backend="torch")
    want = oracles.embedding_norms_by_autograd(ids, g, 5, padding_idx)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    dense = oracles.embedding_grads(ids, g, 5, padding_idx).flatten(1).norm(dim=1)
    torch.testing.assert_close(want, dense)


def test_bad_input_errors_name_what_was_found():
    x, g = _inputs(3, 5, 7, 9, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of .* found 'cuda'"):
        K.per_sample_linear_grad_norms(x, g, backend="cuda")
    with pytest.raises(ValueError, match="strategy must be one of .* found 'fast'"):
        K.per_sample_linear_grad_norms(x, g, strategy="fast")
    with pytest.raises(ValueError, match=r"x \(3, 5, 7\) and g \(3, 4, 9\)"):
        K.per_sample_linear_grad_norms(x, g[:, :4])
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\), found \(2,\)"):
        K.scaled_linear_grad(x, g, torch.ones(2))
    with pytest.raises(ValueError, match=r"extra_sq_norms must have shape \(3,\)"):
        K.fused_clip_linear_grad(x, g, 1.0, extra_sq_norms=torch.ones(4))
    with pytest.raises(ValueError, match="max_norm must be > 0, found 0"):
        K.fused_clip_linear_grad(x, g, 0.0)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        K.per_sample_embedding_grad_norms(x[..., 0], g)
    with pytest.raises(ValueError, match=r"ids \(3, 4\)"):
        K.per_sample_embedding_grad_norms(torch.zeros(3, 4, dtype=torch.long), g)


def test_triton_backend_on_cpu_without_interpreter_raises_clearly():
    from dptrain.kernels import _common

    if _common.INTERPRETED:
        pytest.skip("this process runs the Triton interpreter")
    x, g = _inputs(2, 3, 4, 5, torch.float32)
    err = RuntimeError
    with pytest.raises(err, match="TRITON_INTERPRET=1" if _common.HAS_TRITON else "triton package"):
        K.per_sample_linear_grad_norms(x, g, backend="triton")


def test_auto_backend_runs_the_reference_for_cpu_and_float64_tensors():
    x, g = _inputs(2, 3, 4, 5, torch.float64)
    got = K.per_sample_linear_grad_norms(x, g)  # auto: CPU -> reference, float64 kept exact
    torch.testing.assert_close(got.double(), oracles.linear_norms(x, g), rtol=1e-6, atol=1e-6)


def test_import_works_without_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, dptrain.kernels as K\n"
        "from dptrain.kernels import _common\n"
        "assert not _common.HAS_TRITON\n"
        "x = torch.randn(2, 3, 4); g = torch.randn(2, 3, 5)\n"
        "assert K.per_sample_linear_grad_norms(x, g).shape == (2,)\n"
        "try:\n    K.per_sample_linear_grad_norms(x, g, backend='triton')\nexcept RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\nelse:\n    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_bf16_keeps_sixteen_bits_over_fp32s_whole_range():
    gen = torch.Generator().manual_seed(0)
    magnitude = (1 + torch.rand(10_000, generator=gen)) * torch.logspace(-30, 30, 10_000)
    v = magnitude * torch.randn(10_000, generator=gen).sign()
    hi, lo = split_bf16(v)
    assert hi.dtype == lo.dtype == torch.bfloat16
    relative = ((hi.double() + lo.double() - v.double()).abs() / v.double().abs()).max()
    assert float(relative) < 2.0**-16
    alone = ((hi.double() - v.double()).abs() / v.double().abs()).max()
    assert float(alone) > 2.0**-10  # one bf16 alone: 8 bits


def test_bf16_products_come_out_unrounded_in_fp32():
    """The GPU path's product of bf16 operands (torch.mm's out_dtype there; fp32 copies where it is missing,
    as on CPU): exact products accumulated in fp32, never rounded to bf16."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 300, generator=gen).bfloat16(), torch.randn(300, 5, generator=gen).bfloat16()
    got = _mm_fp32(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)
