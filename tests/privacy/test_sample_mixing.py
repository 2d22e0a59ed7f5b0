"""Attack: a layer without parameters or buffers that mixes the samples of a batch (a batch statistic, attention
across the batch). The per-module checks cannot see it, and one record then moves the clipped sum by far more than
C; the first training forward pass must be refused instead."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain import independence
from dptrain.grad_sample.registry import UnsupportedModuleError
from dptrain.grad_sample.tracker import GradSampleTracker
from dptrain.independence import _compare_gradients, check_per_sample_gradients
from tests.helpers.models import CASES

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
    assert len(calls) == 2 + 3 + 3  # the probes (batch and two samples alone, outputs then gradients) once, at step 1


# ---------------------------------------------------------------- per-sample gradients mixed by the layout
# The model's outputs are per sample, but a layer sees a tensor whose dim 0 is not the sample: its "per-sample"
# gradients are per time step, each mixing every sample. With T == B the tracker's batch-dimension check passes;
# before the gradient probe one replaced record moved the clipped sum by 8.52 (allowed 2C = 2).
T = B = 8


class SequenceFirst(nn.Module):
    """Runs ``fc`` on the sequence-first view (T, B, d) of its batch-first input, as RNN-style code does."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):  # (B, T, 4)
        h = self.fc(x.transpose(0, 1))  # (T, B, 4)
        return self.head(h.mean(0))  # (B, 2)


class Scrambled(nn.Module):
    """Runs ``fc`` on rows that mix samples while dim 0 stays B (the identity for a batch of one), then undoes it:
    outputs per sample, and only a comparison of per-sample gradients can tell."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):  # (B, T, 4)
        b, t, d = x.shape
        h = self.fc(x.transpose(0, 1).reshape(b, t, d)).reshape(t, b, d).transpose(0, 1)  # (B, T, 4)
        return self.head(h.mean(1))  # (B, 2)


def _sequences(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = 3 * torch.randn(B, T, 4, generator=g), torch.randint(0, 2, (B,), generator=g)
    x2, y2 = x.clone(), y.clone()
    x2[0], y2[0] = 30 * torch.randn(1, 4, generator=g).expand(T, 4), 1 - y[0]  # replace record 0
    return (x, y), (x2, y2)


def _tracker_sum(make, x, y):
    torch.manual_seed(0)
    model = make()
    tracker = GradSampleTracker(model, clipping="flat", max_grad_norm=C, loss_reduction="sum")
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    tracker.flush()
    total = torch.cat([tracker.clipped_sum[p].flatten() for p in model.parameters()])
    tracker.detach()
    return total


@pytest.mark.parametrize("make", [SequenceFirst, Scrambled], ids=["sequence-first", "scrambled"])
def test_without_the_gradient_probe_one_record_moves_the_clipped_sum_by_more_than_2c(make):
    change = max(float((_tracker_sum(make, *a) - _tracker_sum(make, *b)).norm())
                 for a, b in map(_sequences, range(8)))
    assert change > 2 * C, change  # replace-one: a sound mechanism has change <= 2C


@pytest.mark.parametrize("make, message", [
    (SequenceFirst, r"per-sample gradient probe, samples \(0, 7\) of the first batch: module .fc.: gradient batch "
                    r"dimension 8 differs from the batch size 2; dptrain needs batch-first tensors"),
    (Scrambled, r"per-sample gradients are mixed across the batch: for parameter fc\.\w+, sample 0's gradient "
                r"computed in a batch .* keep dim 0 of every layer's tensors the sample"),
], ids=["sequence-first", "scrambled"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_make_private_refuses_per_sample_gradients_mixed_by_the_layout(make, message, clipping):
    """The attack as reported (T == B, sequence-first layer): refused at the first training forward pass."""
    (x, y), _ = _sequences(6)
    torch.manual_seed(0)
    model = make()
    start = [p.detach().clone() for p in model.parameters()]
    engine = dptrain.PrivacyEngine()
    dp_model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), clipping=clipping,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=B), noise_multiplier=0.0, max_grad_norm=C)
    with pytest.raises(UnsupportedModuleError, match=message) as err:
        dp_model(x)
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedModuleError):  # refused again, not only once
        dp_model(x)
    assert optimizer.steps_taken == 0 and all(torch.equal(a, p) for a, p in zip(start, model.parameters()))
    assert engine.tracker.clipped_sum == {} and all(not g.pending for g in engine.tracker.groups)


def test_the_gradient_probe_leaves_rng_grads_and_tracker_as_found():
    """The probe runs between a hook registered before make_private and one registered after: the global RNG and
    every .grad are as the first saw them, and the tracker holds the real forward pass's calls only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1))
    x, y = _data()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a stale gradient the probe must not touch
    seen = []

    def look(module, args):
        if torch.is_grad_enabled():  # the output probe's own passes run without gradients
            seen.append((torch.get_rng_state(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]))

    model.register_forward_pre_hook(look)
    engine = dptrain.PrivacyEngine()
    dp_model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0, max_grad_norm=C)
    model.register_forward_pre_hook(look)
    out = dp_model(x[:8])
    assert len(seen) == 2 and torch.equal(seen[0][0], seen[1][0])
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(seen[0][1], seen[1][1]))
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert engine.tracker._outstanding == {model[0]: 1, model[3]: 1} and engine.tracker.batch_size == 8
    assert all(not g.pending for g in engine.tracker.groups) and engine.tracker.clipped_sum == {}
    (out - y[:8]).pow(2).mean().backward()
    optimizer.step()
    assert optimizer.steps_taken == 1 and engine.tracker.num_samples == 8


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_the_gradient_probe_accepts_every_parity_model(case_name, clipping, monkeypatch):
    """Every model of the parity suite (Hugging Face GPT-2 tied, Llama, LoRA, embeddings, conv, the torch.func
    fallback): per-sample gradients in the batch equal those alone, for both probed samples."""
    case = CASES[case_name]()
    compared = []
    monkeypatch.setattr(independence, "_compare_gradients",
                        lambda *a: compared.append(a[-1]) or _compare_gradients(*a))
    tracker = GradSampleTracker(case.model, clipping=clipping, loss_reduction="mean", max_grad_norm=C)
    lm = "input_ids" in case.inputs
    args, kwargs = ((), {"input_ids": case.inputs["input_ids"]}) if lm else ((case.inputs["x"],), {})
    if case_name == "tiny_lm":  # its output object hides the logits from the probes: give them the tensor
        forward = case.model.forward
        case.model.forward = lambda **kw: forward(**kw).logits
    check_per_sample_gradients(tracker, case.model, args, kwargs, case.batch_size)
    assert compared == [0, case.batch_size - 1]  # the samples of the first batch compared
    assert all(p.grad is None for p in case.model.parameters()) and tracker.clipped_sum == {}
    assert all(not g.pending for g in tracker.groups) and tracker._outstanding == {}
    tracker.detach()


@pytest.mark.parametrize("length", [1, 2, 3])
def test_a_sequence_first_layer_is_refused_at_any_length(length):
    """The probe runs the batch cut to two samples: a sequence-first layer is refused there whatever T is (T == 2
    included, where the pair's batch dimension matches; T == 1, where dim 0 is 1 alone)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, length, 4, generator=g), torch.randint(0, 2, (B,), generator=g)
    torch.manual_seed(0)
    model = SequenceFirst()
    dp_model, _, _ = dptrain.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=B))
    with pytest.raises(UnsupportedModuleError, match=r"per-sample gradient|batch-first tensors in every layer"):
        dp_model(x)
