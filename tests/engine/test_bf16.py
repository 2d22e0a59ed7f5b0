"""Mixed precision: bf16 autocast over fp32 weights, and bf16 weights, through every rule the engine has.

The clipped sums are accumulated in fp32 whatever the compute dtype. Oracle: the fp32 batch-size-1 loop on the
same weights (for bf16 weights: those weights cast to fp32), so the difference is bf16 arithmetic alone. bf16 keeps
8 significant bits (relative rounding 2^-9 per operation); through a few layers of forward and backward and the
clip factors the relative error of the clipped sums is ~1e-2, and the bound asserted is 5e-2, or, where torch's
own bf16 batch-size-1 loop is further from fp32 than that (the conv case's GroupNorm over 15 values per sample:
0.31), twice that loop's error. The same runs in fp32 are exact to 1e-5 (tests/engine/test_engine_parity.py), so
the bound hides no bug of the rules. Refused, not approximated: GroupNorm (the torch.func fallback) under autocast.
"""

import copy

import pytest
import torch

from dptrain.grad_sample.tracker import GradSampleTracker
from tests.helpers.models import CASES
from tests.helpers.oracle import clipped_sum, per_sample_grads, relative_error

BF16_BOUND = 5e-2


def _oracle(case):
    return per_sample_grads(case.model, lambda m, i: case.per_sample_loss(m, case.sample(i)).sum(), case.batch_size)


def _threshold(oracle) -> float:
    """Half the median per-sample norm: clipping is active for about half the samples."""
    norms = torch.stack([sum(g.float().pow(2).sum() for g in g_i.values()) for g_i in oracle]).sqrt()
    return 0.5 * float(norms.median())


def _check(case, model, oracle, clipping, run_backward, torch_bf16=None):
    tracker = GradSampleTracker(model, clipping=clipping, loss_reduction="mean", max_grad_norm=_threshold(oracle))
    run_backward(model)
    tracker.flush()
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    groups = [[names[p] for p in g.params] for g in tracker.groups]
    expected = clipped_sum(oracle, groups, [g.max_norm for g in tracker.groups])
    assert set(names.values()) == set(expected)
    bound = BF16_BOUND
    if torch_bf16 is not None:  # torch's own bf16 per-sample gradients, clipped the same way
        reference = clipped_sum(torch_bf16, groups, [g.max_norm for g in tracker.groups])
        bound = max(bound, 2 * max(relative_error(reference[n], expected[n]) for n in expected))
    worst = 0.0
    for p, s in tracker.clipped_sum.items():
        assert s.dtype == torch.float32, (names[p], s.dtype)  # accumulated in fp32
        worst = max(worst, relative_error(s, expected[names[p]].float()))
    assert worst < bound, (worst, bound)
    return worst


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_over_fp32_weights(name, clipping):
    case = CASES[name]()
    oracle = _oracle(case)

    def backward(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = case.per_sample_loss(model, case.inputs)  # (B,)
        losses.float().mean().backward()

    if name == "conv":  # GroupNorm runs in fp32 under autocast, outside what its fallback rule recomputes
        with pytest.raises(ValueError, match=r"parameter 'weight' of module 'group_norm' \(GroupNorm\) reaches the "
                                             r"loss other than through the module's outputs"):
            _check(case, case.model, oracle, clipping, backward)
        return
    _check(case, case.model, oracle, clipping, backward)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_weights(name, clipping):
    case = CASES[name]()
    model = copy.deepcopy(case.model).to(torch.bfloat16)
    with torch.no_grad():  # the oracle's fp32 weights are the bf16 ones, cast back
        for p32, p16 in zip(case.model.parameters(), model.parameters()):
            p32.copy_(p16.float())
    oracle = _oracle(case)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in case.inputs.items()}

    def backward(m):
        case.per_sample_loss(m, inputs).float().mean().backward()

    torch_bf16 = [{n: g.float() for n, g in g_i.items()} for g_i in per_sample_grads(
        copy.deepcopy(model), lambda m, i: case.per_sample_loss(m, {k: v[i: i + 1] for k, v in inputs.items()}).sum(),
        case.batch_size)]
    _check(case, model, oracle, clipping, backward, torch_bf16)
