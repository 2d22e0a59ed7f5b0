"""Densified per-sample gradients equal the definitions of every contribution form, in any order of uses."""

import itertools

import pytest
import torch

from dptrain.grad_sample.contributions import (
    Factored,
    Instantiated,
    densify,
    densify_gain,
    per_sample_sq_norms,
    weighted_sum,
)
from dptrain.grad_sample.routes import RoutePlanner

B, T, ROWS, COLS = 3, 5, 7, 4


def _uses(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = torch.Size([ROWS, COLS])
    dense = Factored(torch.randn(B, T, ROWS, generator=g), torch.randn(B, T, COLS, generator=g), ROWS, shape)
    ids = torch.randint(0, ROWS, (B, T), generator=g)
    ids[0, :2] = 3  # a repeated id: its rows add up
    index = Factored(ids, torch.randn(B, T, COLS, generator=g), ROWS, shape)
    inst = Instantiated(torch.randn(B, ROWS, COLS, generator=g))
    return {"dense": dense, "index": index, "inst": inst}, shape


def _definition(c):
    """(B, ROWS, COLS) straight from the definition G_i = left_i^T right_i (one-hot left for ids)."""
    if isinstance(c, Instantiated):
        return c.grad
    left = torch.nn.functional.one_hot(c.left, ROWS).float() if c.is_index else c.left
    return torch.einsum("btr,btc->brc", left, c.right)


@pytest.mark.parametrize("order", list(itertools.permutations(["dense", "index", "inst"])) + [("index",), ("dense",)])
def test_densify_equals_the_sum_of_definitions(order):
    uses, shape = _uses()
    chosen = [uses[k] for k in order]
    expected = sum(_definition(c) for c in chosen)  # (B, ROWS, COLS)
    out = torch.full((B, *shape), float("nan"))  # stale contents must not leak in
    dense = densify(chosen, out)
    torch.testing.assert_close(dense.grad, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_sample_sq_norms([dense]), per_sample_sq_norms(chosen), rtol=1e-4, atol=1e-4)
    scale = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(weighted_sum([dense], scale, shape), weighted_sum(chosen, scale, shape),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "index", "inst"])
def test_weighted_sum_adds_into_out_in_place(kind):
    uses, shape = _uses(seed=1)
    scale = torch.tensor([0.5, -1.0, 2.0])
    start = torch.randn(shape)
    out = start.clone()
    result = weighted_sum([uses[kind]], scale, shape, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = start + torch.einsum("b,brc->rc", scale, _definition(uses[kind]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_densify_gain_prefers_long_sequences_and_skips_index_only_uses():
    shape = torch.Size([256, 256])
    short = Factored(torch.zeros(1, 1, 256), torch.zeros(1, 1, 256), 256, shape)
    long = Factored(torch.zeros(1, 128, 256), torch.zeros(1, 128, 256), 256, shape)
    ids = Factored(torch.zeros(1, 128, dtype=torch.long), torch.zeros(1, 128, 256), 256, shape)
    assert densify_gain([short], shape.numel()) < 0  # rank one: the ghost norm is nearly free
    assert densify_gain([long], shape.numel()) > 0
    assert densify_gain([ids], shape.numel()) == 0


def _linear_use(batch, length, rows, cols):
    """A linear layer's use of a (rows, cols) weight at (batch, length), shapes only (expanded, no memory)."""
    shape = torch.Size([rows, cols])
    left = torch.zeros(1, 1, rows).expand(batch, length, rows)
    right = torch.zeros(1, 1, cols).expand(batch, length, cols)
    return torch.nn.Parameter(torch.zeros(shape)), [Factored(left, right, rows, shape)]


def test_planner_keeps_chunks_in_cache_and_short_sequences_factored():
    planner = RoutePlanner()
    short_head, short_uses = _linear_use(8, 16, 8192, 256)  # GPT-2-sized LM head, 8 MiB a sample
    assert not planner.plan({short_head: short_uses}, 8, per_layer=True).dense  # ghost costs less than 2 passes
    mlp, mlp_uses = _linear_use(8, 128, 1024, 256)  # 8 MiB for the whole batch: one chunk
    routes = planner.plan({mlp: mlp_uses}, 8, per_layer=True)
    assert mlp in routes.dense and routes.chunk == 8
    head, head_uses = _linear_use(8, 128, 8192, 256)  # T = 128: 2 samples a chunk stay in cache, beating the ghost
    routes = planner.plan({head: head_uses}, 8, per_layer=True)
    assert head in routes.dense and routes.chunk == 2
    # one sample beyond the cache: the spill costs more than the ghost at T = 128, not at T = 1024 (T^2 for the ghost)
    wide, wide_uses = _linear_use(8, 128, 8192, 1024)  # 32 MiB a sample
    assert not RoutePlanner(dense_budget_bytes=64 * 2**20).plan({wide: wide_uses}, 8, per_layer=True).dense
    long_wide, long_uses = _linear_use(8, 1024, 8192, 1024)
    routes = RoutePlanner(dense_budget_bytes=64 * 2**20).plan({long_wide: long_uses}, 8, per_layer=True)
    assert long_wide in routes.dense and routes.chunk == 1
    # sharing the budget with the rest of a model (flat clipping), 2 samples per chunk stay in cache: densified
    others = dict(_linear_use(8, 128, 1024, 256) for _ in range(12))
    routes = planner.plan({head: head_uses, **others}, 8, per_layer=False)
    assert head in routes.dense and routes.chunk == 2
    empty, empty_uses = _linear_use(8, 128, 0, 256)  # a zero-size weight: nothing to densify, no error
    assert not planner.plan({empty: empty_uses}, 8, per_layer=True).dense


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_dense_buffers_live_one_chunk_at_a_time_and_none_after_the_flush(clipping, monkeypatch):
    """Per-sample gradients held past their chunk would sit on top of the next forward and backward pass, where
    memory peaks (engine_speed's heap column)."""
    import gc
    import weakref

    from dptrain.grad_sample.tracker import GradSampleTracker

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    planner = RoutePlanner(dense_budget_bytes=4 * (16 * 32 + 32 + 32 * 8 + 8), dense_pass_cost=-1e9)  # one sample
    tracker = GradSampleTracker(model, clipping=clipping, max_grad_norm=1.0, planner=planner)
    buffers, calls = [], []
    densify_chunk = planner.densify

    def recorded(routes, pending, sl):
        gc.collect()
        calls.append(sum(ref() is not None for ref in buffers))  # buffers alive when a chunk starts
        grads = densify_chunk(routes, pending, sl)
        buffers.extend(weakref.ref(d.grad) for d in grads.values())
        return grads

    monkeypatch.setattr(planner, "densify", recorded)
    model(torch.randn(4, 6, 16)).square().sum().backward()
    tracker.flush()
    gc.collect()
    assert len(calls) >= 4 and buffers  # chunks of 1 sample (of 2 or 3 for the smaller layer alone)
    assert calls == [0] * len(calls)
    assert all(ref() is None for ref in buffers)
    assert tracker.clipped_sum  # the sums stay, the per-sample gradients went
