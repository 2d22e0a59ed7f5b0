"""What ``PrivacyEngine.make_private`` decides before it wires anything: its arguments checked, the batching
(dataset size, expected logical batch, sample rate, steps per epoch), the run's length and the noise multiplier.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from dptrain import distributed
from dptrain.accountants import calibrate_noise
from dptrain.sampling import steps_per_epoch
from dptrain.sampling_rate import realizable_rate
from dptrain.validation import check_nonnegative, check_optional_int, check_positive, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["MakePrivateArgs", "Batching", "check_arguments", "plan_batching", "total_steps", "resolve_noise",
           "check_ranks_agree", "check_optimizer_params"]


@dataclass(frozen=True)
class MakePrivateArgs:
    """``make_private``'s arguments, as given (see its docstring)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    max_grad_norm: Union[float, Sequence[float], Mapping[str, float]]
    noise_multiplier: Optional[float]
    target_epsilon: Optional[float]
    target_delta: Optional[float]
    epochs: Optional[float]
    steps: Optional[int]
    clipping: str
    poisson_sampling: bool
    max_physical_batch_size: Optional[int]
    loss_reduction: str
    automatic_gamma: float
    insecure_noise_seed: Optional[int]
    insecure_sampler_seed: Optional[int]
    error_feedback: bool
    error_max_grad_norm: Optional[float]
    error_feedback_accounting: str
    controller: Any

    @property
    def sampling(self) -> str:
        return "poisson" if self.poisson_sampling else "fixed"

    @property
    def insecure_seeds(self) -> tuple:
        """The names of the insecure seeds given."""
        return tuple(n for n in ("insecure_noise_seed", "insecure_sampler_seed") if getattr(self, n) is not None)


class Batching(NamedTuple):
    dataset_size: int
    batch_size: int  # expected logical batch, over all ranks
    sample_rate: float
    steps_per_epoch: int


MEAN_OVER_POISSON = (
    "loss_reduction='mean' with poisson_sampling=True: a mean over a Poisson batch divides every sample's gradient "
    "by the realized batch size, so adding or removing one sample re-rounds all the others (docs/architecture.md, "
    "Precision of the private sums); backprop the SUM of per-sample losses with loss_reduction='sum'")


def check_arguments(args: MakePrivateArgs, secure_mode: bool) -> None:
    """Refuse bad or conflicting arguments, in one line each."""
    for name, expected in (("module", nn.Module), ("optimizer", torch.optim.Optimizer), ("data_loader", DataLoader)):
        if not isinstance(getattr(args, name), expected):
            raise TypeError(f"{name} must be a {expected.__module__}.{expected.__qualname__}, "
                            f"found {type(getattr(args, name)).__name__}")
    for name in ("insecure_noise_seed", "insecure_sampler_seed"):
        check_optional_int(name, getattr(args, name))
    if secure_mode and args.insecure_seeds:
        raise ValueError(f"secure_mode draws fresh OS entropy for noise and sampling: do not pass {args.insecure_seeds[0]}")
    if args.loss_reduction == "mean" and args.poisson_sampling:
        raise ValueError(MEAN_OVER_POISSON)
    if args.error_max_grad_norm is not None and not args.error_feedback:
        raise ValueError("error_max_grad_norm is only used with error_feedback=True")
    if args.error_feedback:
        from dptrain.error_feedback import check_accounting

        check_accounting(args.error_feedback_accounting)
    elif args.error_feedback_accounting != "worst_case":
        raise ValueError(
            f"error_feedback_accounting is only used with error_feedback=True, found {args.error_feedback_accounting!r}"
        )
    if args.controller is not None:
        _check_controller(args)


def _check_controller(args: MakePrivateArgs) -> None:
    if not args.poisson_sampling:
        raise ValueError("a controller needs poisson_sampling=True: its budget plan and statistic releases "
                         "assume Poisson-sampled batches")
    if args.error_feedback:
        raise ValueError(
            "error_feedback=True cannot be combined with a controller: the controller plans its budget and "
            "accounts its statistic releases as Poisson-subsampled Gaussians, while the error-feedback bound "
            "gets no subsampling amplification for any release of the run (see dptrain.error_feedback)"
        )
    if args.target_epsilon is None:
        raise ValueError("a controller needs target_epsilon (and target_delta, epochs or steps): it plans within "
                         "that budget")


def plan_batching(data_loader: DataLoader, world: int, poisson_sampling: bool) -> Batching:
    dataset_size, batch_size = _dataset_and_batch_size(data_loader)
    batch_size *= world  # the loader's batch size is per rank; the logical batch spans all ranks
    if batch_size > dataset_size:
        raise ValueError(
            f"batch size {batch_size} (per rank x {world} rank(s)) is larger than the dataset ({dataset_size} samples)"
        )
    if not poisson_sampling:
        logger.warning(
            "poisson_sampling=False: fixed batches get no privacy amplification by subsampling; each epoch is "
            "accounted as one full-batch Gaussian step at sensitivity 2C (replace-one adjacency), which needs "
            "far more noise than Poisson sampling for the same epsilon"
        )
    per_epoch = steps_per_epoch(dataset_size, batch_size) if poisson_sampling else len(data_loader)
    return Batching(dataset_size, batch_size, realizable_rate(batch_size / dataset_size), per_epoch)


def total_steps(epochs, steps, per_epoch: int) -> Optional[int]:
    """The run's planned logical steps from ``epochs`` or ``steps`` (None if neither is given)."""
    if epochs is not None and steps is not None:
        raise ValueError(f"give epochs or steps, not both (found epochs={epochs!r}, steps={steps!r})")
    if steps is not None:
        return check_positive_int("steps", steps)
    if epochs is None:
        return None
    return math.ceil(check_positive("epochs", epochs) * per_epoch)


def resolve_noise(args: MakePrivateArgs, steps: Optional[int], batching: Batching, accountant: str) -> float:
    """The noise multiplier: given, or calibrated to the target as the ledger will charge the run (Poisson,
    fixed batches, or with error feedback every step a full-batch Gaussian)."""
    if args.noise_multiplier is not None:
        return _given_noise(args.noise_multiplier, args.target_epsilon)
    if args.target_epsilon is None:
        raise ValueError("give noise_multiplier, or target_epsilon with target_delta and epochs (or steps)")
    if args.target_delta is None or steps is None:
        raise ValueError(
            f"target_epsilon needs target_delta and epochs or steps to calibrate the noise, found "
            f"target_delta={args.target_delta!r} and no epochs or steps" if steps is None else
            f"target_epsilon needs target_delta to calibrate the noise, found target_delta={args.target_delta!r}"
        )
    target = dict(target_epsilon=args.target_epsilon, delta=args.target_delta, accountant=accountant)
    if args.error_feedback:
        return calibrate_noise(sample_rate=1.0, steps=steps, **target)
    if not args.poisson_sampling:  # one charged step per (started) epoch, at multiplier sigma / 2 (sensitivity 2C)
        return 2 * calibrate_noise(sample_rate=1.0, steps=math.ceil(steps / batching.steps_per_epoch), **target)
    return calibrate_noise(sample_rate=batching.sample_rate, steps=steps, **target)


def _given_noise(noise_multiplier, target_epsilon) -> float:
    if target_epsilon is not None:
        raise ValueError("give either noise_multiplier or target_epsilon, not both")
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    if noise_multiplier == 0:
        logger.warning("noise_multiplier=0: training is NOT private (epsilon = inf)")
    return noise_multiplier


def check_ranks_agree(world: int, ddp_wrapped: bool, batching: Batching, planned_steps: Optional[int],
                      noise_multiplier: float, tracker, poisson_sampling: bool) -> None:
    """Every rank must run the same private training: refuse a mismatch, and several ranks without DDP."""
    distributed.check_consistent({
        "world_size": world, "ddp_wrapped": ddp_wrapped, "dataset_size": batching.dataset_size,
        "batch_size": batching.batch_size, "total_steps": planned_steps or 0, "noise_multiplier": noise_multiplier,
        "max_grad_norm": tracker.total_max_norm, "poisson_sampling": poisson_sampling,
        "trainable_parameters": sum(p.numel() for p in tracker.params),
    })
    if world > 1 and not ddp_wrapped:
        raise ValueError("torch.distributed is initialised with several ranks but the model is not wrapped in "
                         "DistributedDataParallel; wrap it (same on every rank) before make_private")


def check_optimizer_params(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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
