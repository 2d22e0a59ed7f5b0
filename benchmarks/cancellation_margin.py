"""How much room the cancellation margin leaves, and what it costs, on a real language model's gradients.

    python -m benchmarks.cancellation_margin                       # SmolLM2-135M, B 4, T 256
    python -m benchmarks.cancellation_margin --batch 2 --length 1024

One forward/backward of the model on text (this repository's docs) captures every ``nn.Linear``'s inputs x and
output gradients g. Per layer and sample, against a float64 instantiated oracle norm N and the triangle bound
U = sum_t |x_t| |g_t|: the rounding error of the ghost (Gram) squared norm (the CPU's fp32 Gram blocks) relative
to U^2, which the margin (``kernels.CANCELLATION_RHO`` plus the Grams' stated error,
``kernels.ghost_rounding_allowance``) must exceed, and the price of the bound clipped against
(``kernels.clip_bounds_sq``): how far it exceeds N, were every layer's norm a ghost norm, and on the route the
engine takes (ghost or instantiated per ``kernels.choose_linear_strategy``). All scale-free: a mean loss is fine.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from benchmarks._results import write_section
from dptrain import kernels


def _capture(model) -> dict:
    """{name: [x, g]} of every nn.Linear, filled by the next forward and backward."""
    captured = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out, n=name: captured.__setitem__(n, [args[0].detach()]))
            module.register_full_backward_hook(lambda m, gin, gout, n=name: captured[n].append(gout[0].detach()))
    return captured


def _ratios(x: torch.Tensor, g: torch.Tensor):
    """(error / U^2, margin / U^2, ghost price, engine's price) per sample, float64, for (B, T, d_in) inputs and
    (B, T, d_out) gradients; price = bound / N - 1."""
    exact = torch.einsum("bto,bti->boi", g.double(), x.double()).flatten(1).square().sum(1)  # (B,)
    out = []
    for strategy in ("ghost", kernels.choose_linear_strategy(x.shape[1], x.shape[2], g.shape[2])):
        computed = kernels.per_sample_linear_grad_sq_norms(x, g, strategy=strategy)  # (B,) fp32
        triangle, allowance = kernels.bound_terms(x, g, strategy)  # (B,) U, and what fp32 Grams may lose
        bound = kernels.clip_bounds_sq(computed, triangle, x.shape[1] * triangle, allowance).double()
        out.append(((computed.double() - exact).abs(), allowance, (bound / exact).sqrt() - 1))
    (error, allowance, ghost_price), (_, _, price) = out
    margin = kernels.CANCELLATION_RHO + (0 if allowance is None else allowance / triangle.square())
    return error / triangle.square(), margin, ghost_price, price


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    from dptrain.finetune.modeling import load_pretrained

    torch.manual_seed(0)
    model, tokenizer = load_pretrained(args.model)
    text = "\n".join(p.read_text() for p in sorted(Path(__file__).parents[1].glob("docs/*.md")))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = args.batch * args.length
    if len(ids) < need:
        raise SystemExit(f"--batch {args.batch} x --length {args.length} needs {need} tokens, the docs have {len(ids)}")
    batch = ids[:need].view(args.batch, args.length)  # (B, T)
    captured = _capture(model)
    model(batch, labels=batch).loss.backward()
    rho = kernels.CANCELLATION_RHO
    rows, headroom, ghost_prices, prices = [], math.inf, [], []
    for name, (x, g) in captured.items():
        error, margin, ghost_price, price = _ratios(x, g)
        headroom = min(headroom, float((margin / error).min()))
        ghost_prices += ghost_price.tolist()
        prices += price.tolist()
        rows.append((float(error.max()), name, float(torch.as_tensor(margin).min()), float(ghost_price.max())))
    rows.sort(reverse=True)
    lines = [f"{args.model}, B {args.batch} x T {args.length}, {len(rows)} linear layers; rho = 2^{math.log2(rho):.0f} "
             "plus the fp32 Grams' stated error.",
             "", "| layer (largest errors first) | max error / U^2 | margin / U^2 | max ghost price |", "|---|---|---|---|"]
    lines += [f"| {name} | {err:.2e} | {margin:.2e} | {price:.1e} |" for err, name, margin, price in rows[:5]]
    lines += ["", f"- margin / error, least over all samples and layers: {headroom:.1f}x",
              f"- price (bound clipped against / true norm - 1), every norm a ghost norm: median "
              f"{statistics.median(ghost_prices):.1e}, max {max(ghost_prices):.1e}",
              f"- price on the engine's routes (ghost or instantiated): median {statistics.median(prices):.1e}, "
              f"max {max(prices):.1e}"]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(f"cancellation_margin_T{args.length}", body)


if __name__ == "__main__":
    main()
