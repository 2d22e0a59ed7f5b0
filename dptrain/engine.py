"""``PrivacyEngine``: turns a model, optimizer and data loader into their DP-SGD counterparts.

The gradient convention (a promise): the user's loss is the MEAN of per-sample losses (``loss_reduction=
"mean"``; or their SUM with ``"sum"``), ``loss.backward()`` then ``optimizer.step()``. The update uses
``(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / B_expected`` with g_i the gradient of sample i's own loss and
``B_expected = sample_rate * len(dataset)`` (Poisson) or the loader's batch size.

Secrets: the noise and the Poisson sampler draw from OS entropy; their generator states (in ``state_dict()``)
are secret. ``secure_mode=True`` reseeds both from fresh OS entropy at every draw and saves no state of them.
``insecure_noise_seed``/``insecure_sampler_seed`` fix them for tests and debugging: such a run is NOT private.
Ledger: every logical step composes the event of the mechanism its noise was drawn from (``dptrain.mechanism``);
fixed batches (``poisson_sampling=False``) get no amplification: one full Gaussian step per epoch, replace-one.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from dptrain import distributed
from dptrain.accountants import calibrate_noise, make_accountant
from dptrain.fsdp import FSDPView
from dptrain.grad_sample.tracker import GradSampleTracker
from dptrain.independence import install_probe
from dptrain.mechanism import StepMechanism
from dptrain.optimizer import DPOptimizer
from dptrain.sampling import DPDataLoader, steps_per_epoch

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
        loss_reduction: str = "mean",
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
        ``error_feedback=True``: DiceSGD with feedback budget ``error_max_grad_norm`` (C2, per logical batch,
        default C2 = C1); ``error_feedback_accounting="worst_case"`` (the only bound offered, proven in
        ``dptrain.error_feedback``) records every step as a full-batch Gaussian with the noise multiplier, so
        ``target_epsilon`` calibrates it at sample rate 1, and the noise std on the sum is z * (C1 + 2 C2).
        ``poisson_sampling=False``: the loader's own fixed batches, accounted without amplification (each record
        in one batch per epoch, replace-one adjacency: sensitivity 2C); ``target_epsilon`` calibrates under that.
        ``insecure_noise_seed``/``insecure_sampler_seed``: fixed seeds for tests and debugging; the run is then
        NOT private (anyone with the seed can subtract the noise or recompute the batches).
        """
        given = self._check_arguments(module, optimizer, data_loader, insecure_noise_seed, insecure_sampler_seed,
                                      poisson_sampling, error_feedback, error_max_grad_norm,
                                      error_feedback_accounting, controller, target_epsilon)
        wrapped, module = module, distributed.unwrap_ddp(module)
        _check_optimizer_params(module, optimizer)
        rank, world = distributed.rank_and_world()
        dataset_size, batch_size, sample_rate = self._prepare_batching(data_loader, world, poisson_sampling)
        sampling = "poisson" if poisson_sampling else "fixed"
        total_steps = self._total_steps(epochs, steps)
        noise_multiplier = self._resolve_noise(noise_multiplier, target_epsilon, target_delta, total_steps,
                                               sample_rate, "full" if error_feedback else sampling)
        tracker = self._prepare_tracker(module, clipping, max_grad_norm, loss_reduction, automatic_gamma,
                                        error_feedback)
        _check_ranks_agree(world, wrapped is not module, dataset_size=dataset_size, batch_size=batch_size,
                           total_steps=total_steps or 0, noise_multiplier=noise_multiplier,
                           max_grad_norm=tracker.total_max_norm, poisson_sampling=poisson_sampling,
                           trainable_parameters=sum(p.numel() for p in tracker.params))
        self.optimizer = DPOptimizer(
            optimizer, tracker, noise_multiplier=noise_multiplier, expected_batch_size=batch_size,
            sample_rate=sample_rate, sampling=sampling, secure_mode=self.secure_mode,
            insecure_noise_seed=insecure_noise_seed,
        )
        self.data_loader = self._prepare_loader(data_loader, poisson_sampling, sample_rate, max_physical_batch_size,
                                                insecure_sampler_seed, rank, world)
        self.tracker, self.sample_rate, self.poisson_sampling, self.insecure_seeds = (
            tracker, sample_rate, poisson_sampling, given)
        if given:
            logger.warning("%s given: this run is NOT PRIVATE (the noise or the batches can be regenerated from "
                           "it); use it for tests and debugging only", " and ".join(given))
        self.optimizer.step_callbacks.append(self._account_step)
        self._prepare_plugins(error_feedback, error_max_grad_norm, error_feedback_accounting, poisson_sampling,
                              controller, target_epsilon, target_delta, total_steps)
        logger.info(
            "private training: sigma=%.4g, C=%.4g (%s), q=%.4g, expected batch %.1f",
            noise_multiplier, tracker.total_max_norm, clipping, sample_rate, batch_size,
        )
        return wrapped, self.optimizer, self.data_loader

    # ------------------------------------------------------------------ make_private, step by step
    def _check_arguments(self, module, optimizer, data_loader, insecure_noise_seed, insecure_sampler_seed,
                         poisson_sampling, error_feedback, error_max_grad_norm, error_feedback_accounting,
                         controller, target_epsilon) -> tuple:
        """Refuse bad or conflicting arguments; returns the names of the insecure seeds given."""
        if self.tracker is not None:
            raise ValueError("this PrivacyEngine already made a model private; create one engine per training run")
        for name, value, expected in (("module", module, nn.Module), ("optimizer", optimizer, torch.optim.Optimizer),
                                      ("data_loader", data_loader, DataLoader)):
            if not isinstance(value, expected):
                raise TypeError(f"{name} must be a {expected.__module__}.{expected.__qualname__}, "
                                f"found {type(value).__name__}")
        seeds = {"insecure_noise_seed": insecure_noise_seed, "insecure_sampler_seed": insecure_sampler_seed}
        for name, seed in seeds.items():
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise TypeError(f"{name} must be an integer or None, found {seed!r}")
        given = tuple(name for name, seed in seeds.items() if seed is not None)
        if self.secure_mode and given:
            raise ValueError(f"secure_mode draws fresh OS entropy for noise and sampling: do not pass {given[0]}")
        if not poisson_sampling and controller is not None:
            raise ValueError("a controller needs poisson_sampling=True: its budget plan and statistic releases "
                             "assume Poisson-sampled batches")
        if error_max_grad_norm is not None and not error_feedback:
            raise ValueError("error_max_grad_norm is only used with error_feedback=True")
        if error_feedback:
            from dptrain.error_feedback import check_accounting

            check_accounting(error_feedback_accounting)
            if controller is not None:
                raise ValueError(
                    "error_feedback=True cannot be combined with a controller: the controller plans its budget and "
                    "accounts its statistic releases as Poisson-subsampled Gaussians, while the error-feedback bound "
                    "gets no subsampling amplification for any release of the run (see dptrain.error_feedback)"
                )
        elif error_feedback_accounting != "worst_case":
            raise ValueError(
                f"error_feedback_accounting is only used with error_feedback=True, found {error_feedback_accounting!r}"
            )
        if controller is not None and target_epsilon is None:
            raise ValueError("a controller needs target_epsilon (and target_delta, epochs or steps): it plans within "
                             "that budget")
        return given

    def _prepare_batching(self, data_loader, world: int, poisson_sampling: bool) -> tuple:
        """(dataset size, expected logical batch over all ranks, sample rate); sets ``steps_per_epoch``."""
        dataset_size, batch_size = _dataset_and_batch_size(data_loader)
        batch_size *= world  # the loader's batch size is per rank; the logical batch spans all ranks
        if batch_size > dataset_size:
            raise ValueError(
                f"batch size {batch_size} (per rank x {world} rank(s)) is larger than the dataset ({dataset_size} samples)"
            )
        sample_rate = batch_size / dataset_size
        self.steps_per_epoch = steps_per_epoch(dataset_size, batch_size) if poisson_sampling else len(data_loader)
        if not poisson_sampling:
            logger.warning(
                "poisson_sampling=False: fixed batches get no privacy amplification by subsampling; each epoch is "
                "accounted as one full-batch Gaussian step at sensitivity 2C (replace-one adjacency), which needs "
                "far more noise than Poisson sampling for the same epsilon"
            )
        return dataset_size, batch_size, sample_rate

    def _total_steps(self, epochs, steps) -> Optional[int]:
        """The run's planned logical steps from ``epochs`` or ``steps`` (None if neither is given)."""
        if epochs is not None and steps is not None:
            raise ValueError(f"give epochs or steps, not both (found epochs={epochs!r}, steps={steps!r})")
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
                raise ValueError(f"steps must be a positive integer, found {steps!r}")
            return steps
        if epochs is None:
            return None
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"epochs must be a number > 0, found {epochs!r}")
        return math.ceil(epochs * self.steps_per_epoch)

    def _resolve_noise(self, noise_multiplier, target_epsilon, target_delta, total_steps, sample_rate, sampling):
        """The noise multiplier: given, or calibrated to the target for ``sampling`` ("poisson", "fixed", or
        "full": every step a full-batch Gaussian, as error feedback's bound accounts it)."""
        if noise_multiplier is not None:
            if target_epsilon is not None:
                raise ValueError("give either noise_multiplier or target_epsilon, not both")
            if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
                math.isfinite(noise_multiplier) and noise_multiplier >= 0
            ):
                raise ValueError(f"noise_multiplier must be a finite number >= 0, found {noise_multiplier!r}")
            if noise_multiplier == 0:
                logger.warning("noise_multiplier=0: training is NOT private (epsilon = inf)")
            return float(noise_multiplier)
        if target_epsilon is None:
            raise ValueError("give noise_multiplier, or target_epsilon with target_delta and epochs (or steps)")
        if target_delta is None or total_steps is None:
            raise ValueError(
                f"target_epsilon needs target_delta and epochs or steps to calibrate the noise, found "
                f"target_delta={target_delta!r} and no epochs or steps" if total_steps is None else
                f"target_epsilon needs target_delta to calibrate the noise, found target_delta={target_delta!r}"
            )
        if sampling == "fixed":  # one charged step per (started) epoch, at multiplier sigma / 2 (sensitivity 2C)
            charged = math.ceil(total_steps / self.steps_per_epoch)
            return 2 * calibrate_noise(target_epsilon=target_epsilon, sample_rate=1.0, steps=charged,
                                       delta=target_delta, accountant=self.accountant_name)
        return calibrate_noise(target_epsilon=target_epsilon, sample_rate=sample_rate if sampling == "poisson" else 1.0,
                               steps=total_steps, delta=target_delta, accountant=self.accountant_name)

    def _prepare_tracker(self, module, clipping, max_grad_norm, loss_reduction, automatic_gamma,
                         error_feedback) -> GradSampleTracker:
        tracker = GradSampleTracker(
            module, clipping=clipping, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
            automatic_gamma=automatic_gamma, track_unclipped=error_feedback,
        )
        if not isinstance(tracker.model, FSDPView):  # FSDP2 forwards cannot be re-entered from a hook
            install_probe(tracker.model, lambda: tracker.batch_size, tracker.capture_disabled, tracker=tracker)
        return tracker

    def _prepare_loader(self, data_loader, poisson_sampling, sample_rate, max_physical_batch_size,
                        insecure_sampler_seed, rank, world) -> DPDataLoader:
        generator = None
        if insecure_sampler_seed is not None:  # ranks sample their shards independently
            generator = torch.Generator().manual_seed(insecure_sampler_seed + 1_000_003 * rank)
        loader = DPDataLoader(
            data_loader, poisson_sampling=poisson_sampling, sample_rate=sample_rate, generator=generator,
            max_physical_batch_size=max_physical_batch_size, shard=(rank, world), secure=self.secure_mode,
            steps=self.steps_per_epoch if poisson_sampling else None,
        )
        loader.optimizer = self.optimizer
        return loader

    def _prepare_plugins(self, error_feedback, error_max_grad_norm, error_feedback_accounting, poisson_sampling,
                         controller, target_epsilon, target_delta, total_steps) -> None:
        """Error feedback and the controller hook into the optimizer's step mechanism."""
        self.error_feedback = None
        if error_feedback:
            from dptrain.error_feedback import ErrorFeedback

            self.error_feedback = ErrorFeedback(
                self.optimizer, error_max_grad_norm=error_max_grad_norm, poisson_sampling=poisson_sampling,
                accounting=error_feedback_accounting,
            )
        self.controller = controller
        if controller is not None:
            controller.attach(self, target_epsilon=target_epsilon, target_delta=target_delta, total_steps=total_steps)

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
            "entropy": "fresh OS entropy per draw, no state saved" if self.secure_mode else
                       ("fixed insecure seed" if self.insecure_seeds else "OS entropy; generator states are secret"),
            "sampling": "poisson" if self.poisson_sampling else "fixed batches (no amplification)",
            "adjacency": "replace one record" if sampling == "fixed" else "add or remove one record",
            "error_feedback": self.error_feedback is not None,
            "ranks_trusted": distributed.rank_and_world()[1] > 1,
        }

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``."""
        return self.accountant.get_epsilon(delta)

    def state_dict(self) -> dict:
        """Accountant ledger, sampler RNG, noise RNG and step counters (the model and optimizer are the user's)."""
        if self.optimizer is None:
            raise ValueError("state_dict() before make_private(): nothing to save")
        return {  # SECRET unless secure_mode: the sampler and noise generator states
            "accountant_name": self.accountant_name,
            "secure_mode": self.secure_mode,
            "epoch_charge": self._epoch_charge,
            "accountant": self.accountant.state_dict(),
            "sampler": self.data_loader.state_dict(),
            "noise": self.optimizer.noise_state_dict(),
            "max_grad_norms": [g.max_norm for g in self.tracker.groups],
            "error_feedback": None if self.error_feedback is None else self.error_feedback.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is None:
            raise ValueError("load_state_dict() needs make_private() first, with the same model and settings")
        if state.get("accountant_name") != self.accountant_name:
            raise ValueError(
                f"checkpoint uses accountant {state.get('accountant_name')!r}, this engine {self.accountant_name!r}"
            )
        if len(state["max_grad_norms"]) != len(self.tracker.groups):
            raise ValueError(
                f"checkpoint has {len(state['max_grad_norms'])} clipping groups, this model {len(self.tracker.groups)}"
            )
        if bool(state.get("secure_mode")) != self.secure_mode:
            raise ValueError(f"checkpoint was written with secure_mode={bool(state.get('secure_mode'))}, this engine "
                             f"has secure_mode={self.secure_mode}: resume with the same setting")
        self.accountant.load_state_dict(state["accountant"])
        self._epoch_charge = state.get("epoch_charge")
        self.data_loader.load_state_dict(state["sampler"])
        self.optimizer.load_noise_state_dict(state["noise"])
        self.tracker.set_max_norms(state["max_grad_norms"])
        for name, part in (("error_feedback", self.error_feedback), ("controller", self.controller)):
            if (state.get(name) is None) != (part is None):
                raise ValueError(f"checkpoint and this run disagree on {name}: saved {state.get(name) is not None}, "
                                 f"now {part is not None}")
            if part is not None:
                part.load_state_dict(state[name])


def _check_ranks_agree(world: int, ddp_wrapped: bool, **settings) -> None:
    """Every rank must run the same private training: refuse a mismatch, and several ranks without DDP."""
    distributed.check_consistent({"world_size": world, "ddp_wrapped": ddp_wrapped, **settings})
    if world > 1 and not ddp_wrapped:
        raise ValueError("torch.distributed is initialised with several ranks but the model is not wrapped in "
                         "DistributedDataParallel; wrap it (same on every rank) before make_private")


def _check_optimizer_params(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_params = {id(p) for p in module.parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    foreign = [tuple(p.shape) for p in params if id(p) not in model_params]
    if foreign:
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not in the model (shapes {foreign[:5]}); "
            "build the optimizer from model.parameters()"
        )
    if not any(p.requires_grad for p in params):
        raise ValueError("the optimizer has no trainable parameter (requires_grad=True)")


def _dataset_and_batch_size(data_loader: DataLoader) -> tuple:
    try:
        dataset_size = len(data_loader.dataset)
    except TypeError:
        raise TypeError("the data loader's dataset needs __len__ (map-style dataset) for DP sampling") from None
    if dataset_size == 0:
        raise ValueError("the data loader's dataset is empty")
    batch_size = data_loader.batch_size
    if batch_size is None:
        raise ValueError("the data loader needs a batch_size (the expected logical batch size), found None")
    return dataset_size, batch_size
