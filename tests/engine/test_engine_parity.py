"""Clipped per-sample gradient sums from ONE backward equal the batch-size-1 oracle's, on every rule."""

import pytest
import torch

from dptrain.grad_sample.routes import RoutePlanner
from dptrain.grad_sample.tracker import GradSampleTracker
from tests.helpers.models import CASES
from tests.helpers.oracle import clipped_sum, per_sample_grads, relative_error


def _median_norm(grads):
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in g_i.values())) for g_i in grads])
    return float(norms.median())


@pytest.fixture(params=["factored", "densified", "chunked", "deferred"])
def dense_mode(request):
    """Each parity case: uses kept factored; every dense use densified (explicit gradients); densified in batch
    chunks of 3 samples (the budget is set by the test, from the model's size); and the sums deferred to a
    ``sum_sink`` that builds them after the flush (FSDP2's path)."""
    return request.param


def _planner(dense_mode: str, model):
    if dense_mode == "deferred":
        return None  # the tracker's own: factored only
    if dense_mode == "factored":
        return RoutePlanner(dense_budget_bytes=0)
    if dense_mode == "chunked":
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return RoutePlanner(dense_budget_bytes=4 * 3 * numel, dense_pass_cost=-1e9)
    return RoutePlanner(dense_pass_cost=-1e9)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_clipped_sum_matches_batch_size_one_oracle(case_name, clipping, reduction, dense_mode):
    case = CASES[case_name]()
    oracle = per_sample_grads(case.model, lambda m, i: case.per_sample_loss(m, case.sample(i)).sum(), case.batch_size)
    c = 0.7 * _median_norm(oracle)  # some samples clipped, some not
    built = {}

    def sink(clipper):  # what FSDPView.scatter_sums does, without the reduce-scatter
        for p in list(clipper.deferred):
            built[p] = clipper.take_sum(p)
        assert not clipper.clipped_sum, "deferred sums are built by the sink only"

    tracker = GradSampleTracker(case.model, clipping=clipping, max_grad_norm=c, loss_reduction=reduction,
                                planner=_planner(dense_mode, case.model),
                                sum_sink=sink if dense_mode == "deferred" else None)
    losses = case.per_sample_loss(case.model, case.inputs)  # (B,)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    tracker.flush()
    sums = built if dense_mode == "deferred" else tracker.clipped_sum

    names = {p: n for n, p in case.model.named_parameters()}
    groups = [[names[p] for p in g.params] for g in tracker.groups]
    expected = clipped_sum(oracle, groups, [g.max_norm for g in tracker.groups])
    assert set(names[p] for p in sums) == set(expected), "every trainable parameter is handled"
    for p, actual in sums.items():
        assert relative_error(actual, expected[names[p]]) < 1e-4, names[p]
    assert all(p.grad is None for p in case.model.parameters()), "no non-private gradient is left in .grad"
    assert 0 < sum(tracker.clipped_count.values()), "the threshold was chosen so that clipping is active"


def test_tied_embedding_is_one_group_with_both_uses():
    case = CASES["gpt2_tied"]()
    tracker = GradSampleTracker(case.model, clipping="per_layer", loss_reduction="mean", max_grad_norm=1.0)
    tied = [g for g in tracker.groups if any(p is case.model.lm_head.weight for p in g.params)]
    assert len(tied) == 1 and "wte" in tied[0].name and "lm_head" in tied[0].name


def test_default_per_layer_thresholds_keep_total_sensitivity():
    case = CASES["tiny_lm"]()
    tracker = GradSampleTracker(case.model, clipping="per_layer", loss_reduction="mean", max_grad_norm=2.0)
    assert len(tracker.groups) == 5
    assert tracker.total_max_norm == pytest.approx(2.0)
    assert all(g.max_norm == pytest.approx(2.0 / 5**0.5) for g in tracker.groups)


def test_deferred_sums_refuse_a_planner_with_dense_or_fused_routes():
    case = CASES["tiny_lm"]()
    with pytest.raises(ValueError, match=r"deferred clipped sums need the factored route alone"):
        GradSampleTracker(case.model, clipping="flat", loss_reduction="mean", max_grad_norm=1.0, planner=RoutePlanner(),
                          sum_sink=lambda clipper: None)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_an_empty_micro_batch_adds_nothing(clipping):
    """FSDP2 ranks run forward and backward on empty physical batches (Poisson): no sample, no contribution, and
    the next micro-batch of the same logical batch is clipped as if alone."""
    case = CASES["tiny_lm"]()
    oracle = per_sample_grads(case.model, lambda m, i: case.per_sample_loss(m, case.sample(i)).sum(), case.batch_size)
    tracker = GradSampleTracker(case.model, clipping=clipping, max_grad_norm=0.5, loss_reduction="sum")
    case.per_sample_loss(case.model, {k: v[:0] for k, v in case.inputs.items()}).sum().backward()  # (0,) losses
    tracker.flush()
    assert tracker.clipped_sum == {} and tracker.num_samples == 0
    case.per_sample_loss(case.model, case.inputs).sum().backward()
    tracker.flush()
    names = {p: n for n, p in case.model.named_parameters()}
    expected = clipped_sum(oracle, [[names[p] for p in g.params] for g in tracker.groups],
                           [g.max_norm for g in tracker.groups])
    for p, actual in tracker.clipped_sum.items():
        assert relative_error(actual, expected[names[p]]) < 1e-4, names[p]
