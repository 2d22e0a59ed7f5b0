"""``PrivacyEngine``: turns a model, optimizer and data loader into their DP-SGD counterparts.

The gradient convention (a promise): the user's loss is the SUM of per-sample losses (``loss_reduction="sum"``;
their MEAN over a fixed batch with ``"mean"``), ``loss.backward()`` then ``optimizer.step()``. The update uses
``(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / B_expected`` with g_i the gradient of sample i's own loss and
``B_expected = sample_rate * len(dataset)`` (Poisson) or the loader's batch size.

Secrets: the noise and the Poisson sampler read AES-256-CTR keystreams (``dptrain.secure_random``) under keys from
OS entropy; their keys and positions (in ``state_dict()``) are secret. ``secure_mode=True`` takes a fresh key at
every draw instead and saves no state of them.
``insecure_noise_seed``/``insecure_sampler_seed`` fix them for tests and debugging: such a run is NOT private.
Ledger: every logical step composes the event of the mechanism its noise was drawn from (``dptrain.mechanism``);
fixed batches (``poisson_sampling=False``) get no amplification: one full Gaussian step per epoch, replace-one.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from dptrain import distributed
from dptrain.accountants import make_accountant
from dptrain.engine_checkpoint import engine_state, restore_engine_state
from dptrain.engine_setup import (
    Batching,
    MakePrivateArgs,
    check_arguments,
    check_optimizer_params,
    check_ranks_agree,
    plan_batching,
    resolve_noise,
    total_steps,
)
from dptrain.fsdp import FSDPView
from dptrain.grad_sample.tracker import GradSampleTracker
from dptrain.independence import install_probe
from dptrain.mechanism import StepMechanism
from dptrain.optimizer import DPOptimizer
from dptrain.sampling import DPDataLoader

logger = logging.getLogger(__name__)

__all__ = ["PrivacyEngine"]


class PrivacyEngine:
    """Makes training private and keeps the privacy ledger of the run."""

    def __init__(self, accountant: str = "rdp", secure_mode: bool = False):
        self.accountant_name = accountant
        self.accountant = make_accountant(accountant)
        self.secure_mode = bool(secure_mode)
        self.tracker: Optional[GradSampleTracker] = None
        self.optimizer: Optional[DPOptimizer] = None
        self.data_loader: Optional[DPDataLoader] = None
        self.sample_rate: Optional[float] = None
        self.steps_per_epoch: Optional[int] = None
        self.poisson_sampling: Optional[bool] = None
        self.error_feedback = None  # dptrain.error_feedback.ErrorFeedback when enabled
        self.controller = None
        self.insecure_seeds: tuple = ()  # names of the insecure seeds this run was given
        self._epoch_charge: Optional[float] = None  # fixed batches: smallest multiplier charged this epoch

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        max_grad_norm: Union[float, Sequence[float], Mapping[str, float]],
        noise_multiplier: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        target_delta: Optional[float] = None,
        epochs: Optional[float] = None,
        steps: Optional[int] = None,
        clipping: str = "flat",
        poisson_sampling: bool = True,
        max_physical_batch_size: Optional[int] = None,
        loss_reduction: str = "sum",
        automatic_gamma: float = 0.01,
        insecure_noise_seed: Optional[int] = None,
        insecure_sampler_seed: Optional[int] = None,
        error_feedback: bool = False,
        error_max_grad_norm: Optional[float] = None,
        error_feedback_accounting: str = "worst_case",
        controller=None,
    ):
        """Returns ``(module, optimizer, data_loader)``; the module is changed in place.

        ``max_grad_norm``: the clipping threshold C (flat), or for ``clipping="per_layer"`` the total C (each
        of the L layers gets C/sqrt(L)) or one threshold per layer (list in module order, or dict by layer name).
        Give ``noise_multiplier``, or ``target_epsilon`` + ``target_delta`` + the length of the run (``epochs``,
        i.e. ceil(epochs * steps per epoch) logical steps, or ``steps``) to calibrate it.
        ``error_feedback=True``: DiceSGD with feedback budget ``error_max_grad_norm`` (C2, default C1), accounted
        as a full-batch Gaussian per step (docs/error_feedback.md); noise std on the sum z * (C1 + 2 C2).
        ``loss_reduction="mean"`` needs fixed batches: a mean over a Poisson batch divides every sample's gradient
        by the realized batch size, whose rounding then depends on who else is in the batch.
        ``poisson_sampling=False``: the loader's own fixed batches, accounted without amplification (each record
        in one batch per epoch, replace-one adjacency: sensitivity 2C); ``target_epsilon`` calibrates under that.
        ``insecure_noise_seed``/``insecure_sampler_seed``: fixed seeds for tests and debugging; NOT private.
        """
        args = MakePrivateArgs(**{k: v for k, v in locals().items() if k != "self"})  # first: only the arguments
        if self.tracker is not None:
            raise ValueError("this PrivacyEngine already made a model private; create one engine per training run")
        check_arguments(args, self.secure_mode)
        module = distributed.tracked_module(args.module)
        check_optimizer_params(module, optimizer)
        rank, world = distributed.rank_and_world()
        batching = plan_batching(data_loader, world, poisson_sampling)
        planned = total_steps(epochs, steps, batching.steps_per_epoch)
        noise = resolve_noise(args, planned, batching, self.accountant_name)
        tracker = self._prepare_tracker(module, args)
        check_ranks_agree(world, module is not args.module, batching, planned, noise, tracker, poisson_sampling)
        self.tracker, self.steps_per_epoch, self.sample_rate, self.poisson_sampling = (
            tracker, batching.steps_per_epoch, batching.sample_rate, poisson_sampling)
        self.optimizer = self._prepare_optimizer(args, noise, batching)
        self.data_loader = self._prepare_loader(args, rank, world)
        self._prepare_plugins(args, planned)
        logger.info("private training: sigma=%.4g, C=%.4g (%s), q=%.4g, expected batch %.1f",
                    noise, tracker.total_max_norm, clipping, batching.sample_rate, batching.batch_size)
        return args.module, self.optimizer, self.data_loader

    # ------------------------------------------------------------------ make_private, step by step
    def _prepare_tracker(self, module: nn.Module, args: MakePrivateArgs) -> GradSampleTracker:
        sharded = isinstance(module, FSDPView)
        if sharded and args.error_feedback:
            raise ValueError("error feedback is not supported with FSDP2 models yet; use DDP or turn it off")
        tracker = GradSampleTracker(
            module, clipping=args.clipping, max_grad_norm=args.max_grad_norm, loss_reduction=args.loss_reduction,
            automatic_gamma=args.automatic_gamma, track_unclipped=args.error_feedback,
            sum_sink=module.scatter_sums if sharded else None,  # FSDP2: sums reduce-scattered per micro-batch
        )
        if not sharded:  # FSDP2 forwards cannot be re-entered from a hook
            install_probe(tracker.model, lambda: tracker.batch_size, tracker.capture_disabled, tracker=tracker)
        return tracker

    def _prepare_optimizer(self, args: MakePrivateArgs, noise: float, batching: Batching) -> DPOptimizer:
        return DPOptimizer(args.optimizer, self.tracker, noise_multiplier=noise, sample_rate=batching.sample_rate,
                           expected_batch_size=batching.batch_size, sampling=args.sampling,
                           secure_mode=self.secure_mode, insecure_noise_seed=args.insecure_noise_seed)

    def _prepare_loader(self, args: MakePrivateArgs, rank: int, world: int) -> DPDataLoader:
        seed = args.insecure_sampler_seed
        loader = DPDataLoader(  # ranks sample their shards independently
            args.data_loader, poisson_sampling=args.poisson_sampling, sample_rate=self.sample_rate,
            insecure_seed=None if seed is None else seed + 1_000_003 * rank,
            max_physical_batch_size=args.max_physical_batch_size, shard=(rank, world),
            secure=self.secure_mode, steps=self.steps_per_epoch if args.poisson_sampling else None,
            same_pieces_on_every_rank=isinstance(self.tracker.model, FSDPView),
        )
        loader.optimizer = self.optimizer
        return loader

    def _prepare_plugins(self, args: MakePrivateArgs, planned_steps: Optional[int]) -> None:
        """The ledger, the insecure-seed warning, error feedback and the controller hook into the step."""
        self.insecure_seeds = args.insecure_seeds
        if self.insecure_seeds:
            logger.warning("%s given: this run is NOT PRIVATE (the noise or the batches can be regenerated from "
                           "it); use it for tests and debugging only", " and ".join(self.insecure_seeds))
        self.optimizer.step_callbacks.append(self._account_step)
        self.error_feedback = None
        if args.error_feedback:
            from dptrain.error_feedback import ErrorFeedback

            self.error_feedback = ErrorFeedback(
                self.optimizer, error_max_grad_norm=args.error_max_grad_norm, poisson_sampling=args.poisson_sampling,
                accounting=args.error_feedback_accounting,
            )
        self.controller = args.controller
        if args.controller is not None:
            args.controller.attach(self, target_epsilon=args.target_epsilon, target_delta=args.target_delta,
                                   total_steps=planned_steps)

    def _account_step(self, optimizer: DPOptimizer, mechanism: StepMechanism) -> None:
        """Ledger the step's mechanism. Fixed batches: a record is in one batch per epoch, so the epoch's first
        step is charged, and a later step of the epoch only if its noise is smaller than what was charged."""
        if mechanism.sampling == "fixed":
            multiplier = mechanism.noise_multiplier
            if optimizer.steps_taken % self.steps_per_epoch == 0:
                self._epoch_charge = None
            if self._epoch_charge is not None and multiplier >= self._epoch_charge:
                return
            self._epoch_charge = multiplier
        self.accountant.compose(mechanism.event())

    def trust_model(self) -> dict:
        """What this run's guarantee rests on (public facts, for reports)."""
        if self.optimizer is None:
            raise ValueError("trust_model() before make_private(): nothing to describe")
        sampling = self.optimizer.sampling
        return {
            "private": not self.insecure_seeds and self.optimizer.noise_multiplier > 0,
            "secure_mode": self.secure_mode,
            "noise_seed_given": "insecure_noise_seed" in self.insecure_seeds,
            "sampler_seed_given": "insecure_sampler_seed" in self.insecure_seeds,
            "entropy": "AES-256-CTR under a fresh OS-entropy key per draw, no state saved" if self.secure_mode else
                       ("fixed insecure seed" if self.insecure_seeds else "OS entropy; keys are secret"),
            "sampling": "poisson" if self.poisson_sampling else "fixed batches (no amplification)",
            "adjacency": "replace one record" if sampling == "fixed" else "add or remove one record",
            "error_feedback": self.error_feedback is not None,
            "ranks_trusted": distributed.rank_and_world()[1] > 1,
        }

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``."""
        return self.accountant.get_epsilon(delta)

    def state_dict(self) -> dict:
        """Accountant ledger, sampler RNG, noise RNG and step counters (the model and optimizer are the user's);
        SECRET unless ``secure_mode`` (``dptrain.engine_checkpoint``)."""
        return engine_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` after ``make_private`` with the same model and settings."""
        restore_engine_state(self, state)
