"""A clipped sample never weighs more than C, however large its layer: the per-sample norms that clipping divides
by must not be understated. torch's CPU norm sums a whole row in one running fp32 total (relative error -2.8e-3
over 8M positive-mean values), so a densified per-sample gradient of a large layer was clipped to C * 1.003: the
noise then covers less than the sensitivity the ledger records. Oracle: float64 norms."""

import math

import pytest
import torch
from torch import nn

from dptrain import kernels
from dptrain.grad_sample.contributions import Factored, clip_sq_norms
from dptrain.grad_sample.routes import RoutePlanner
from dptrain.grad_sample.tracker import GradSampleTracker


@pytest.mark.parametrize("n", [5, 4096, 4097, 8_388_613])
def test_row_sq_norms_match_float64(n):
    t = torch.rand(2, n, generator=torch.Generator().manual_seed(0)) + 1.0  # positive mean: the worst case
    expected = t.double().pow(2).sum(1)
    assert torch.allclose(kernels.row_sq_norms(t).double(), expected, rtol=1e-6, atol=0)
    tail = t[:, 3:]  # a column slice (strided rows) too
    assert torch.allclose(kernels.row_sq_norms(tail).double(), tail.double().pow(2).sum(1), rtol=1e-6, atol=0)


def test_a_clipped_sample_of_an_8m_weight_layer_stays_within_c():
    """One sample, its gradient densified (the CPU route for sequences) and clipped to C = 1e-3."""
    torch.manual_seed(0)
    layer = nn.Linear(2048, 4096, bias=False)  # 8.4M weights: 32 MiB per sample
    c = 1e-3
    planner = RoutePlanner(dense_budget_bytes=40 * 2**20, dense_pass_cost=-1e9)
    tracker = GradSampleTracker(layer, clipping="flat", max_grad_norm=c, loss_reduction="sum", planner=planner)
    x = torch.rand(1, 4, 2048, generator=torch.Generator().manual_seed(1)) + 1.0  # (B, T, d_in)
    layer(x).sum().backward()
    tracker.flush()
    clipped = tracker.clipped_sum[layer.weight].double().norm()
    assert float(clipped) <= c * (1 + 1e-6)
    assert float(clipped) >= c * (1 - 1e-6)  # it was clipped (its norm is far above C)


@pytest.mark.parametrize("route", ["factored", "fused"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_removing_one_sample_of_a_bf16_batch_moves_the_clipped_sum_by_at_most_c(clipping, route):
    """Neighbouring batches (one sample removed) of a bf16 layer: their clipped sums differ by at most C. 256
    near-identical samples make the sum ~256 C long; rounded to bf16 (2^-9 of its size per coordinate) the two sums
    differed by 1.1 C, beyond what the noise is calibrated for. Oracle: the float64 norm of the difference."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    c = 1e-2
    base = torch.randn(1, 3, 64)
    x = (base + 1e-2 * torch.randn(257, 3, 64)).to(torch.bfloat16)  # (B, T, d_in), every sample clipped
    planner = RoutePlanner(dense_budget_bytes=0, fuse=route == "fused")

    def clipped_sum(batch):
        tracker = GradSampleTracker(layer, clipping=clipping, max_grad_norm=c, loss_reduction="sum", planner=planner)
        layer(batch).float().pow(2).sum().backward()
        tracker.flush()
        (total,) = tracker.clipped_sum.values()
        assert total.dtype == torch.float32
        return total.double()

    moved = float((clipped_sum(x) - clipped_sum(x[:-1])).norm())
    assert moved <= c * (1 + 1e-5), moved / c
    assert moved >= c * (1 - 1e-2)  # the removed sample was clipped to C


def _cancelling_sample(d: int):
    """One sample of two tokens with the same input and opposite output gradients but for one coordinate: the
    true gradient is e x^T, |e| = 1e-5, |x| ~ 8e3, while each token term is ~1e3 times larger than that."""
    x = (1e3 * torch.randn(1, 1, d)).expand(1, 2, d).contiguous()  # (B=1, T=2, d): x_1 = x_2
    v = torch.randn(d)
    v[0] = 0
    y = torch.stack([v, -v])[None]  # (1, 2, d) output gradients
    y[0, 1, 0] = 1e-5
    return x, y


class _TwoCalls(nn.Module):
    """The layer applied to each token in its own call: two uses whose cross term cancels."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):  # (B, 2, d) -> (B, 2, d)
        return torch.stack([self.layer(x[:, 0]), self.layer(x[:, 1])], 1)


@pytest.mark.parametrize("uses", ["one call, two tokens", "two calls, one token each"])
@pytest.mark.parametrize("clipping,fuse", [("per_layer", True), ("per_layer", False), ("flat", False)])
def test_a_sample_whose_token_gradients_cancel_is_still_clipped_to_c(uses, clipping, fuse):
    """Attacker's review: the Gram form (or the cross term of two uses) sums terms ~|v|^2 |x|^2 that cancel down to
    |e|^2 |x|^2 below fp32's resolution, so the computed norm comes out ~0, and without the cancellation margin
    the clip factor was 1 and the sample entered the sum at its true norm, 8.3 C (any multiple by scaling x)."""
    torch.manual_seed(1)  # a seed whose rounding gives exactly 0 in both variants (0 and -512 for seed 6)
    d, c = 64, 1e-2
    layer = nn.Linear(d, d, bias=False)
    model = nn.Sequential(layer) if uses == "one call, two tokens" else _TwoCalls(layer)
    x, y = _cancelling_sample(d)
    planner = RoutePlanner(dense_budget_bytes=0, fuse=fuse)
    tracker = GradSampleTracker(model, clipping=clipping, max_grad_norm=c, loss_reduction="sum", planner=planner)
    (model(x) * y).sum().backward()  # output gradients = y
    tracker.flush()
    true_norm = float(y.double().sum(1).norm() * x[0, 0].double().norm())
    assert true_norm > 5 * c  # without clipping the sample would weigh this much
    assert float(tracker.clipped_sum[layer.weight].double().norm()) <= c * (1 + 1e-5)


def test_the_clip_bound_barely_moves_the_norm_of_a_typical_sample():
    """The bound's price: for sequences shaped like a language model's (inputs sharing a common direction,
    T = 512) the norm clipped against exceeds the true norm by under 0.3% (0.16% here, from U / norm ~ 25)."""
    torch.manual_seed(0)
    B, T, d_in, d_out = 4, 512, 96, 80
    x = torch.randn(1, 1, d_in) + 0.5 * torch.randn(B, T, d_in)  # (B, T, d_in), correlated tokens
    g = torch.randn(B, T, d_out) * torch.rand(B, T, 1)  # (B, T, d_out), token gradients of varied size
    bound = clip_sq_norms([Factored(g, x, d_out, torch.Size([d_out, d_in]))])
    exact = torch.einsum("bto,bti->boi", g.double(), x.double()).flatten(1).norm(dim=1)
    excess = bound.double().sqrt() / exact - 1
    assert bool((excess >= 0).all()) and float(excess.max()) < 3e-3, excess


def _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, c) -> float:
    """float64 norm of clipped_sum(batch) - clipped_sum(batch without its last sample), one linear layer."""
    sums = []
    for b in (len(x), len(x) - 1):
        tracker = GradSampleTracker(layer, clipping=clipping, max_grad_norm=c, loss_reduction="sum",
                                    planner=planner)
        (layer(x[:b]) * out_grads[:b]).sum().backward()
        tracker.flush()
        sums.append(tracker.clipped_sum[layer.weight].double())
        tracker.detach()
    return float((sums[0] - sums[1]).norm())


ROUTES = [("per_layer", RoutePlanner(dense_budget_bytes=0, fuse=True)),
          ("per_layer", RoutePlanner(dense_budget_bytes=0, fuse=False)),
          ("flat", RoutePlanner(dense_budget_bytes=0, fuse=False))]


@pytest.mark.parametrize("clipping,planner", ROUTES, ids=["fused", "factored", "flat"])
def test_crafted_rows_cannot_round_a_gram_norm_below_the_gradient(clipping, planner):
    """Attacker's review: x_1 = ones(1024), x_2 = c ones(1024), output gradients +1 and -1. An fp32 Gram entry sums
    1024 equal products, each rounding the same way (~1e-4 of the entry), and the norm^2 = X11 - 2 X12 + X22 came
    out far below the true ||x_1 - x_2||^2 = (7.7 C)^2: the sample entered at 7.69 C. Grams in fp64 fixed it; the
    CPU's fp32 blocks add their error bound instead (next test)."""
    torch.manual_seed(0)
    layer = nn.Linear(1024, 1, bias=False)
    attack = torch.ones(1, 2, 1024)
    attack[0, 1] = 1.0002403259277344
    x = torch.cat([torch.randn(1, 2, 1024), attack])  # (B=2, T=2, d_in), the attack sample last
    out_grads = torch.tensor([1.0, -1.0]).expand(2, 2)[..., None]  # (B, T, 1)
    assert _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, 1e-3) <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("clipping,planner", ROUTES, ids=["fused", "factored", "flat"])
def test_crafted_rows_cannot_round_fp32_blocked_grams_below_the_gradient(clipping, planner):
    """The same attack on a layer wide enough for ghost norms with 384 blocks of features (49152 -> 64): the fp32
    Gram entries carry ~5e-6 of their terms' sum, and clipped against its computed norm plus the cancellation
    margin alone the sample entered at 1.83 C (c found by a search). With ``ghost_rounding_allowance``: 0.28 C."""
    d = 49152
    layer = nn.Linear(d, 64, bias=False)
    attack = torch.ones(1, 2, d)
    attack[0, 1] = 1.0035858154296875
    x = torch.cat([torch.randn(1, 2, d, generator=torch.Generator().manual_seed(0)), attack])  # (B=2, T=2, d)
    out_grads = torch.tensor([1.0, -1.0])[None, :, None].expand(2, 2, 64)  # (B, T, 64)
    assert _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, 1e-3) <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("clipping,planner", ROUTES, ids=["fused", "factored", "flat"])
def test_inputs_whose_squares_underflow_are_still_clipped(T, clipping, planner):
    """Attacker's review: inputs of 1e-23 (their squares below fp32's smallest subnormal) times output gradients of
    1e18: the gradient's entries (~1e-5) are representable, but fp32 norms and triangle bounds were 0, so the sample
    entered unclipped at 22.6 C (T = 1) to 181 C (T = 8). Norms and bounds of such rows are formed in fp64."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 8, bias=False)
    x = torch.cat([torch.randn(1, T, 64), torch.full((1, T, 64), 1e-23)])  # (B=2, T, d_in)
    out_grads = torch.ones(2, T, 8)
    out_grads[1] *= 1e18
    assert _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, 1e-5) <= 1e-5 * (1 + 1e-5)


@pytest.mark.parametrize("clipping,planner", ROUTES, ids=["fused", "factored", "flat"])
def test_token_sums_rounding_one_way_cannot_lift_a_sample_above_c(clipping, planner):
    """Attacker's review: x_t = ones(8) and output gradients c_t ones(8) with c = [1, delta x (T - 2), -1 + r],
    delta just under 2^-24: the norm's fp32 sum over the T tokens loses every delta, and the weighted sum (its
    scaled g rounding each s delta up) gains them. A margin added in quadrature covered only a sliver of that
    linear error: 1.03 C at T = 4096 (1.41 C at 16384). The bound now adds 2^-23 T U linearly."""
    T, d, rho = 4096, 8, 2.0**-20
    delta = 2.0**-24 * (1 - 2.0**-10)
    r = float(torch.tensor(4 * rho / (2 * (T - 2) * 2.0**-24)).float())
    c_t = torch.full((T,), delta)
    c_t[0], c_t[-1] = 1.0, -1.0 + r
    x = torch.ones(2, T, d)
    out_grads = torch.zeros(2, T, d)  # sample 0 has no gradient, sample 1 attacks
    out_grads[1] = c_t[:, None]
    u = d * float(c_t.double().abs().sum())
    c = math.sqrt((d * r) ** 2 + rho * u**2) * 1.01 * 2.0**-8  # a clip factor s of mantissa ~1.01
    layer = nn.Linear(d, d, bias=False)
    assert _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, c) <= c * (1 + 1e-5)


@pytest.mark.parametrize("clipping,planner", ROUTES, ids=["fused", "factored", "flat"])
def test_a_clip_factor_folded_into_subnormal_gradients_is_not_rounded_up(clipping, planner):
    """Attacker's review: output gradients 2^-149 (the smallest fp32 subnormal) against inputs 2^127, so every
    token term is an ordinary 2^-22 and the norm is exact; but the weighted sum folded the clip factor into g, and
    0.51 * 2^-149 rounds to 2^-149: the sample entered at 1.96 C. Such products now run in fp64."""
    d, T = 64, 64
    x = torch.full((2, T, d), 2.0**127)
    x[0] = 0.0  # sample 0 has no gradient
    out_grads = torch.full((2, T, d), 2.0**-149)
    c = 0.51 * T * d * 2.0**-22  # the attack sample's norm is T d 2^-22
    layer = nn.Linear(d, d, bias=False)
    assert _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, c) <= c * (1 + 1e-5)


def _set_precision(setting: str) -> None:
    if setting in ("highest", "high", "medium"):
        torch.set_float32_matmul_precision(setting)
    else:  # the per-backend API, which makes the legacy getter raise once the backends disagree
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.cuda.matmul.fp32_precision = "tf32"


def _backend_precisions() -> tuple:
    return torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.mark.parametrize("clipping,fuse", [("per_layer", True), ("per_layer", False), ("flat", False)])
@pytest.mark.parametrize("precision", ["high", "medium", "backend flags", "autocast"])
def test_clipping_multiplies_in_ieee_fp32_whatever_precision_the_user_set(precision, clipping, fuse, monkeypatch):
    """The bounds assume fp32 products rounded at 2^-24: matmul precision "high" would run CUDA's fp32 GEMMs in TF32
    (10 mantissa bits), "medium" the CPU's in bf16 (as would the backends' own ``fp32_precision`` flags), and a
    backward inside ``torch.autocast`` casts them to bf16; the clipped sum (one GEMM) and the norm (another) would
    then round apart by ~2^-10 of a sample's token terms. The clipper's products run in IEEE fp32 without autocast,
    and the user's settings come back."""
    seen = []

    def recording(name, real):
        def call(*args, **kwargs):
            seen.append((name, _backend_precisions(), torch.is_autocast_enabled("cpu")))
            return real(*args, **kwargs)
        return call

    for name in ("scaled_linear_grad", "fused_clip_linear_grad", "per_sample_linear_grad_sq_norms"):
        monkeypatch.setattr(kernels, name, recording(name, getattr(kernels, name)))
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    planner = RoutePlanner(dense_budget_bytes=0, fuse=fuse)
    tracker = GradSampleTracker(layer, clipping=clipping, max_grad_norm=1e-2, loss_reduction="sum", planner=planner)
    before = _backend_precisions()
    _set_precision("highest" if precision == "autocast" else precision)
    users = _backend_precisions()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            layer(torch.randn(3, 5, 16)).float().sum().backward()
            tracker.flush()
            assert torch.is_autocast_enabled("cpu") == (precision == "autocast")
        assert _backend_precisions() == users
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
    assert seen and all(p == ("ieee", "ieee") and not autocast for _, p, autocast in seen), seen


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("clipping,planner", ROUTES + [("per_layer", RoutePlanner())], ids=["fused", "factored", "flat",
                                                                                           "default"])
def test_a_float64_layer_is_clipped_from_the_values_it_sums(T, clipping, planner):
    """Attacker's review: an fp64 layer's weighted sum cast the unscaled operand to fp32, where 2^-150 (1 + 2^-30)
    rounds up to 2^-149, while the norm used the fp64 values: against output gradients of 2^127 the sample entered
    at 1.97 C (T = 1). An fp64 layer's norms and sums now stay in fp64 (T > 1 crashed in the row norms before)."""
    torch.manual_seed(0)
    layer = nn.Linear(4096, 64, bias=False).double()
    x = torch.cat([torch.randn(1, T, 4096, dtype=torch.float64),
                   torch.full((1, T, 4096), 2.0**-150 * (1 + 2.0**-30), dtype=torch.float64)])  # (B=2, T, d_in)
    out_grads = torch.ones(2, T, 64, dtype=torch.float64)
    out_grads[1] *= 2.0**127
    assert _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, 1e-6) <= 1e-6 * (1 + 1e-5)


@pytest.mark.parametrize("d", [64, 1000, 8192, 49152])
@pytest.mark.parametrize("rows", ["one way", "random", "tiny"])
def test_fp32_blocked_grams_stay_within_their_stated_error(d, rows):
    """The CPU's Gram entries against float64: within gamma_D sum_k |v_tk v_sk| + delta (``gram_rounding``), for
    rows whose products all round one way (the crafted-rows attack), random rows and rows deep in the subnormals."""
    from dptrain.kernels._common import gram_fp32_blocked, gram_rounding

    g = torch.Generator().manual_seed(d)
    if rows == "one way":
        v = torch.ones(1, 3, d)
        v[0, 1], v[0, 2] = 1.0002403259277344, 1 + 2.0**-22 * 3
    elif rows == "random":
        v = torch.randn(2, 5, d, generator=g) + 0.5
    else:
        v = torch.randn(2, 5, d, generator=g) * 2.0**-70  # products below fp32's subnormals
    got = gram_fp32_blocked(v).double()
    exact = torch.bmm(v.double(), v.double().transpose(1, 2))
    terms = torch.bmm(v.double().abs(), v.double().abs().transpose(1, 2))
    e, delta = gram_rounding(d)
    error = (got - exact).abs()
    assert bool((error <= e * terms + delta).all()), float((error / (e * terms + delta)).max())
    if rows == "one way" and d >= 1000:
        assert float((error / (e * terms)).max()) > 0.02  # this attack reaches a few % of the bound


def test_values_too_large_for_fp32_grams_take_fp64_and_stay_clipped():
    """Products of values beyond 2^50 could overflow an fp32 Gram: that sample chunk takes fp64 Grams instead."""
    from dptrain.kernels._common import gram_fp32_blocked

    assert gram_fp32_blocked(torch.full((1, 2, 8), 2.0**51)) is None
    layer = nn.Linear(64, 4, bias=False)
    x = torch.randn(2, 4, 64)
    x[1] *= 2.0**52
    out_grads = torch.randn(2, 4, 4)
    for clipping, planner in ROUTES:
        assert _moved_by_removing_the_last(layer, x, out_grads, clipping, planner, 1e-2) <= 1e-2 * (1 + 1e-5)
