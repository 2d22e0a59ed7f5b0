"""The DP optimizer: privatises the clipped gradient sum once per logical batch, then runs the inner optimizer.

    grad = (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / B_expected

Virtual steps: call ``step()`` after every micro-batch. Whether a micro-batch ends its logical batch is
told by the DP data loader (``signal_skip_step``), or explicitly by the user with ``accumulate()`` (clip
and accumulate, never step). Noise is drawn and the accountant stepped only at the logical-batch end.

A logical step: ``plan_step()`` builds the step's ``StepMechanism`` (``mechanism_hooks`` may return a changed
copy), ``pre_noise_hooks`` see it before any noise (error feedback rewrites the sums; a budget guard may
refuse the step), the noise is drawn from it, ``step_callbacks`` receive it (the ledger, statistic releases),
then the inner optimizer steps. Hooks are ``(optimizer, mechanism)`` callables.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, List, Optional

import torch

from dptrain import distributed
from dptrain.fsdp import FSDPView, as_sharded_grad
from dptrain.grad_sample.tracker import GradSampleTracker
from dptrain.mechanism import SAMPLING_SCHEMES, StepMechanism
from dptrain.noise import GaussianNoise
from dptrain.validation import check_choice, check_nonnegative

logger = logging.getLogger(__name__)

__all__ = ["DPOptimizer"]

StepHook = Callable[["DPOptimizer", StepMechanism], None]
MechanismHook = Callable[["DPOptimizer", StepMechanism], StepMechanism]


class DPOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that it only ever sees the privatised gradient."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tracker: GradSampleTracker,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        secure_mode: bool = False,
        insecure_noise_seed: Optional[int] = None,
    ):
        """``sample_rate``/``sampling``: how batches are drawn (see ``dptrain.mechanism``). The noise comes from
        OS entropy; ``insecure_noise_seed`` fixes it (NOT PRIVATE: tests and debugging only)."""
        check_choice("sampling", sampling, SAMPLING_SCHEMES)
        # no super().__init__: state and param groups are the inner optimizer's
        self.original_optimizer = optimizer
        self.tracker = tracker
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = float(expected_batch_size)
        self.sample_rate, self.sampling = float(sample_rate), sampling
        self.params: List[torch.nn.Parameter] = [p for g in optimizer.param_groups for p in g["params"]]
        rank = distributed.rank_and_world()[0]  # ranks never share noise
        self._noise = GaussianNoise(insecure_noise_seed, rank=rank, secure=secure_mode)
        self._skip_next = False
        self.steps_taken = 0  # logical steps
        self.mechanism_hooks: List[MechanismHook] = []
        self.pre_noise_hooks: List[StepHook] = []  # may rewrite tracker.clipped_sum (error feedback) or refuse
        self.step_callbacks: List[StepHook] = []  # after the noise, before the inner step
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()

    # the torch.optim.Optimizer surface, forwarded to the inner optimizer
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.original_optimizer.param_groups = groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def add_param_group(self, param_group):
        raise ValueError("add_param_group after make_private is not supported: create the optimizer with all parameters")

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.original_optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``.grad`` (the privatised gradient of the last step) as the inner optimizer does (which may keep
        state it holds in ``.grad``, see ``keeps_state_in_grad``); accumulated clipped sums stay."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"DPOptimizer(sigma={self.noise_multiplier}, C={self.tracker.total_max_norm:.4g}, inner={self.original_optimizer!r})"

    # ------------------------------------------------------------------ virtual steps
    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only accumulates (its micro-batch does not end the logical batch)."""
        self._skip_next = do_skip

    def accumulate(self) -> None:
        """Clip this micro-batch's per-sample gradients and add them to the logical batch's sum."""
        self.tracker.step_index = self.steps_taken
        self.tracker.flush()

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.accumulate()
        if self._skip_next:
            self._skip_next = False
            return loss
        mechanism = self.plan_step()
        self._privatise(mechanism)
        for callback in self.step_callbacks:
            callback(self, mechanism)
        self.original_optimizer.step()
        self.tracker.reset()
        self.steps_taken += 1
        return loss

    # ------------------------------------------------------------------ noise
    def plan_step(self) -> StepMechanism:
        """The mechanism of the next logical step: noise std sigma * C on the clipped sum, sensitivity C (2C
        for fixed batches: replace-one adjacency), changed by ``mechanism_hooks`` in order."""
        c = self.tracker.total_max_norm
        mechanism = StepMechanism(noise_std=self.noise_multiplier * c, sensitivity=2 * c if self.sampling == "fixed"
                                  else c, sample_rate=self.sample_rate, sampling=self.sampling)
        for hook in self.mechanism_hooks:
            mechanism = hook(self, mechanism)
        return mechanism

    def noise_std(self) -> float:
        """Std of the noise the next step adds to the clipped SUM (before dividing by the expected batch size)."""
        return self.plan_step().noise_std

    def release_noise(self, n: int, std: float) -> torch.Tensor:
        """n values of N(0, std^2), float64, from this optimizer's secret noise source (statistic releases)."""
        return self._noise.sample(n, std)

    def _privatise(self, mechanism: StepMechanism) -> None:
        """``.grad`` <- (clipped sum over ranks + noise of std ``mechanism.noise_std``) / B_expected.

        DDP or one process: each of the W ranks adds its share (std / sqrt(W)) to its full-size local sum, then
        the sums are all-reduced. FSDP2: the tracker holds this rank's shards of the sums (reduce-scattered as each
        micro-batch ended); each rank adds the FULL std to them (every coordinate is held by one rank: its noise
        is drawn exactly once)."""
        for hook in self.pre_noise_hooks:
            hook(self, mechanism)
        fsdp = self._fsdp_view()
        params = [p for p in self.params if p.requires_grad]
        world = distributed.rank_and_world()[1]
        sums = [self.tracker.clipped_sum.get(p) for p in params]  # FSDP2: this rank's shards, summed over ranks
        sums = [torch.zeros(p.to_local().shape if fsdp is not None else p.shape, dtype=torch.float32,
                            device=p.device) if s is None else s for p, s in zip(params, sums)]
        shares = 1 if fsdp is not None else world  # FSDP2: each coordinate's noise comes from the rank holding it
        # grad = sum / B + N(0, (std / B)^2), in place, with the division folded into the same pass
        std = mechanism.noise_std / shares**0.5 / self.expected_batch_size
        if std > 0:
            self._noise.add_([s for s in sums if s.numel()], std, scale=1.0 / self.expected_batch_size)
        else:
            sums = [s.div_(self.expected_batch_size) for s in sums]
        if fsdp is None and world > 1:
            sums = distributed.all_reduce_sum(sums)
        keeps_grad = getattr(self.original_optimizer, "keeps_state_in_grad", lambda p: False)
        for p, s in zip(params, sums):
            if p.grad is not None and keeps_grad(p):  # e.g. LDAdam's error feedback: public, added after the noise
                with torch.no_grad():
                    (p.grad.to_local() if fsdp is not None else p.grad).add_(s.to(p.dtype))  # FSDP2: the local shard
            else:
                p.grad = as_sharded_grad(s, p) if fsdp is not None else s.to(p.dtype)  # FSDP2: a DTensor shard

    def _fsdp_view(self):
        return self.tracker.model if isinstance(self.tracker.model, FSDPView) else None

    def noise_state_dict(self) -> dict:
        """SECRET: the keys and positions regenerate every later noise draw (empty in secure mode)."""
        return {"generators": self._noise.state_dict(), "steps_taken": self.steps_taken,
                "noise_multiplier": self.noise_multiplier}

    def load_noise_state_dict(self, state: dict) -> None:
        self._noise.load_state_dict(state["generators"])
        self.steps_taken = int(state["steps_taken"])
        self.noise_multiplier = check_nonnegative("checkpoint noise_multiplier", float(state["noise_multiplier"]))
