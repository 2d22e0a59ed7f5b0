"""What the step-time benchmarks share: one training step of a causal LM under each method (non-DP, dptrain,
Opacus), run in its own process (``module_command``), and the peak-memory counters of that process."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # worker processes run from here, as ``python -m benchmarks.<name>``


def module_command(module: str, *args: str) -> list:
    """The command that runs ``benchmarks.<module>`` in a fresh interpreter (with ``cwd=ROOT``)."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def make_method(method: str, model, optimizer, loader):
    """``(model, optimizer, criterion)`` for ``method``: "nondp", "dptrain-<clipping>" or "opacus-<mode>"
    (sigma = 1, C = 1, the loader's fixed batches); ``criterion`` is Opacus ghost clipping's loss wrapper, else None."""
    if method.startswith("dptrain"):
        import dptrain

        model, optimizer, _ = dptrain.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=1.0, noise_multiplier=1.0,
            poisson_sampling=False, clipping=method.split("-")[1])
        return model, optimizer, None
    if method.startswith("opacus"):
        import warnings

        import torch
        from opacus import PrivacyEngine as OpacusEngine

        warnings.filterwarnings("ignore")
        mode = method.split("-")[1]
        criterion = torch.nn.CrossEntropyLoss()
        out = OpacusEngine().make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                          noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                          grad_sample_mode=mode)
        return out[0], out[1], out[2] if mode == "ghost" else None
    if method != "nondp":
        raise ValueError(f"method must be nondp, dptrain-<clipping> or opacus-<mode>, found {method!r}")
    return model, optimizer, None


def lm_step(model, optimizer, criterion, batch_ids, vocab: int, **model_kwargs):
    """A function running one training step on ``batch_ids`` (B, T): the mean over samples of each sample's mean
    next-token loss, backward, optimizer step."""
    import torch.nn.functional as F

    batch = batch_ids.shape[0]

    def step():
        logits = model(input_ids=batch_ids, **model_kwargs).logits[:, :-1]  # (B, T-1, V)
        targets = batch_ids[:, 1:]
        if criterion is not None:  # Opacus ghost clipping: its loss wrapper runs the second backward
            loss = criterion(logits.reshape(-1, vocab), targets.reshape(-1), shape=logits.shape)
        else:
            per_token = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
            loss = per_token.view(batch, -1).mean(1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reset_rss_peak() -> None:
    """Restart this process's peak-RSS counter (Linux VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak_mb() -> float:
    """This process's peak RSS since the last reset, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
