"""FedSVD's server-side re-factorisation of a LoRA product, done in rank-r form.

For B (m, r) and A (r, n), BA = U S Vh has rank <= r. With B = Q_B R_B and A^T = Q_A R_A (thin QR),
BA = Q_B (R_B R_A^T) Q_A^T, so the SVD of the r x r core R_B R_A^T = U_c S Vh_c gives the SVD of BA:
U = Q_B U_c, Vh = Vh_c Q_A^T. The new factors are A <- Vh (orthonormal rows), B <- U diag(S), so that
B_new A_new = B A. Cost O((m + n) r^2); the m x n product is never formed.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["svd_refactorize"]


def svd_refactorize(B: torch.Tensor, A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B_new, A_new)`` with ``B_new @ A_new == B @ A`` and orthonormal rows of ``A_new`` (B: (m, r), A: (r, n)).

    ``A_new`` holds the top-r right singular vectors of BA and ``B_new`` the left ones times the singular values
    (descending). Computed in float64, returned in the inputs' dtype and device.
    """
    for name, t in (("B", B), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, found {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D matrix, found shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, found {t.dtype}")
    (m, r), (r_a, n) = B.shape, A.shape
    if r != r_a:
        raise ValueError(f"B (m, r) and A (r, n) must share the rank r, found B {tuple(B.shape)} and A {tuple(A.shape)}")
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank r must be in [1, min(m, n)] = [1, {min(m, n)}], found r={r} (B {tuple(B.shape)}, "
                         f"A {tuple(A.shape)})")
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise ValueError("B and A must be finite (found NaN or inf)")
    b, a = B.detach().double(), A.detach().double()
    q_b, r_b = torch.linalg.qr(b)  # (m, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (n, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core (r, r) = u diag(s) vh
    b_new = (q_b @ u) * s  # (m, r): U diag(S)
    a_new = vh @ q_a.T  # (r, n): orthonormal rows
    return b_new.to(B.dtype), a_new.to(A.dtype)
