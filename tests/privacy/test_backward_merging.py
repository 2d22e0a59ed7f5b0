"""Attack: gradient accumulation by several forward/backward passes before ONE ``optimizer.step()``, without the
engine's micro-batching (``max_physical_batch_size``) or ``optimizer.accumulate()``.

The tracker files per-sample contributions by sample INDEX, so before the fix sample i of every pass was clipped as
one "sample" (8 records in two backward passes of 4: relative error 0.769 against the per-sample oracle, exactly
sum_i clip(g_i + g_(i+4))), and passes of unequal sizes crashed with a raw RuntimeError. Now a second captured
forward pass after a backward, or the backward of a second forward pass, before the step is refused in one line and
the logical batch is dropped; the sanctioned paths and the forward passes that are not trained on still work.
"""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.grad_sample.tracker import MergedPassesError
from tests.helpers.oracle import clipped_sum, per_sample_grads, relative_error

C = 1.0
MESSAGE = (r"several forward/backward passes before one step merge sample i of every pass into one clipped sample.*"
           r"max_physical_batch_size.*optimizer\.accumulate\(\)")


def _data(n=9):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g) * 10, torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _private(model, x, y, batch_size=8, clipping="flat", **kw):
    engine = dptrain.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size), max_grad_norm=C, noise_multiplier=0.0,
        clipping=clipping, loss_reduction="sum", **kw)
    return engine, model, optimizer, loader


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


def _update(model, start, optimizer):
    """The clipped sum the step applied (lr 1, no noise: (start - params) * expected batch size), per name."""
    return {n: (start[n] - p.detach()).double() * optimizer.expected_batch_size for n, p in model.named_parameters()}


def _oracle(model, x, y, clipping):
    grads = per_sample_grads(model, lambda m, i: _loss(m, x[i:i + 1], y[i:i + 1]), len(x))
    names = list(grads[0])
    groups = [names] if clipping == "flat" else [names[:2], names[2:]]
    return clipped_sum(grads, groups, [C] if clipping == "flat" else [C / 2**0.5] * 2)


def _flat(d):
    return torch.cat([v.flatten() for v in d.values()])


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_two_backward_passes_before_one_step_are_refused(clipping):
    """The attack as reported: two forward/backward passes of 4 records, then one step."""
    x, y = _data()
    engine, model, optimizer, _ = _private(_model(), x[:8], y[:8], clipping=clipping)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, x[:4], y[:4]).backward()
    with pytest.raises(MergedPassesError, match="a second forward pass of the model began after a backward pass"):
        _loss(model, x[4:8], y[4:8]).backward()
    # the first pass was dropped with it: a step now applies no record's gradient (it would be noise only)
    assert engine.tracker.clipped_sum == {} and all(not g.pending for g in engine.tracker.groups)
    optimizer.step()
    assert all(torch.equal(start[n], p) for n, p in model.named_parameters())


def test_the_error_is_one_line_and_says_what_to_do():
    x, y = _data()
    _, model, _, _ = _private(_model(), x[:8], y[:8])
    _loss(model, x[:4], y[:4]).backward()
    with pytest.raises(MergedPassesError, match=MESSAGE) as err:
        model(x[4:8])
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_a_third_pass_of_another_size_is_refused_not_a_raw_crash():
    """Before: RuntimeError 'Expected size for first two dimensions of batch2 tensor...'."""
    x, y = _data()
    _, model, optimizer, _ = _private(_model(), x, y)
    _loss(model, x[:4], y[:4]).backward()
    with pytest.raises(MergedPassesError, match=MESSAGE):
        _loss(model, x[8:9], y[8:9]).backward()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_two_forward_passes_then_one_backward_are_refused(clipping):
    """One backward of two passes' summed losses merges just the same: refused when their gradients meet."""
    x, y = _data()
    engine, model, _, _ = _private(_model(), x[:8], y[:8], clipping=clipping)
    loss = _loss(model, x[:4], y[:4]) + _loss(model, x[4:8], y[4:8])
    with pytest.raises(MergedPassesError, match="the backward passes of two forward passes of the model reached"):
        loss.backward()
    assert engine.tracker.clipped_sum == {} and all(not g.pending for g in engine.tracker.groups)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_accumulate_between_the_passes_is_exact(clipping):
    """The engine's accumulation API on the same two passes: the per-sample oracle's clipped sum, and the refusal
    is gone."""
    x, y = _data()
    expected = _oracle(_model(), x[:8], y[:8], clipping)
    _, model, optimizer, _ = _private(_model(), x[:8], y[:8], clipping=clipping)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, x[:4], y[:4]).backward()
    optimizer.accumulate()
    _loss(model, x[4:8], y[4:8]).backward()
    optimizer.step()
    assert relative_error(_flat(_update(model, start, optimizer)), _flat(expected)) < 1e-5
    assert optimizer.steps_taken == 1


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_max_physical_batch_size_is_exact(clipping):
    x, y = _data()
    expected = _oracle(_model(), x[:8], y[:8], clipping)
    _, model, optimizer, loader = _private(_model(), x[:8], y[:8], clipping=clipping, poisson_sampling=False,
                                           max_physical_batch_size=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = []
    for xb, yb in loader:
        sizes.append(len(xb))
        _loss(model, xb, yb).backward()
        optimizer.step()
    assert sizes == [3, 3, 2] and optimizer.steps_taken == 1
    assert relative_error(_flat(_update(model, start, optimizer)), _flat(expected)) < 1e-5


def test_forward_passes_not_trained_on_are_allowed():
    """Evaluation under no_grad or tracker.capture_disabled() (after the backward, before the step), and a
    captured forward whose output is never backpropagated, leave the step exact."""
    x, y = _data()
    expected = _oracle(_model(), x[:8], y[:8], "flat")
    engine, model, optimizer, _ = _private(_model(), x[:8], y[:8])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x[:3]).sum()  # captured but never backpropagated: nothing reaches the tracker
    _loss(model, x[:8], y[:8]).backward()
    with torch.no_grad():
        model(x)
    with engine.tracker.capture_disabled():
        model(x).sum()  # gradients enabled, not captured
    optimizer.step()
    assert relative_error(_flat(_update(model, start, optimizer)), _flat(expected)) < 1e-5
    # and the next logical step is an ordinary one
    _loss(model, x[:8], y[:8]).backward()
    optimizer.step()
    assert optimizer.steps_taken == 2


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.block, self.head = nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = self.inp(x)
        h = self.block(h) if self.reentrant is None else checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputation_is_not_a_second_pass(reentrant):
    """Checkpointing re-runs forward code inside the backward: part of the same pass, exact, not refused."""
    x, y = _data()
    model = _Checkpointed(reentrant)
    reference = _Checkpointed(None)
    grads = per_sample_grads(reference, lambda m, i: _loss(m, x[i:i + 1], y[i:i + 1]), 8)
    expected = clipped_sum(grads, [list(grads[0])], [C])
    _, model, optimizer, _ = _private(model, x[:8], y[:8])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, x[:8], y[:8]).backward()
    optimizer.step()
    assert relative_error(_flat(_update(model, start, optimizer)), _flat(expected)) < 1e-5


def test_the_whole_model_checkpointed_is_not_a_second_pass():
    """The root module itself re-run by checkpointing during the backward: not a new forward pass."""
    x, y = _data()
    expected = _oracle(_model(), x[:8], y[:8], "flat")
    _, model, optimizer, _ = _private(_model(), x[:8], y[:8])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = checkpoint(model, x[:8], use_reentrant=False)
    nn.functional.cross_entropy(out, y[:8], reduction="sum").backward()
    optimizer.step()
    assert relative_error(_flat(_update(model, start, optimizer)), _flat(expected)) < 1e-5
