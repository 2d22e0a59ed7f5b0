"""Attack: a layer without parameters or buffers that mixes the samples of a batch (a batch statistic, attention
across the batch). The per-module checks cannot see it, and one record then moves the clipped sum by far more than
C; the first training forward pass must be refused instead."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.grad_sample.registry import UnsupportedModuleError
from dptrain.grad_sample.tracker import GradSampleTracker

C = 1.0


class Center(nn.Module):
    """x minus the batch mean: every output row depends on every sample."""

    def forward(self, x):  # (B, d)
        return x - x.mean(0, keepdim=True)


class BatchAttention(nn.Module):
    """Each sample attends to every sample of the batch."""

    def forward(self, x):  # (B, d)
        return torch.softmax(x @ x.t(), dim=1) @ x  # (B, d)


def _mixing_model(mixer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), mixer, nn.Linear(8, 1))


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), 10 * torch.randn(n, 1, generator=g)


def _clipped_sum(model, x, y):
    """The tracker's clipped sum of the batch (x, y), as one vector."""
    tracker = GradSampleTracker(model, clipping="flat", max_grad_norm=C, loss_reduction="sum")
    (model(x) - y).pow(2).sum().backward()
    tracker.flush()
    total = torch.cat([tracker.clipped_sum[p].flatten() for p in model.parameters()])
    tracker.detach()
    return total


def test_without_the_probe_one_record_moves_the_clipped_sum_by_more_than_c():
    """Why the probe exists: the per-sample rules alone accept the model and the sensitivity bound fails."""
    x, y = _data()
    x[0] = 50.0  # an outlier record: it shifts the batch mean, so every other sample's gradient
    model = _mixing_model(Center())
    change = (_clipped_sum(model, x, y) - _clipped_sum(model, x[1:], y[1:])).norm()
    assert change > 2 * C, float(change)  # a sound mechanism has change <= C


@pytest.mark.parametrize("mixer", [Center(), BatchAttention()], ids=["batch-mean", "batch-attention"])
def test_make_private_refuses_a_model_that_mixes_samples(mixer):
    model = _mixing_model(mixer)
    x, y = _data()
    engine = dptrain.PrivacyEngine()
    dp_model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0, max_grad_norm=C)
    with pytest.raises(UnsupportedModuleError, match=r"mixes the samples of a batch: in eval mode, output 0 of sample 0"):
        dp_model(x[:8])
    assert optimizer.steps_taken == 0


def test_an_independent_model_with_dropout_trains_and_keeps_its_modes():
    """The probe runs in eval mode (dropout off), once, and leaves every module's mode as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1))
    model[3].eval()  # a mixed-mode model: the probe must put back exactly this
    modes = [m.training for m in model.modules()]
    x, y = _data()
    engine = dptrain.PrivacyEngine()
    dp_model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0, max_grad_norm=C)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    for _ in range(2):
        (dp_model(x[:8]) - y[:8]).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [m.training for m in model.modules()] == modes and optimizer.steps_taken == 2
    assert len(calls) == 2 + 3  # the probe (batch and two samples alone) once, at the first step
