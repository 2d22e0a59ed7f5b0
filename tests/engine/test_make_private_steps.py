"""``make_private(steps=N)``: the same calibration as the epochs that give N logical steps; bad lengths refused."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.accountants import calibrate_noise


def _private(**kwargs):
    model = nn.Linear(3, 1)
    data = TensorDataset(torch.randn(100, 3), torch.randn(100, 1))
    engine = dptrain.PrivacyEngine()
    _, optimizer, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          data_loader=DataLoader(data, batch_size=10), max_grad_norm=1.0, **kwargs)
    return engine, optimizer


@pytest.mark.parametrize("poisson", [True, False])
def test_steps_calibrate_like_the_epochs_that_give_them(poisson):
    target = dict(target_epsilon=2.0, target_delta=1e-5, poisson_sampling=poisson)
    by_steps = _private(steps=25, **target)[1].noise_multiplier
    by_epochs = _private(epochs=2.5, **target)[1].noise_multiplier  # ceil(2.5 * 10) = 25 steps
    assert by_steps == by_epochs
    if poisson:  # the oracle: 25 Poisson steps at q = 0.1
        assert by_steps == pytest.approx(calibrate_noise(target_epsilon=2.0, sample_rate=0.1, steps=25, delta=1e-5))
    else:  # fixed batches: 3 started epochs, each one un-amplified step at sensitivity 2C
        expected = 2 * calibrate_noise(target_epsilon=2.0, sample_rate=1.0, steps=math.ceil(25 / 10), delta=1e-5)
        assert by_steps == pytest.approx(expected)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(steps=0), ValueError, "steps must be an integer >= 1, found 0"),
    (dict(steps=2.5), TypeError, "steps must be an integer >= 1, found 2.5"),
    (dict(steps=True), TypeError, "steps must be an integer >= 1, found True"),
    (dict(epochs=float("nan")), ValueError, "epochs must be a finite number > 0, found nan"),
    (dict(epochs=1, steps=10), ValueError, "give epochs or steps, not both"),
    (dict(), ValueError, "found target_delta=1e-05 and no epochs or steps"),
])
def test_bad_run_lengths_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        _private(target_epsilon=2.0, target_delta=1e-5, **kwargs)
