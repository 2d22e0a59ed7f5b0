"""A one-time probe that the model treats the samples of a batch independently.

Per-sample clipping bounds one record's influence only if each sample's output depends on that sample alone.
The per-module checks catch layers that mix samples through parameters or buffers (BatchNorm); a layer that
mixes them without either (``x - x.mean(0)``, attention across the batch, capacity-limited expert routing) is
invisible to them. So before the first training forward pass of two or more samples the model is run in eval
mode (dropout off), without gradients, on the whole batch and on its first and last samples alone; each one's
output must equal its row of the batch's output, or ``make_private``'s model refuses to train. The probe runs
before the real forward pass, so anything a forward pass sets on the model is left as the real one set it.

Independent outputs are not enough: the per-sample rules take dim 0 of every layer's tensors as the sample, so a
model that runs a layer on a sequence-first (T, B, ...) view of its batch (and turns it back) has per-sample
outputs but gives that layer "per-sample" gradients of time steps, each mixing every sample (with T == B nothing
else notices). So the probe then differentiates the eval-mode outputs with a fixed random cotangent, through the
tracker's own rules but apart from training's sums (``isolated_contributions``), on the batch cut to its first and
last samples and on each of them alone: each sample's gradient (and its norm, as clipping computes it) in the pair
must equal its gradient alone. A batch of one is exact or refused (dim 0 of a layer's tensors must then be 1), and
the pair is enough: a layer whose dim 0 is not the sample sees a dim 0 other than 2 there (refused by the tracker's
batch-dimension check, as it is in training whenever that dim differs from the batch) or mixes the pair's rows
(found by the comparison). The pair, not the whole batch, keeps the extra eval-mode backward small (eval mode runs
without the activation checkpointing a model may train with). Global RNG states and ``.grad`` are left as found.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from dptrain import kernels
from dptrain.grad_sample.contributions import per_sample_sq_norms, select_samples, weighted_sum
from dptrain.grad_sample.registry import UnsupportedModuleError

logger = logging.getLogger(__name__)

__all__ = ["install_probe", "check_independence", "check_per_sample_gradients"]


def install_probe(model: nn.Module, batch_size: Callable[[], int], disabled: Callable,
                  tracker=None) -> Callable[[], None]:
    """Probe ``model`` before its first training forward pass of >= 2 samples; returns the undo.

    ``batch_size()`` is the batch size of the call being probed, ``disabled()`` a context in which forward passes
    are not captured for per-sample gradients. ``tracker``: the ``GradSampleTracker`` whose per-sample gradients
    are checked too (default: the one ``disabled`` is a method of, if any).
    """
    if tracker is None:
        tracker = getattr(disabled, "__self__", None)
    if tracker is not None and not hasattr(tracker, "isolated_contributions"):
        tracker = None
    state = {"probing": False}

    def hook(module, args, kwargs):
        if state["probing"] or not torch.is_grad_enabled():
            return
        batch = batch_size()
        if batch is None or batch < 2:
            return
        state["probing"] = True
        try:
            with disabled(), torch.no_grad():
                check_independence(module, args, kwargs, batch)
            if tracker is not None:
                check_per_sample_gradients(tracker, module, args, kwargs, batch)
        finally:
            state["probing"] = False
        handle.remove()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle.remove


def check_independence(model: nn.Module, args: tuple, kwargs: dict, batch: int) -> None:
    """Raise if the eval-mode output of the first or last sample alone differs from its row in the batch's output."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        rows = _tensors(model(*args, **kwargs))
        for i in (0, batch - 1):
            alone = _tensors(model(*_slice(args, i, batch), **_slice(kwargs, i, batch)))
            if len(alone) != len(rows):
                raise UnsupportedModuleError(f"the model returns {len(rows)} tensors for a batch of {batch} but "
                                             f"{len(alone)} for sample {i} alone, so its samples cannot be compared")
            for where, (full, single) in enumerate(zip(rows, alone)):
                if full.dim() > 0 and full.shape[0] == batch:  # a per-sample output
                    _compare(full[i], single, i, where)
    finally:
        for m, training in modes.items():
            m.training = training


def check_per_sample_gradients(tracker, model: nn.Module, args: tuple, kwargs: dict, batch: int) -> None:
    """Raise if the per-sample gradient that ``tracker`` computes for the first or last sample of the batch (on the
    batch cut to those two) differs from the one it computes for that sample alone (eval mode, loss <v, outputs>
    with a fixed random v)."""
    modes = {m: m.training for m in model.modules()}
    grads = [(p, p.grad) for p in model.parameters()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    args, kwargs = _detach(args), _detach(kwargs)  # the probe's backward stays inside the model
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            cotangents: Dict[int, torch.Tensor] = {}

            def run(a, kw, rows: int, i: Optional[int]) -> None:
                # identity saved-tensor hooks: an enclosing checkpoint's must not count the probe's saved tensors
                with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                    outputs = _tensors(model.forward(*a, **kw))  # not model(): its hooks see no extra training pass
                live = [(k, t) for k, t in enumerate(outputs) if t.requires_grad and t.is_floating_point()
                        and t.dim() > 0 and t.shape[0] == rows]
                if i is None:  # the pair: draw the cotangents
                    for k, t in live:
                        g = torch.Generator(device=t.device).manual_seed(1 + k)
                        cotangents[k] = torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype)
                live = [(k, t) for k, t in live if k in cotangents]
                if live:
                    v = [cotangents[k] if i is None else cotangents[k][i:i + 1] for k, _ in live]
                    torch.autograd.backward([t for _, t in live], v)

            probed = (0, batch - 1)
            pair = _rows(args, probed, batch), _rows(kwargs, probed, batch)  # the batch, cut to the probed samples
            try:
                in_batch = tracker.isolated_contributions(lambda: run(*pair, 2, None), 2)
            except UnsupportedModuleError as err:
                raise UnsupportedModuleError(f"per-sample gradient probe, samples {probed} of the first batch: "
                                             f"{err}") from None
            if not cotangents:
                logger.info("per-sample gradient probe skipped: the model returns no per-sample output with a gradient")
                return
            norms = {p: per_sample_sq_norms(uses).sqrt() for p, uses in in_batch.items()}  # {p: (2,)}
            for j, i in enumerate(probed):
                try:
                    alone = tracker.isolated_contributions(
                        lambda: run(_slice(args, i, batch), _slice(kwargs, i, batch), 1, j), 1)
                except UnsupportedModuleError as err:
                    raise UnsupportedModuleError(f"per-sample gradient probe, sample {i} of the first batch run "
                                                 f"alone: {err}") from None
                _compare_gradients(tracker, in_batch, norms, alone, j, i)
    finally:
        for m, training in modes.items():
            m.training = training
        for p, g in grads:
            p.grad = g


def _compare_gradients(tracker, in_batch: dict, norms: dict, alone: dict, j: int, i: int) -> None:
    """Row j's per-sample gradient in the probed batch (its uses ``in_batch``, its norm in ``norms``, as clipping
    computes them) against the gradient of that sample (``i`` of the first batch) alone, per parameter."""
    params = list(dict.fromkeys(list(in_batch) + list(alone)))
    found = {}
    for p in params:
        row = [select_samples(c, slice(j, j + 1)) for c in in_batch.get(p, [])]
        mine = weighted_sum(row, _one(p), p.shape) if row else torch.zeros(p.shape, device=p.device)
        own = weighted_sum(alone[p], _one(p), p.shape) if p in alone else torch.zeros(p.shape, device=p.device)
        norm = float(norms[p][j]) if p in norms else 0.0
        found[p] = (norm, _norm(own), _norm(mine - own.to(mine.device)))
    scale = max(sum(n * n for n, _, _ in found.values()), sum(o * o for _, o, _ in found.values())) ** 0.5
    for p, (norm, own, gap) in found.items():
        tol = max(1e-3, 16 * torch.finfo(p.dtype).eps if p.is_floating_point() else 0.0) * scale + 1e-12
        if gap > tol or abs(norm - own) > tol:
            raise UnsupportedModuleError(
                f"per-sample gradients are mixed across the batch: for parameter {tracker.parameter_name(p)}, sample {i}'s "
                f"gradient computed in a batch (norm {norm:.4g}) differs from its gradient alone (norm {own:.4g}) "
                f"by {gap:.3g} (tolerance {tol:.3g}), so clipping would not bound one record's influence; keep dim 0 "
                "of every layer's tensors the sample (no sequence-first (T, B, ...) layout inside the model)"
            )


def _norm(t: torch.Tensor) -> float:
    return float(kernels.row_sq_norms(t.reshape(1, -1)).sqrt())


def _one(p: torch.Tensor) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=p.device)


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (tuples, lists and mappings rebuilt)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _rows(value: Any, rows: tuple, batch: int) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to the samples ``rows``."""
    return _map(value, lambda t: t[torch.tensor(rows, device=t.device)] if t.dim() > 0 and t.shape[0] == batch else t)


def _detach(value: Any) -> Any:
    return _map(value, torch.Tensor.detach)


def _compare(in_batch: torch.Tensor, alone: torch.Tensor, i: int, where: int) -> None:
    alone = alone[0] if alone.dim() > 0 and alone.shape[0] == 1 else alone.new_full((0,), 0)  # (...) of one sample
    tol = max(1e-4, 16 * torch.finfo(in_batch.dtype).eps) if in_batch.is_floating_point() else 0.0
    scale = float(in_batch.abs().max()) if in_batch.numel() else 0.0
    gap = float((in_batch.float() - alone.float()).abs().max()) if in_batch.numel() else 0.0
    if in_batch.shape != alone.shape or gap > tol * max(scale, 1.0):
        raise UnsupportedModuleError(
            f"the model mixes the samples of a batch: in eval mode, output {where} of sample {i} run alone differs "
            f"from its row in the batch by {gap:.3g} (tolerance {tol * max(scale, 1.0):.3g}), so per-sample "
            "clipping does not bound one record's influence; remove the layer that combines samples (a batch "
            "statistic, attention across the batch), or make its result per sample"
        )


def _slice(value: Any, i: int, batch: int) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to sample ``i`` (kept 1 long)."""
    return _map(value, lambda t: t[i:i + 1] if t.dim() > 0 and t.shape[0] == batch else t)


def _tensors(value: Any) -> List[torch.Tensor]:
    """The tensors of a forward's output in a fixed order (dicts and Hugging Face outputs by key)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for k in value for t in _tensors(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []
