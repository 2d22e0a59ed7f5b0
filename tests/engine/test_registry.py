"""The rule registry: one rule per module type, chosen only for modules that run that type's own forward."""

import pytest
import torch
from torch import nn

import dptrain.grad_sample.attachment  # noqa: F401  registers the built-in rules
from dptrain.grad_sample.linear import LinearRule
from dptrain.grad_sample.registry import RULES, find_rule, register_rule
from dptrain.grad_sample.rules_base import HookRule


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _Renamed(nn.Linear):
    pass


def test_rule_only_for_modules_running_the_registered_forward():
    assert isinstance(find_rule(nn.Linear(3, 2)), LinearRule)
    assert isinstance(find_rule(_Renamed(3, 2)), LinearRule), "a subclass without its own forward keeps the rule"
    assert find_rule(_Scaled(3, 2)) is None, "a subclass with its own forward goes to the exact fallback"


def test_supports_sends_unusual_configurations_to_the_fallback():
    assert find_rule(nn.Conv2d(2, 4, 3)) is not None
    assert find_rule(nn.Conv2d(2, 4, 3, groups=2)) is None
    assert find_rule(nn.Embedding(5, 3, sparse=True)) is None


def test_registering_a_type_twice_is_refused_unless_forced():
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear is already registered \(LinearRule\)"):
        register_rule(nn.Linear)(type("OtherRule", (HookRule,), {}))
    assert isinstance(RULES[nn.Linear], LinearRule), "the refused registration changed nothing"
    try:
        replacement = register_rule(nn.Linear, force=True)(type("OtherRule", (HookRule,), {}))
        assert type(find_rule(nn.Linear(3, 2))) is replacement
    finally:
        RULES[nn.Linear] = LinearRule()
    assert isinstance(find_rule(nn.Linear(3, 2)), LinearRule)


def test_custom_rule_for_a_new_type_is_used_by_the_tracker():
    from dptrain.grad_sample.contributions import Instantiated
    from dptrain.grad_sample.tracker import GradSampleTracker

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.g

    @register_rule(Gain)
    class GainRule(HookRule):
        def contributions(self, module, x, grad_output):
            return {module.g: Instantiated((x * grad_output).reshape(x.shape[0], -1, 3).sum(1))}  # (B, 3)

    try:
        model = Gain()
        assert isinstance(find_rule(model), GainRule)
        tracker = GradSampleTracker(model, clipping="flat", max_grad_norm=1e6, loss_reduction="sum")
        x = torch.randn(4, 3)
        model(x).pow(2).sum().backward()
        tracker.flush()
        expected = (2 * x * x).sum(0)  # d/dg sum (x g)^2 at g = 1, summed over samples (nothing clipped)
        assert torch.allclose(tracker.clipped_sum[model.g], expected, atol=1e-5)
        tracker.detach()
    finally:
        RULES.pop(Gain, None)
