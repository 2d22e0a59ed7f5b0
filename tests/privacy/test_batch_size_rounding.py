"""One sample more or less must not change how the OTHER samples' gradients are rounded.

A mean loss over a Poisson batch divides every sample's gradient by the realized batch size B. Autograd rounds
g / B, and the engine scales it back by B: the rounding error depends on B, so removing a sample re-rounds all the
others, in the same direction when the attacker picks their values. Each clipped sample turns by ~2^-9 in bf16
(~2^-24 in fp32), and B of them add up: the clipped sum moved by 1.8 C at B = 512 in bf16 when the removed sample
had no gradient at all. Hence the engine backprops sums under Poisson sampling and refuses a mean there.
Oracle: the float64 norm of the difference of the two clipped sums.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.engine_setup import MEAN_OVER_POISSON
from dptrain.grad_sample.tracker import GradSampleTracker

C = 0.5
# output gradients whose roundings of g / 512 and g / 511 turn every sample the same way (found by a search)
OUTPUT_GRADIENT = {torch.bfloat16: (1.088477373123169, 1.1320304870605469),
                   torch.float32: (1.1954779624938965, 1.6691005229949951)}


def moved_by_removing_a_silent_sample(dtype: torch.dtype, batch: int, reduction: str) -> float:
    """||clipped sum(B samples) - clipped sum(first B - 1)|| / C, the last sample contributing nothing."""
    layer = nn.Linear(2, 2, bias=False).to(dtype)
    x = torch.zeros(batch, 1, 2, dtype=dtype)  # (B, T, d_in)
    x[:-1, :, 0] = 1.0
    out_grad = torch.tensor(OUTPUT_GRADIENT[dtype]).expand(batch, 1, 2).clone()  # (B, T, d_out)
    out_grad[-1] = 0.0
    sums = []
    for n in (batch, batch - 1):
        tracker = GradSampleTracker(layer, clipping="flat", max_grad_norm=C, loss_reduction=reduction)
        loss = (layer(x[:n]).float() * out_grad[:n]).sum()
        (loss / n if reduction == "mean" else loss).backward()
        tracker.flush()
        sums.append(tracker.clipped_sum[layer.weight].double())
        tracker.detach()
    return float((sums[0] - sums[1]).norm()) / C


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_sum_loss_leaves_the_other_samples_untouched(dtype):
    assert moved_by_removing_a_silent_sample(dtype, 512, "sum") == 0.0


def test_a_mean_over_the_realized_batch_size_couples_the_samples():
    """The attack the refusal below closes (the tracker cannot see what the loss was divided by)."""
    assert moved_by_removing_a_silent_sample(torch.bfloat16, 512, "mean") > 1.0
    assert moved_by_removing_a_silent_sample(torch.float32, 512, "mean") > 1e-3


def _make_private(**kw):
    model = nn.Linear(2, 2)
    loader = DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=4)
    return dptrain.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        max_grad_norm=1.0, noise_multiplier=1.0, **kw)


def test_the_engine_refuses_a_mean_over_poisson_batches():
    with pytest.raises(ValueError) as err:
        _make_private(loss_reduction="mean")
    assert str(err.value) == MEAN_OVER_POISSON and "\n" not in str(err.value)


def test_the_engine_takes_a_mean_over_fixed_batches_and_defaults_to_a_sum():
    """Fixed batches: neighbours differ by replacing one record, the batch size (the divisor) is the same."""
    _, optimizer, _ = _make_private(loss_reduction="mean", poisson_sampling=False)
    assert optimizer.tracker.clipper.loss_reduction == "mean"
    _, optimizer, _ = _make_private()
    assert optimizer.tracker.clipper.loss_reduction == "sum"
