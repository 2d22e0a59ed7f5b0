"""svd_refactorize against a dense SVD of BA: same factors (up to signs), BA preserved, A orthonormal."""

import pytest
import torch

from dptrain.federated import svd_refactorize

SHAPES = [(5, 7, 1), (16, 9, 3), (9, 16, 9), (64, 48, 8), (33, 129, 4), (128, 384, 16)]


def _random(m, n, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype) / n**0.5


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_equals_dense_svd_of_the_product(m, n, r):
    B, A = _random(m, n, r, torch.float64, seed=m * n + r)
    B_new, A_new = svd_refactorize(B, A)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)  # dense (m, n): the oracle
    signs = torch.sign((A_new * Vh[:r]).sum(1))  # (r,): singular vectors are defined up to sign
    assert torch.allclose(A_new, signs[:, None] * Vh[:r], atol=1e-5)
    assert torch.allclose(B_new, U[:, :r] * S[:r] * signs, atol=1e-5)
    assert torch.allclose(B_new.norm(dim=0), S[:r], atol=1e-5)  # descending singular values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_preserves_product_and_gives_orthonormal_rows(m, n, r, dtype):
    B, A = _random(m, n, r, dtype, seed=7 * m + n)
    B_new, A_new = svd_refactorize(B, A)
    assert B_new.dtype == A_new.dtype == dtype and B_new.shape == B.shape and A_new.shape == A.shape
    assert torch.allclose(B_new @ A_new, B @ A, atol=1e-5)
    assert torch.allclose(A_new @ A_new.T, torch.eye(r, dtype=dtype), atol=1e-5)
    B2, A2 = svd_refactorize(B_new, A_new)  # idempotent on its own output (same signs)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-5)


def test_zero_or_rank_deficient_B_keeps_A_orthonormal():
    B, A = torch.zeros(12, 4), torch.randn(4, 20)
    B_new, A_new = svd_refactorize(B, A)
    assert torch.count_nonzero(B_new) == 0
    assert torch.allclose(A_new @ A_new.T, torch.eye(4), atol=1e-5)
    B[:, 0] = 1.0  # rank 1 product
    B_new, A_new = svd_refactorize(B, A)
    assert torch.allclose(B_new @ A_new, B @ A, atol=1e-5)
    assert torch.allclose(A_new @ A_new.T, torch.eye(4), atol=1e-5)


def test_only_r_by_r_decompositions(monkeypatch):
    """Rank-r form: every SVD it takes is r x r, never the m x n product."""
    seen = []
    svd = torch.linalg.svd

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    svd_refactorize(*_random(300, 200, 5, torch.float32, seed=0))
    assert seen == [(5, 5)]


@pytest.mark.parametrize("B,A,error,match", [
    (torch.ones(4, 2), torch.ones(3, 5), ValueError, "share the rank r"),
    (torch.ones(4), torch.ones(1, 5), ValueError, "2-D matrix"),
    (torch.ones(2, 3), torch.ones(3, 5), ValueError, r"rank r must be in \[1, min\(m, n\)\]"),
    (torch.ones(4, 2, dtype=torch.long), torch.ones(2, 5), TypeError, "floating-point"),
    (torch.full((4, 2), float("nan")), torch.ones(2, 5), ValueError, "finite"),
    ([[1.0]], torch.ones(1, 5), TypeError, "torch.Tensor"),
])
def test_bad_input_one_line_errors(B, A, error, match):
    with pytest.raises(error, match=match) as info:
        svd_refactorize(B, A)
    assert "\n" not in str(info.value)
