"""Per-sample clipping inside ONE backward pass.

The tracker attaches a rule to every module that owns trainable parameters, groups the parameters into
clipping groups (one group for flat/automatic clipping, one per module for per-layer clipping; modules
that share a parameter are merged), and collects per-sample gradient contributions as backward reaches
each module. With per-layer clipping a group is processed as soon as every recorded call of its modules has
reported back, during backward, so the saved tensors are freed early; everything else at ``flush()``
(called by the optimizer's step). Processing (``clipping``) computes per-sample norms, clip factors and the
clipped sums and adds them to ``clipped_sum``. Nothing non-private leaves the tracker except through the DP
optimizer. With a ``sum_sink`` (FSDP2) the clipped sums are built at every ``flush()`` by the sink, which
reduce-scatters them into this rank's shards in ``clipped_sum`` (see ``Clipper``'s ``defer_sums``).

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
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from dptrain.grad_sample import guards
from dptrain.grad_sample.attachment import RuleAttachment
from dptrain.grad_sample.clipping import Clipper
from dptrain.grad_sample.contributions import Contribution
from dptrain.grad_sample.grouping import CLIPPING_MODES, ClipGroup, build_groups, set_max_norms
from dptrain.grad_sample.registry import UnsupportedModuleError
from dptrain.grad_sample.routes import RoutePlanner
from dptrain.grad_sample.statistics import NonFiniteGradientError, NormLog
from dptrain.losses import check_model_call
from dptrain.validation import check_choice, check_positive

__all__ = ["GradSampleTracker", "ClipGroup", "NonFiniteGradientError", "MergedPassesError", "CLIPPING_MODES"]


class MergedPassesError(ValueError):
    """Gradients of two captured forward passes of the model would be clipped as one sample per index."""


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing re-running a forward)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class GradSampleTracker:
    """Attaches per-sample rules to ``model`` and accumulates clipped per-sample gradient sums; follows the
    captured passes (which forward pass a backward belongs to, when a group is complete) and hands the rest to
    ``RuleAttachment``, ``build_groups``, ``RoutePlanner`` (pass one to configure it), ``Clipper`` and ``NormLog``."""

    def __init__(self, model: nn.Module, *, clipping: str,
                 max_grad_norm: Union[float, Sequence[float], Mapping[str, float]], loss_reduction: str = "sum",
                 automatic_gamma: float = 0.01, track_unclipped: bool = False, planner: Optional[RoutePlanner] = None,
                 sum_sink: Optional[Callable[[Clipper], None]] = None):
        _check_settings(clipping, loss_reduction, automatic_gamma)
        self.model = model
        self.clipping = clipping
        self.batch_size: Optional[int] = None  # of the current forward pass
        self.step_index = 0  # set by the optimizer, for error messages
        self._enabled = True
        self._outstanding: Dict[nn.Module, int] = {}  # recorded calls whose backward has not arrived yet
        self._buffers_before: Optional[list] = None  # buffer_state at the start of a captured forward
        self._attachment = RuleAttachment(model, self)
        root = self._attachment.root
        self._attachment.add_hook(root.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._attachment.add_hook(root.register_forward_hook(self._after_forward))
        self._attachment.add_hook(check_model_call(root))  # warns once about Hugging Face's labels= batch loss
        self.groups = build_groups(clipping, self._attachment.module_names, max_grad_norm)
        self._group_of = {m: g for g in self.groups for m in g.modules}
        self.params = [p for g in self.groups for p in g.params]
        self.norm_log = NormLog([g.name for g in self.groups], count_clipped=clipping != "automatic")
        self.sum_sink = sum_sink  # called at every flush with the clipper, whose sums it takes
        self.clipper = Clipper(clipping, loss_reduction, automatic_gamma, track_unclipped, planner, self.norm_log,
                               defer_sums=sum_sink is not None)
        self._arrived_batch = 0
        self._pass = 0  # captured forward passes of the model so far: tags every recorded call (see record_call)
        self._arrived_pass: Optional[int] = None  # the pass whose gradients arrived since the last flush
        self._isolated = False  # inside isolated_contributions(): a probe's passes, kept apart from training

    # ------------------------------------------------------------------ results (private: released only noised)
    @property
    def clipped_sum(self) -> Dict[nn.Parameter, torch.Tensor]:
        return self.clipper.clipped_sum

    @property
    def unclipped_sum(self) -> Dict[nn.Parameter, torch.Tensor]:
        return self.clipper.unclipped_sum

    @property
    def track_unclipped(self) -> bool:
        return self.clipper.track_unclipped

    @property
    def num_samples(self) -> int:
        """Samples processed since the last statistics reset."""
        return self.norm_log.num_samples

    @property
    def clipped_count(self) -> Dict[str, int]:
        """Clipped samples per group since the last statistics reset."""
        return self.norm_log.clipped_count

    @property
    def total_max_norm(self) -> float:
        """Sensitivity of the clipped sum to one sample: sqrt(sum_g C_g^2)."""
        return math.sqrt(sum(g.max_norm**2 for g in self.groups))

    def set_max_norms(self, norms: Sequence[float]) -> None:
        """New per-group thresholds (the controller's action)."""
        set_max_norms(self.groups, norms)

    def detach(self) -> None:
        """Remove every hook and restore the modules' own forward."""
        self._attachment.detach()

    # ------------------------------------------------------------------ capture
    def _before_forward(self, module, args, kwargs):
        if not self._enabled:  # e.g. the fallback re-running a root module that owns parameters, per sample
            return
        first = next((v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        self.batch_size = None if first is None else first.shape[0]
        self._buffers_before = guards.buffer_state(self._attachment.all_modules) if self.should_capture() else None
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
            guards.check_buffers(before, guards.buffer_state(self._attachment.all_modules))

    def module_name(self, module: nn.Module) -> str:
        return self._attachment.module_names.get(module, type(module).__name__)

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
        _check_batch_first(self.module_name(module), batch, self.batch_size)
        self._arrived_batch = batch
        self._outstanding[module] -= 1
        if batch == 0:  # an empty micro-batch (Poisson; FSDP2 runs it on every rank): no sample, no contribution
            return
        contributions = self._attachment.rules[module].contributions(module, saved, grad_output)
        _check_own_parameters(self.module_name(module), module, contributions)
        group = self._group_of[module]
        for p, c in contributions.items():
            group.pending.setdefault(p, []).append(c)
        # per-layer: a group is final once all its recorded calls reported back (frees its tensors early).
        # Flat clipping waits for flush(): with activation checkpointing, later segments are not recorded yet.
        if (self.clipping == "per_layer" and not self._isolated
                and all(self._outstanding.get(m, 0) == 0 for m in group.modules)):
            self.clipper.process([group])

    def _refuse_merge(self, what: str) -> None:
        """Drop the logical batch (its sums may already hold merged samples) and refuse, in one line."""
        self._drop_batch()
        raise MergedPassesError(
            f"{what} with no optimizer.step() or optimizer.accumulate() in between (step {self.step_index}): "
            + _MERGE_ADVICE
        )

    def flush(self) -> None:
        """Process whatever contributions are still pending and check the norms (end of a micro-batch)."""
        self._arrived_pass = None
        self.clipper.process(self.groups)
        self._outstanding.clear()
        self.norm_log.check(self.parameter_name, self._drop_batch, self.step_index)
        self.norm_log.num_samples += self._arrived_batch
        self._arrived_batch = 0
        if self.sum_sink is not None:
            self.sum_sink(self.clipper)

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

    def _drop_batch(self) -> None:
        """Forget the logical batch and its statistics (a dropped batch must not reach later statistic releases)."""
        self.reset()
        self.reset_statistics()

    def parameter_name(self, p: nn.Parameter) -> str:
        """The parameter's name (FSDP2 hands the rules unsharded stand-ins: named by shape then)."""
        return self._attachment.param_names.get(p, f"of shape {tuple(p.shape)}")

    def reset(self) -> None:
        """Forget everything accumulated (after the optimizer consumed it, or after an error)."""
        self.clipper.reset()
        self.norm_log.entries = []
        self._arrived_pass = None
        self._outstanding.clear()
        for g in self.groups:
            g.pending = {}

    def reset_statistics(self) -> None:
        self.norm_log.reset_statistics()


def _check_settings(clipping: str, loss_reduction: str, automatic_gamma: float) -> None:
    check_choice("clipping", clipping, CLIPPING_MODES)
    check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
    check_positive("automatic_gamma", automatic_gamma)


_MERGE_ADVICE = (
    "several forward/backward passes before one step merge sample i of every pass into one clipped sample, so the "
    "noise no longer covers one record (this logical batch was dropped); for gradient accumulation pass "
    "max_physical_batch_size to make_private or call optimizer.accumulate() after each backward, and run forward "
    "passes you do not train on under torch.no_grad() or engine.tracker.capture_disabled()"
)


def _check_batch_first(name: str, batch: int, expected: Optional[int]) -> None:
    if expected is not None and batch != expected:
        raise UnsupportedModuleError(
            f"module '{name}': gradient batch dimension {batch} differs from the batch size {expected}; dptrain "
            "needs batch-first tensors in every layer (a layer run on a sequence-first (T, B, ...) tensor inside the "
            "model is one cause)"
        )


def _check_own_parameters(name: str, module: nn.Module, contributions) -> None:
    """Every contribution must belong to one of the module's own parameters."""
    own = list(module._parameters.values())
    if not all(any(p is q for q in own) for p in contributions):  # identity: `in` would compare values
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}) computes a weight from its parameters in a hook (e.g. "
            "torch.nn.utils.weight_norm or spectral_norm), so the per-sample gradient of that weight belongs to no "
            "parameter; remove the reparametrization or freeze the module"
        )
