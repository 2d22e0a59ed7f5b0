"""dptrain: differentially private training for PyTorch, built for fine-tuning language models.

``import dptrain`` stays light (no torch import) so ``dptrain.accountants`` works without torch; the
engine and its parts load on first use.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "PrivacyEngine": "dptrain.engine",
    "DPOptimizer": "dptrain.optimizer",
    "DPDataLoader": "dptrain.sampling",
    "PoissonBatchSampler": "dptrain.sampling",
    "GradSampleTracker": "dptrain.grad_sample.tracker",
    "NonFiniteGradientError": "dptrain.grad_sample.tracker",
    "register_rule": "dptrain.grad_sample.registry",
    "UnsupportedModuleError": "dptrain.grad_sample.registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
