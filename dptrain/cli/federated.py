"""``dptrain federated``: the private federated LoRA demo (FedSVD, FFA-LoRA or DP-LoRA) on non-IID clients.

A few clients get Dirichlet(alpha) splits of the bundled synthetic records; each trains LoRA with sample-level
DP-SGD on its own records (noise calibrated for all its rounds), the server averages and (FedSVD) re-factorises.
``--engine local`` runs everything in this process; ``--engine flower`` runs the Flower apps on a local
Deployment Runtime (one SuperLink and one SuperNode per client on 127.0.0.1; needs ``pip install flwr``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from dptrain.cli import CLIError, emit
from dptrain.cli._types import finite_float, nonneg_int, one_line_errors, positive_int
from dptrain.sampling_rate import realizable_rate

__all__ = ["add_parser", "run"]

_EPILOG = """\
privacy: sample-level (epsilon, delta) per client over all its local steps of all rounds, Poisson sampling of
its own records (q = batch-size / N_k). Each client's record count N_k and the data split are public. Every
client trains in every round: no amplification by client selection is claimed. The server sees only noised
factors; averaging and FedSVD's re-factorisation are post-processing. The held-out perplexity is computed
without noise (not a private number). Noise and batches come from OS entropy.

examples:
  # FedSVD, 3 clients, 5 rounds of 5 local steps, epsilon 3 per client, in this process
  dptrain federated --method fedsvd --clients 3 --rounds 5 --local-steps 5 --target-epsilon 3
  # the FFA-LoRA baseline on the same split, as JSON, keeping the final factors
  dptrain federated --method ffa --json --output-dir runs/ffa
  # the same run through Flower's Deployment Runtime on this machine
  dptrain federated --method fedsvd --engine flower --output-dir runs/fedsvd-flower
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``federated`` on the dispatcher's sub-parsers."""
    parser = subparsers.add_parser(
        "federated",
        help="private federated LoRA demo: FedSVD, FFA-LoRA or DP-LoRA on non-IID clients",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    one_line_errors(parser, "federated")
    fed = parser.add_argument_group("federation")
    fed.add_argument("--method", choices=("fedsvd", "ffa", "dplora"), default="fedsvd", help="default: fedsvd")
    fed.add_argument("--engine", choices=("local", "flower"), default="local", help="default: local (in process)")
    fed.add_argument("--clients", type=positive_int, default=3, help="number of clients (default 3)")
    fed.add_argument("--rounds", type=positive_int, default=5, help="default 5")
    fed.add_argument("--local-steps", type=positive_int, default=5, help="DP-SGD steps per client per round (5)")
    fed.add_argument("--svd-period", type=positive_int, default=1, help="FedSVD: re-factorise every k rounds (1)")
    fed.add_argument("--svd-warmup", type=nonneg_int, default=0, help="FedSVD: rounds before the first one (0)")
    priv = parser.add_argument_group("privacy (per client)")
    priv.add_argument("--target-epsilon", type=finite_float, default=3.0, help="default 3")
    priv.add_argument("--delta", type=finite_float, help="default min(1e-5, 1/N_k^1.1) per client")
    priv.add_argument("--accountant", choices=("rdp", "pld"), default="rdp", help="default: rdp")
    priv.add_argument("--max-grad-norm", type=finite_float, default=1.0, help="clipping threshold C (1.0)")
    priv.add_argument("--secure-mode", action="store_true", help="fresh OS entropy for every noise/batch draw")
    train = parser.add_argument_group("training")
    train.add_argument("--batch-size", type=positive_int, default=32, help="expected Poisson batch per client (32)")
    train.add_argument("--lr", type=finite_float, default=0.5, help="default 0.5")
    train.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd", help="reset every round")
    train.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (8)")
    train.add_argument("--lora-alpha", type=finite_float, default=16.0, help="LoRA alpha (16)")
    train.add_argument("--max-length", type=positive_int, default=128, help="tokens per record (128)")
    data = parser.add_argument_group("model and data (all public)")
    data.add_argument("--model", help="local Hugging Face model folder (default: the demo GPT-2)")
    data.add_argument("--pretrain-steps", type=nonneg_int, default=30,
                      help="demo GPT-2: non-private pretraining steps on the public corpus (30)")
    data.add_argument("--records", type=positive_int, default=1200, help="demo records to split (1200)")
    data.add_argument("--alpha", type=finite_float, default=0.5, help="Dirichlet concentration of the split (0.5)")
    data.add_argument("--seed", type=nonneg_int, default=0, help="PUBLIC seed: demo data, split, LoRA init (0)")
    parser.add_argument("--output-dir", help="write factors.pt and report.json here (and Flower's logs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
    return parser


def _run_config(args, base: str) -> dict:
    cfg = dict(method=args.method, rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size,
               lr=args.lr, optimizer=args.optimizer, max_grad_norm=args.max_grad_norm,
               target_epsilon=args.target_epsilon, accountant=args.accountant, svd_period=args.svd_period,
               svd_warmup=args.svd_warmup, secure_mode=args.secure_mode, base=base, lora_r=args.lora_r,
               lora_alpha=args.lora_alpha, lora_seed=args.seed, max_length=args.max_length, num_clients=args.clients,
               demo_records=args.records, demo_alpha=args.alpha, demo_seed=args.seed)
    if args.delta is not None:
        cfg["delta"] = args.delta
    return cfg


def run(args) -> int:
    from dptrain.federated.app import AppSettings

    if args.model is not None and not Path(args.model).is_dir():
        raise CLIError(f"--model must be a local model folder, found {args.model!r}")
    if args.max_length < 2:
        raise CLIError(f"--max-length must be >= 2, found {args.max_length}")
    if args.engine == "flower":
        try:
            import flwr  # noqa: F401
        except ImportError:
            raise CLIError("--engine flower needs Flower: pip install flwr") from None
    out = Path(args.output_dir).resolve() if args.output_dir else None  # Flower's apps run in other folders
    AppSettings(_run_config(args, "demo")).demo_parts()  # checks settings and the split before any training
    with tempfile.TemporaryDirectory(prefix="dptrain-federated-") as tmp:
        work = out or Path(tmp)
        base = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model or "demo"
        if args.model is None and args.pretrain_steps:
            from dptrain.federated.model import save_demo_base

            base = save_demo_base(work / "demo_base.pt", pretrain_steps=args.pretrain_steps,
                                  max_length=args.max_length, seed=args.seed)
        run_config = _run_config(args, base)
        report = _train(args, run_config, work)
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=float))
    emit(report, _human(report), args.json)
    return 0


def _train(args, run_config: dict, work: Path) -> dict:
    import torch

    from dptrain.federated.app import AppSettings, run_local
    from dptrain.federated.lora import set_factors
    from dptrain.finetune.loss import PadCollator, TokenizedTexts, perplexity

    settings = AppSettings(run_config)
    parts, held_out = settings.demo_parts()
    model, tok = settings.load_model()
    eval_set, collate = TokenizedTexts(held_out, tok, args.max_length), PadCollator(tok.pad_token_id)
    before = perplexity(model, eval_set, collate)
    if args.engine == "flower":
        from dptrain.federated.flower import run_flower

        try:
            result = run_flower(run_config, workdir=work / "flower" if args.output_dir else None)  # None: kept temp
        except (RuntimeError, TimeoutError) as err:
            raise CLIError(str(err).splitlines()[0]) from None
        set_factors(model, result.factors)
    else:
        result = run_local(run_config, model=(model, tok))
    after = perplexity(model, eval_set, collate)
    if args.output_dir:
        torch.save(result.factors, work / "factors.pt")
    fed = settings.fed
    clients = []
    for k, (texts, eps, delta) in enumerate(zip(parts, result.epsilons, result.deltas)):
        q = realizable_rate(fed.batch_size / len(texts))  # the rate its ledger charged
        clients.append({"client": k, "records": len(texts), "sample_rate": q, "steps": fed.rounds * fed.local_steps,
                        "epsilon": eps, "delta": delta})
    return {
        "method": fed.method, "engine": args.engine, "rounds": fed.rounds, "local_steps": fed.local_steps,
        "target_epsilon": fed.target_epsilon, "clients": clients, "history": result.history,
        "heldout_perplexity_before": before, "heldout_perplexity_after": after,
        "privacy": {
            "unit": "one record of one client (sample level), per client",
            "public": "each client's record count and the data split; all settings",
            "client_selection": "all clients every round: no amplification claimed",
            "not_private": "held-out perplexity (computed without noise)",
        },
    }


def _human(r: dict) -> str:
    lines = [f"{r['method']} on {len(r['clients'])} clients ({r['engine']}): {r['rounds']} rounds x "
             f"{r['local_steps']} local DP-SGD steps, target epsilon {r['target_epsilon']} per client",
             "client  records (public)  sample rate  steps  epsilon  delta"]
    for c in r["clients"]:
        lines.append(f"{c['client']:>6}  {c['records']:>16}  {c['sample_rate']:>11.4f}  {c['steps']:>5}  "
                     f"{c['epsilon']:>7.3f}  {c['delta']:.2e}")
    lines.append(f"held-out perplexity: {r['heldout_perplexity_before']:.3f} -> {r['heldout_perplexity_after']:.3f} "
                 "(not private: computed without noise)")
    if not all(math.isfinite(c["epsilon"]) for c in r["clients"]):
        lines.append("WARNING: some client's epsilon is infinite")
    return "\n".join(lines)
