"""Per-sample clipping inside ONE backward pass.

The tracker attaches a rule to every module that owns trainable parameters, groups the parameters into
clipping groups (one group for flat/automatic clipping, one per module for per-layer clipping; modules
that share a parameter are merged), and collects per-sample gradient contributions as backward reaches
each module. With per-layer clipping a group is processed as soon as every recorded call of its modules has
reported back, during backward, so the saved tensors are freed early; everything else at ``flush()``
(called by the optimizer's step). Processing
computes per-sample norms, clip factors and the clipped sums (fused for single-use linear layers), and
adds them to ``clipped_sum``. Nothing non-private leaves the tracker except through the DP optimizer.

Refused instead (errors naming the module or parameter): modules that mix samples or write buffers from the
data, trainable parameters or not (``guards``: by class at set-up and at every forward, and any buffer a captured
forward pass changes), and any ordinary gradient a trainable parameter receives, which can only come from a use
outside its module (no rule lets its module's own use reach it).

One captured forward pass per micro-batch: contributions are filed by sample INDEX, so the backward passes of two
captured forward passes of the model before one ``flush()`` would add sample i of each into one clipped "sample"
(gradient accumulation by several ``backward()`` calls before one ``optimizer.step()``). Every recorded call is
tagged with the captured forward pass of the model it belongs to; a second pass whose gradients reach the tracker,
or a captured forward pass after gradients arrived, before the flush, is refused with ``MergedPassesError``. The
sanctioned micro-batch paths (``max_physical_batch_size``, ``optimizer.accumulate()``) flush between passes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from dptrain import kernels
from dptrain.grad_sample.contributions import (
    Contribution,
    Factored,
    batch_size_of,
    device_of,
    densify,
    densify_gain,
    per_sample_sq_norms,
    select_samples,
    weighted_sum,
)
from dptrain.fsdp import FSDPView
from dptrain.grad_sample import guards
from dptrain.grad_sample.functorch_rule import FunctorchRule
from dptrain.grad_sample.registry import UnsupportedModuleError, find_rule
from dptrain.losses import check_model_call

# importing the rule modules registers them
from dptrain.grad_sample import conv, embedding, linear, norms  # noqa: F401  isort: skip

logger = logging.getLogger(__name__)

__all__ = ["GradSampleTracker", "ClipGroup", "NonFiniteGradientError", "MergedPassesError", "CLIPPING_MODES"]

CLIPPING_MODES = ("flat", "per_layer", "automatic")

# Bytes of explicit per-sample gradients alive at once (one batch chunk; CPU only, where they beat ghost norms
# for sequences; the GPU path keeps the fused kernels, which never write them). The size of the reused arena.
DENSE_BUDGET_BYTES = 48 * 2**20


class NonFiniteGradientError(FloatingPointError):
    """A per-sample gradient norm was NaN or inf; the logical batch is dropped, nothing is accounted."""


class MergedPassesError(ValueError):
    """Gradients of two captured forward passes of the model would be clipped as one sample per index."""


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing re-running a forward)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


@dataclass
class ClipGroup:
    """Parameters clipped together with one threshold."""

    name: str
    modules: List[nn.Module]
    params: List[nn.Parameter]
    max_norm: float
    pending: Dict[nn.Parameter, List[Contribution]] = field(default_factory=dict)


class GradSampleTracker:
    """Attaches per-sample rules to ``model`` and accumulates clipped per-sample gradient sums."""

    def __init__(
        self,
        model: nn.Module,
        *,
        clipping: str,
        max_grad_norm: Union[float, Sequence[float], Mapping[str, float]],
        loss_reduction: str = "mean",
        automatic_gamma: float = 0.01,
        track_unclipped: bool = False,
    ):
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, found {clipping!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', found {loss_reduction!r}")
        if not automatic_gamma > 0:
            raise ValueError(f"automatic_gamma must be > 0, found {automatic_gamma}")
        self.model = model
        self.clipping = clipping
        self.loss_reduction = loss_reduction
        self.automatic_gamma = automatic_gamma
        self.track_unclipped = track_unclipped
        self._arena: Optional[torch.Tensor] = None  # see _workspace()
        self.batch_size: Optional[int] = None  # of the current forward pass
        self.step_index = 0  # set by the optimizer, for error messages
        self._enabled = True
        self._outstanding: Dict[nn.Module, int] = {}
        self._undo: list = []
        self._buffers_before: Optional[list] = None  # buffer_state at the start of a captured forward
        self._module_names: Dict[nn.Module, str] = {}
        self._rules: Dict[nn.Module, object] = {}
        self._attach_rules()
        self.groups = self._build_groups(max_grad_norm)
        self._group_of = {m: g for g in self.groups for m in g.modules}
        self.params = [p for g in self.groups for p in g.params]
        self.clipped_sum: Dict[nn.Parameter, torch.Tensor] = {}
        self.unclipped_sum: Dict[nn.Parameter, torch.Tensor] = {}
        self._arrived_batch = 0
        self._pass = 0  # captured forward passes of the model so far: tags every recorded call (see record_call)
        self._arrived_pass: Optional[int] = None  # the pass whose gradients arrived since the last flush
        self._isolated = False  # inside isolated_contributions(): a probe's passes, kept apart from training
        self._norm_log: List[tuple] = []  # this micro-batch's (group, threshold, norms, parts, blame): see _check_norms
        self.num_samples = 0  # samples processed since the last reset (private: never released as is)
        self.clipped_count: Dict[str, int] = {g.name: 0 for g in self.groups}  # per group, ditto

    # ------------------------------------------------------------------ set-up
    def _attach_rules(self) -> None:
        root = self.model.module if isinstance(self.model, FSDPView) else self.model  # the module users call
        guards.check_hub_kernels(root)
        self._all_modules = [(name or type(m).__name__, m) for name, m in self.model.named_modules()]
        for name, module in self._all_modules:  # sample-mixing modules, trainable parameters or not
            if guards.is_guarded(module):
                guards.check_mixing(name, module)
                self._undo.append(module.register_forward_pre_hook(functools.partial(_check_mode, name)))
        owners: Dict[nn.Parameter, List[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(p, []).append(f"{name}.{pname}" if name else pname)
        for name, module in self.model.named_modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            try:
                rule = find_rule(module)
            except UnsupportedModuleError as err:
                raise UnsupportedModuleError(f"module '{name}': {err}") from None
            if rule is None:
                rule = FunctorchRule(self, name)
                logger.info("module '%s' (%s) uses the torch.func fallback", name, type(module).__name__)
            self._module_names[module] = name or type(module).__name__
            self._rules[module] = rule
            self._undo += rule.attach(module, self)
            # no rule lets its module's own use reach a parameter: any ordinary gradient is a use elsewhere
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    self._undo.append(p.register_hook(_refuse_foreign_use(owners[p][0])))
            if root is not self.model:  # FSDP2: forward and backward use unsharded stand-ins; guard those too
                self._undo.append(module.register_forward_pre_hook(self._guard_stand_ins))
        self._guarded = {id(p): p for p in owners}
        self._undo.append(root.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._undo.append(root.register_forward_hook(self._after_forward))
        self._undo.append(check_model_call(root))  # warns once about Hugging Face's labels= batch loss
        self._param_names = {p: names[0] for p, names in owners.items()}

    def _guard_stand_ins(self, module, args) -> None:
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad and id(p) not in self._guarded:
                self._guarded[id(p)] = p  # kept alive, so its id stays its own
                self._undo.append(p.register_hook(_refuse_foreign_use(f"{self._module_names[module]}.{pname}")))

    def _build_groups(self, max_grad_norm) -> List[ClipGroup]:
        modules = list(self._rules)
        params_of = {m: [p for p in m.parameters(recurse=False) if p.requires_grad] for m in modules}
        if self.clipping in ("flat", "automatic"):
            norm = _positive(max_grad_norm, "max_grad_norm")
            params = list(dict.fromkeys(p for m in modules for p in params_of[m]))
            return [ClipGroup("all", modules, params, norm)]
        # per_layer: one group per module, merging modules that share a parameter (tied weights)
        ids_of = {m: {id(p) for p in params_of[m]} for m in modules}
        merged: List[List[nn.Module]] = []
        for m in modules:
            hits = [grp for grp in merged if any(ids_of[m] & ids_of[o] for o in grp)]
            merged = [grp for grp in merged if all(grp is not h for h in hits)] + [[o for h in hits for o in h] + [m]]
        merged.sort(key=lambda grp: modules.index(grp[0]))
        names = ["+".join(self._module_names[o] for o in grp) for grp in merged]
        thresholds = _per_layer_thresholds(max_grad_norm, names)
        return [
            ClipGroup(name, grp, list(dict.fromkeys(p for o in grp for p in params_of[o])), c)
            for name, grp, c in zip(names, merged, thresholds)
        ]

    @property
    def total_max_norm(self) -> float:
        """Sensitivity of the clipped sum to one sample: sqrt(sum_g C_g^2)."""
        return math.sqrt(sum(g.max_norm**2 for g in self.groups))

    def set_max_norms(self, norms: Sequence[float]) -> None:
        """New per-group thresholds (the controller's action)."""
        if len(norms) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} thresholds, found {len(norms)}")
        for g, c in zip(self.groups, norms):
            g.max_norm = _positive(c, f"max_grad_norm of group '{g.name}'")

    def detach(self) -> None:
        """Remove every hook and restore the modules' own forward."""
        for undo in reversed(self._undo):
            undo() if callable(undo) else undo.remove()
        self._undo = []

    # ------------------------------------------------------------------ capture
    def _before_forward(self, module, args, kwargs):
        if not self._enabled:  # e.g. the fallback re-running a root module that owns parameters, per sample
            return
        first = next((v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        self.batch_size = None if first is None else first.shape[0]
        self._buffers_before = guards.buffer_state(self._all_modules) if self.should_capture() else None
        if self.should_capture() and not self._isolated and not _in_backward():  # checkpointing re-runs: same pass
            if self._arrived_pass is not None:
                self._refuse_merge("a second forward pass of the model began after a backward pass")
            self._pass += 1

    def _after_forward(self, module, args, output):
        """A captured forward pass must leave every buffer as it was (see ``guards``)."""
        if not self._enabled:
            return
        before, self._buffers_before = self._buffers_before, None
        if before is not None:
            guards.check_buffers(before, guards.buffer_state(self._all_modules))

    def module_name(self, module: nn.Module) -> str:
        return self._module_names.get(module, type(module).__name__)

    def should_capture(self) -> bool:
        return self._enabled and torch.is_grad_enabled()

    @contextlib.contextmanager
    def capture_disabled(self):
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def record_call(self, module: nn.Module) -> int:
        """A captured call of ``module``; returns its tag (the captured forward pass of the model it belongs to),
        which the rule hands back to ``arrive``."""
        self._outstanding[module] = self._outstanding.get(module, 0) + 1
        return self._pass

    def arrive(self, module: nn.Module, call: int, saved, grad_output: Union[torch.Tensor, tuple]) -> None:
        """Backward reached ``module`` (``call``: the tag ``record_call`` gave): turn (saved, grad_output) into
        contributions and file them. ``grad_output``: the gradient of the output, or a tuple of them (one per
        output tensor)."""
        if not self._isolated:
            if self._arrived_pass is not None and call != self._arrived_pass:
                self._refuse_merge("the backward passes of two forward passes of the model reached the tracker")
            self._arrived_pass = call
        batch = (grad_output[0] if isinstance(grad_output, tuple) else grad_output).shape[0]
        if self.batch_size is not None and batch != self.batch_size:
            raise UnsupportedModuleError(
                f"module '{self._module_names[module]}': gradient batch dimension {batch} differs from the "
                f"batch size {self.batch_size}; dptrain needs batch-first tensors in every layer (a layer run on "
                "a sequence-first (T, B, ...) tensor inside the model is one cause)"
            )
        self._arrived_batch = batch
        contributions = self._rules[module].contributions(module, saved, grad_output)
        own = list(module._parameters.values())
        if not all(any(p is q for q in own) for p in contributions):  # identity: `in` would compare values
            raise UnsupportedModuleError(
                f"module '{self._module_names[module]}' ({type(module).__name__}) computes a weight from its "
                "parameters in a hook (e.g. torch.nn.utils.weight_norm or spectral_norm), so the per-sample gradient "
                "of that weight belongs to no parameter; remove the reparametrization or freeze the module"
            )
        group = self._group_of[module]
        for p, c in contributions.items():
            group.pending.setdefault(p, []).append(c)
        self._outstanding[module] -= 1
        # per-layer: a group is final once all its recorded calls reported back (frees its tensors early).
        # Flat clipping waits for flush(): with activation checkpointing, later segments are not recorded yet.
        if (self.clipping == "per_layer" and not self._isolated
                and all(self._outstanding.get(m, 0) == 0 for m in group.modules)):
            self._process([group])
        return None

    def _refuse_merge(self, what: str) -> None:
        """Drop the logical batch (its sums may already hold merged samples) and refuse, in one line."""
        self.reset()
        self.reset_statistics()  # a dropped batch must not reach later statistic releases
        raise MergedPassesError(
            f"{what} with no optimizer.step() or optimizer.accumulate() in between (step {self.step_index}): several "
            "forward/backward passes before one step merge sample i of every pass into one clipped sample, so the "
            "noise no longer covers one record (this logical batch was dropped); for gradient accumulation pass "
            "max_physical_batch_size to make_private or call optimizer.accumulate() after each backward, and run "
            "forward passes you do not train on under torch.no_grad() or engine.tracker.capture_disabled()"
        )

    def flush(self) -> None:
        """Process whatever contributions are still pending and check the norms (end of a micro-batch)."""
        self._arrived_pass = None
        self._process(self.groups)
        self._outstanding.clear()
        self._check_norms()
        self.num_samples += self._arrived_batch
        self._arrived_batch = 0

    def isolated_contributions(self, run, batch_size: int) -> Dict[nn.Parameter, List[Contribution]]:
        """Call ``run()`` (a probe's captured forward and backward pass of ``batch_size`` samples; it may call the
        model's ``forward`` directly) and return the contributions its backward filed, {parameter: uses}; nothing
        of training's state (sums, pending contributions, counters, the current pass) sees them or changes."""
        if self._isolated:
            raise RuntimeError("isolated_contributions() is not re-entrant")
        saved = (self.batch_size, self._buffers_before, self._outstanding, self._arrived_batch,
                 [g.pending for g in self.groups])
        self._outstanding, self._isolated, self.batch_size = {}, True, batch_size
        for g in self.groups:
            g.pending = {}
        try:
            run()
            return {p: uses for g in self.groups for p, uses in g.pending.items()}
        finally:
            self.batch_size, self._buffers_before, self._outstanding, self._arrived_batch, pending = saved
            for g, kept in zip(self.groups, pending):
                g.pending = kept
            self._isolated = False

    # ------------------------------------------------------------------ clipping
    def _process(self, groups: Sequence[ClipGroup]) -> None:
        groups = [g for g in groups if g.pending]
        if not groups:
            return
        try:
            if self.clipping == "per_layer":
                for g in groups:
                    self._clip([g], g.max_norm, g.name)
            else:  # one norm per sample over every group
                self._clip(groups, groups[0].max_norm, groups[0].name)
        finally:
            for g in groups:
                g.pending = {}

    def _clip(self, groups: Sequence[ClipGroup], max_norm: float, count_as: str) -> None:
        """Clip the pending contributions of ``groups`` with one norm per sample; add the clipped sums.

        Three routes, per parameter: densified (explicit per-sample gradients, built in batch chunks on CPU
        where cheaper than ghost norms), fused (the kernel API's norm-clip-sum of one linear weight: the GPU
        path), or factored (norms, then weighted sums from the contributions)."""
        pending = {p: uses for g in groups for p, uses in g.pending.items()}
        batch = batch_size_of(next(iter(pending.values()))[0])
        # contributions are of the batch loss: a mean loss's per-sample gradients are `scale` times larger; the
        # scale goes into the norms and clip factors (one scalar) instead of into every activation tensor
        scale = float(batch) if self.loss_reduction == "mean" and batch else 1.0
        dense, chunk = self._plan_dense(pending, batch)
        fused = None
        if self.clipping == "per_layer" and not dense:
            fused = next((p for p, u in pending.items()
                          if len(u) == 1 and isinstance(u[0], Factored) and not u[0].is_index), None)
        factored = {p: u for p, u in pending.items() if p not in dense and p is not fused}
        parts = {p: per_sample_sq_norms(uses) for p, uses in factored.items()}  # {p: (B,)}
        sq = _total(parts.values()) if parts else torch.zeros(batch, device=self._device_of(pending))  # (B,)
        if fused is not None:  # norm, clip factor and clipped sum of the big matrix in one pass
            (c,) = pending[fused]
            grad, norms = kernels.fused_clip_linear_grad(c.right, c.left, max_norm / scale, extra_sq_norms=sq)
            weights = self._weights(scale * norms, scale, max_norm, count_as, parts, blame=fused)
            clipped = grad.reshape(fused.shape).float().mul_(scale)
            self.clipped_sum[fused] = self.clipped_sum[fused].add_(clipped) if fused in self.clipped_sum else clipped
        elif dense:
            chunk_weights, whole = [], chunk >= batch  # one chunk: no slicing
            for sl in (slice(i, min(batch, i + chunk)) for i in range(0, batch, chunk)):
                grads = self._densify(dense, pending, sl)  # {p: (b, *p.shape)}
                chunk_parts = {p: per_sample_sq_norms([d]) for p, d in grads.items()}
                chunk_sq = _total(chunk_parts.values(), sq if whole else sq[sl])
                chunk_parts.update((p, part if whole else part[sl]) for p, part in parts.items())
                chunk_weights.append(self._weights(chunk_sq.sqrt_().mul_(scale), scale, max_norm, count_as, chunk_parts))
                for p, d in grads.items():
                    self._accumulate(p, [d], chunk_weights[-1])
            weights = torch.cat(chunk_weights) if len(chunk_weights) > 1 else chunk_weights[0]  # (B,)
        else:
            weights = self._weights(sq.sqrt() * scale, scale, max_norm, count_as, parts)  # (B,)
        for p, uses in factored.items():
            self._accumulate(p, uses, weights)
        if self.track_unclipped:  # error feedback's input: the batch's unclipped per-sample gradient sums
            for p, uses in pending.items():
                full = torch.full((batch,), scale, dtype=torch.float32, device=device_of(uses[0]))
                self.unclipped_sum[p] = weighted_sum(uses, full, p.shape, out=self.unclipped_sum.get(p))

    def _weights(self, norms: torch.Tensor, scale: float, max_norm: float, count_as: str,
                 parts: Dict[nn.Parameter, torch.Tensor], blame: Optional[nn.Parameter] = None) -> torch.Tensor:
        """Per-sample weights of the gradients, (b,): the clip factor (or automatic normalisation) times the loss
        scale. The norms are logged for ``_check_norms`` (NaN/inf, clip counts) at the end of the micro-batch,
        where one check replaces a synchronising check per group."""
        self._norm_log.append((count_as, max_norm, norms, parts, blame))
        if self.clipping == "automatic":
            return (max_norm * scale) / (norms + self.automatic_gamma)
        return kernels.clip_factors(norms, max_norm).mul_(scale)

    def _check_norms(self) -> None:
        """The micro-batch's per-sample norms, all at once: an error naming the layers if any is NaN or inf (the
        logical batch is dropped: nothing applied, nothing accounted), else the clipped samples counted per group."""
        log, self._norm_log = self._norm_log, []
        if not log:
            return
        norms = torch.cat([n for _, _, n, _, _ in log])  # (entries * b,)
        if not math.isfinite(norms.sum(dtype=torch.float64)):  # norms are >= 0: an inf or a NaN cannot cancel out
            bad = []
            for _, _, n, parts, blame in log:
                if not torch.isfinite(n).all():
                    named = [self._name(p) for p, part in parts.items() if not torch.isfinite(part).all()]
                    bad += named or ([self._name(blame)] if blame is not None else [])
            self.reset()
            self.reset_statistics()  # a dropped batch must not reach later statistic releases
            raise NonFiniteGradientError(
                f"non-finite per-sample gradient norm in layer(s) {', '.join(dict.fromkeys(bad))} at step "
                f"{self.step_index}; the logical batch was dropped, no parameter changed and nothing was accounted"
            )
        if self.clipping == "automatic":
            return
        entry = torch.repeat_interleave(torch.arange(len(log)), torch.tensor([len(n) for _, _, n, _, _ in log]))
        limits = torch.tensor([c for _, c, _, _, _ in log], dtype=norms.dtype)[entry].to(norms.device)
        clipped = torch.zeros(len(log), device=norms.device).index_add_(0, entry.to(norms.device),
                                                                       (norms > limits).float())
        for (name, *_), k in zip(log, clipped.tolist()):
            self.clipped_count[name] += int(k)

    @staticmethod
    def _device_of(pending) -> torch.device:
        return device_of(next(iter(pending.values()))[0])

    def _plan_dense(self, pending, batch: int) -> tuple:
        """Parameters worth densifying (CPU only, most work saved per byte first) and the samples per chunk."""
        if batch == 0 or self._device_of(pending).type != "cpu":
            return {}, 0
        gains = {p: densify_gain(u, p.numel()) for p, u in pending.items()}
        chosen, per_sample = {}, 0  # an ordered set: `in` on a list would compare tensors
        for p in sorted((p for p in gains if gains[p] > 0), key=lambda p: -gains[p] / p.numel()):
            if 4 * (per_sample + p.numel()) <= DENSE_BUDGET_BYTES:
                chosen[p] = None
                per_sample += p.numel()
        return chosen, min(batch, DENSE_BUDGET_BYTES // max(1, 4 * per_sample))

    def _densify(self, dense, pending, sl: slice) -> Dict[nn.Parameter, torch.Tensor]:
        """Explicit per-sample gradients of the samples ``sl``, in one reused fp32 arena (a fresh multi-MB buffer
        every step costs page faults)."""
        b = sl.stop - sl.start
        arena = self._workspace(b * sum(p.numel() for p in dense))
        grads, start = {}, 0
        for p in dense:
            out = arena[start : start + b * p.numel()].view(b, *p.shape)
            grads[p] = densify([select_samples(c, sl) for c in pending[p]], out)
            start += b * p.numel()
        return grads

    def _workspace(self, numel: int) -> torch.Tensor:
        """The reused CPU fp32 buffer of the densified gradients, at least ``numel`` elements."""
        if self._arena is None or self._arena.numel() < numel:
            self._arena = None  # free the old one first
            self._arena = torch.empty(numel, dtype=torch.float32)
        return self._arena[:numel]

    def _name(self, p: nn.Parameter) -> str:
        """The parameter's name (FSDP2 hands the rules unsharded stand-ins: named by shape then)."""
        return self._param_names.get(p, f"of shape {tuple(p.shape)}")

    def _accumulate(self, p: nn.Parameter, uses: Sequence[Contribution], weights: torch.Tensor) -> None:
        """clipped_sum[p] += sum_i weights_i G_i (in place after the first)."""
        self.clipped_sum[p] = weighted_sum(uses, weights, p.shape, out=self.clipped_sum.get(p))

    def reset(self) -> None:
        """Forget everything accumulated (after the optimizer consumed it, or after an error)."""
        self.clipped_sum, self.unclipped_sum = {}, {}
        self._norm_log = []
        self._arrived_pass = None
        self._outstanding.clear()
        for g in self.groups:
            g.pending = {}

    def reset_statistics(self) -> None:
        self.num_samples = 0
        self.clipped_count = {g.name: 0 for g in self.groups}


def _total(parts, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of per-sample tensors without the extra op that ``sum()``'s integer start costs."""
    parts = iter(parts)
    total = next(parts) if start is None else start + next(parts)
    for part in parts:
        total = total + part
    return total


def _check_mode(name: str, module: nn.Module, args) -> None:
    guards.check_mixing(name, module)  # e.g. a frozen BatchNorm put back in train mode by model.train()


def _refuse_foreign_use(name: str):
    def hook(grad: torch.Tensor) -> None:
        if grad is None:  # autograd runs leaf hooks even when the Function returned no gradient
            return
        raise UnsupportedModuleError(
            f"parameter {name} received an ordinary gradient: it is used outside the module that owns it (e.g. "
            "through its .weight in a functional call), where dptrain cannot see its per-sample gradients. "
            "Use the module itself, or freeze the parameter."
        )

    return hook


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, found {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, found {value}")
    return float(value)


def _per_layer_thresholds(max_grad_norm, names: List[str]) -> List[float]:
    """Per-group thresholds: C / sqrt(L) for a scalar C (so the total sensitivity is C), or the user's list/dict."""
    if isinstance(max_grad_norm, Mapping):
        unknown = sorted(set(max_grad_norm) - set(names))
        missing = [n for n in names if n not in max_grad_norm]
        if unknown or missing:
            raise ValueError(
                f"per-layer max_grad_norm must have exactly the keys {names}; unknown {unknown}, missing {missing}"
            )
        return [_positive(max_grad_norm[n], f"max_grad_norm['{n}']") for n in names]
    if isinstance(max_grad_norm, (list, tuple)):
        if len(max_grad_norm) != len(names):
            raise ValueError(f"per-layer max_grad_norm needs {len(names)} values (layers {names}), found {len(max_grad_norm)}")
        return [_positive(c, f"max_grad_norm[{i}]") for i, c in enumerate(max_grad_norm)]
    total = _positive(max_grad_norm, "max_grad_norm")
    return [total / math.sqrt(len(names))] * len(names)
