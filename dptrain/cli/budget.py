"""``dptrain budget``: privacy budget calculator (epsilon, noise multiplier or step budget).

Step convention: one epoch is ceil(dataset_size / batch_size) steps, i.e. ceil(1 / sample_rate) with
Poisson sampling at rate q = batch_size / dataset_size; ``--epochs E`` means ceil(E * steps_per_epoch) steps.
"""

from __future__ import annotations

import argparse
import math

from dptrain.cli import CLIError, emit
from dptrain.cli._types import finite_float, nonneg_int, one_line_errors, positive_int
from dptrain.sampling_rate import realizable_rate

__all__ = ["add_parser", "run"]

_EPILOG = """\
step convention: one epoch = ceil(dataset_size / batch_size) steps (= ceil(1 / sample_rate) when only the
sample rate is given); sampling is Poisson with rate q = batch_size / dataset_size.
delta: default min(1e-5, 1 / N^1.1) when the dataset size N is known (the default of 'dptrain finetune' and
DPTrainer too), else 1e-5.

examples:
  # epsilon of 3 epochs on 60k records, batch 256, noise multiplier 1.1 (both accountants)
  dptrain budget --dataset-size 60000 --batch-size 256 --epochs 3 --noise-multiplier 1.1 --accountant all
  # noise multiplier for epsilon = 8 after 10k steps at q = 0.001, delta = 1e-6, as JSON
  dptrain budget --sample-rate 0.001 --steps 10000 --target-epsilon 8 --delta 1e-6 --json
  # how many steps fit in epsilon = 3 with noise multiplier 1.0 (PLD accountant)
  dptrain budget --sample-rate 0.01 --noise-multiplier 1.0 --target-epsilon 3 --accountant pld
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``budget`` on the dispatcher's sub-parsers."""
    parser = subparsers.add_parser(
        "budget",
        help="privacy budget calculator: epsilon, noise multiplier, or step budget",
        description="Compute epsilon (given --noise-multiplier), the noise multiplier (given --target-epsilon), "
        "or the largest number of steps (given both) of DP-SGD with Poisson sampling.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    one_line_errors(parser, "budget")
    rate = parser.add_argument_group("sampling (either --sample-rate or --dataset-size with --batch-size)")
    rate.add_argument("--sample-rate", type=finite_float, help="Poisson sample rate q in (0, 1]")
    rate.add_argument("--dataset-size", type=positive_int, help="number of records N")
    rate.add_argument("--batch-size", type=positive_int, help="expected batch size B (q = B / N)")
    length = parser.add_argument_group("length (either --steps or --epochs; omit both to get the step budget)")
    length.add_argument("--steps", type=nonneg_int, help="number of optimizer steps")
    length.add_argument("--epochs", type=finite_float, help="epochs; steps = ceil(epochs * ceil(N / B))")
    parser.add_argument("--noise-multiplier", type=finite_float, help="noise multiplier sigma (-> epsilon)")
    parser.add_argument("--target-epsilon", type=finite_float, help="target epsilon (-> noise multiplier; "
                        "with --noise-multiplier -> max steps)")
    parser.add_argument("--delta", type=finite_float, help="delta (default: min(1e-5, 1/N^1.1), or 1e-5 without N)")
    parser.add_argument("--accountant", choices=("rdp", "pld", "all"), default="rdp", help="default: rdp")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
    return parser


def _sampling(args) -> tuple[float, int | None, float]:
    """(sample rate, dataset size or None, steps per epoch)."""
    if args.sample_rate is not None:
        if args.dataset_size is not None or args.batch_size is not None:
            raise CLIError("give either --sample-rate or --dataset-size with --batch-size, not both")
        if not 0 < args.sample_rate <= 1:
            raise CLIError(f"--sample-rate must be in (0, 1], found {args.sample_rate!r}")
        return realizable_rate(args.sample_rate), None, math.ceil(1 / args.sample_rate - 1e-9)
    if args.dataset_size is None or args.batch_size is None:
        raise CLIError("give --sample-rate, or both --dataset-size and --batch-size")
    if args.batch_size > args.dataset_size:
        raise CLIError(f"--batch-size must be <= --dataset-size ({args.dataset_size}), found {args.batch_size}")
    return (realizable_rate(args.batch_size / args.dataset_size), args.dataset_size,
            math.ceil(args.dataset_size / args.batch_size))


def _delta(args, dataset_size: int | None) -> tuple[float, str]:
    if args.delta is not None:
        if not 0 < args.delta < 1:
            raise CLIError(f"--delta must be in (0, 1), found {args.delta!r}")
        return args.delta, "given"
    from dptrain.finetune.config import DEFAULT_DELTA_RULE, default_delta  # the rule finetune and DPTrainer use

    if dataset_size is None:
        return 1e-5, "default 1e-5 (dataset size unknown)"
    return default_delta(dataset_size), f"default {DEFAULT_DELTA_RULE} with N = {dataset_size}"


def _steps(args, per_epoch: int) -> int | None:
    if args.steps is not None and args.epochs is not None:
        raise CLIError("give either --steps or --epochs, not both")
    if args.epochs is not None:
        if args.epochs <= 0:
            raise CLIError(f"--epochs must be > 0, found {args.epochs!r}")
        return math.ceil(args.epochs * per_epoch - 1e-9)
    return args.steps


def _entry(name, *, q, sigma, steps, delta, per_epoch) -> dict:
    from dptrain.accountants import make_accountant

    acc = make_accountant(name).step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    if name == "rdp":
        eps, order = acc.get_epsilon_and_order(delta)
        order = None if math.isnan(order) else order
    else:
        eps, order = acc.get_epsilon(delta), None
    return {
        "accountant": name, "epsilon": None if math.isinf(eps) else eps, "noise_multiplier": sigma,
        "steps": steps, "epochs": steps / per_epoch, "delta": delta, "sample_rate": q, "optimal_order": order,
    }


def _describe(entry: dict, mode: str, delta_rule: str) -> str:
    eps = "inf (no privacy)" if entry["epsilon"] is None else f"{entry['epsilon']:.6g}"
    order = f", optimal RDP order {entry['optimal_order']:g}" if entry["optimal_order"] is not None else ""
    head = {
        "epsilon": f"epsilon = {eps}",
        "noise": f"noise multiplier = {entry['noise_multiplier']:.6g} (epsilon = {eps})",
        "steps": f"max steps = {entry['steps']} ({entry['epochs']:.4g} epochs, epsilon = {eps})",
    }[mode]
    return (
        f"{entry['accountant'].upper()}: {head} at delta = {entry['delta']:.3g} [{delta_rule}] after "
        f"{entry['steps']} steps ({entry['epochs']:.4g} epochs) with sample rate {entry['sample_rate']:.6g}, "
        f"noise multiplier {entry['noise_multiplier']:.6g}{order}"
    )


def run(args) -> int:
    """Compute the requested quantity for each accountant and print it."""
    from dptrain.accountants import calibrate_noise, max_steps

    q, dataset_size, per_epoch = _sampling(args)
    delta, delta_rule = _delta(args, dataset_size)
    steps = _steps(args, per_epoch)
    sigma, target = args.noise_multiplier, args.target_epsilon
    if sigma is None and target is None:
        raise CLIError("give --noise-multiplier (-> epsilon), --target-epsilon (-> noise multiplier), or both")
    if sigma is not None and sigma < 0:
        raise CLIError(f"--noise-multiplier must be >= 0, found {sigma!r}")
    if target is not None and target <= 0:
        raise CLIError(f"--target-epsilon must be > 0, found {target!r}")
    if sigma is not None and target is not None:
        if steps is not None:
            raise CLIError("with both --noise-multiplier and --target-epsilon the steps are computed: "
                           "drop --steps/--epochs")
        mode = "steps"
    else:
        if steps is None:
            raise CLIError("give --steps or --epochs")
        mode = "epsilon" if sigma is not None else "noise"
    names = ("rdp", "pld") if args.accountant == "all" else (args.accountant,)
    entries = {}
    for name in names:
        if mode == "noise":
            run_sigma, run_steps = calibrate_noise(
                target_epsilon=target, sample_rate=q, steps=steps, delta=delta, accountant=name), steps
        elif mode == "steps":
            run_sigma = sigma
            run_steps = max_steps(target_epsilon=target, sample_rate=q, noise_multiplier=sigma, delta=delta,
                                  accountant=name)
        else:
            run_sigma, run_steps = sigma, steps
        entry = _entry(name, q=q, sigma=run_sigma, steps=run_steps, delta=delta, per_epoch=per_epoch)
        entry["delta_rule"] = delta_rule
        entries[name] = entry
    result = entries[names[0]] if len(names) == 1 else entries
    human = "\n".join(_describe(entry, mode, delta_rule) for entry in entries.values())
    emit(result, human, args.json)
    return 0
