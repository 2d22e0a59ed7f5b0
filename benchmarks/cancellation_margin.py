"""How much room the cancellation margin leaves, and what it costs, on a real language model's gradients.

    python -m benchmarks.cancellation_margin                       # SmolLM2-135M, B 4, T 256
    python -m benchmarks.cancellation_margin --batch 2 --length 1024

One forward/backward of the model on text (this repository's docs) captures every ``nn.Linear``'s inputs x and
output gradients g. Per layer and sample, against a float64 instantiated oracle norm N and the triangle bound
U = sum_t |x_t| |g_t|: the rounding error of the ghost (Gram) squared norm (fp64 Grams) relative to U^2, which
``kernels.CANCELLATION_RHO`` must exceed, and the price of the bound clipped against (``kernels.clip_bounds_sq``):
how far it exceeds N. Both are scale-free, so a mean loss is fine.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from benchmarks._results import write_section
from dptrain import kernels
from dptrain.kernels.linear_norms import _sq_norms_ghost_torch


def _capture(model) -> dict:
    """{name: [x, g]} of every nn.Linear, filled by the next forward and backward."""
    captured = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out, n=name: captured.__setitem__(n, [args[0].detach()]))
            module.register_full_backward_hook(lambda m, gin, gout, n=name: captured[n].append(gout[0].detach()))
    return captured


def _ratios(x: torch.Tensor, g: torch.Tensor):
    """(error / U^2, bound / N - 1) per sample, float64, for (B, T, d_in) inputs and (B, T, d_out) gradients."""
    computed = _sq_norms_ghost_torch(x, g)  # (B,) fp32
    exact = torch.einsum("bto,bti->boi", g.double(), x.double()).flatten(1).square().sum(1)  # (B,)
    triangle = kernels.triangle_bounds(x, g)  # (B,) U
    bound = kernels.clip_bounds_sq(computed, triangle, x.shape[1] * triangle).double()
    return (computed.double() - exact).abs() / triangle.square(), (bound / exact).sqrt() - 1


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
    rows, worst_error, prices = [], 0.0, []
    for name, (x, g) in captured.items():
        error, price = _ratios(x, g)
        worst_error = max(worst_error, float(error.max()))
        prices += price.tolist()
        rows.append((float(error.max()), name, float(price.max())))
    rows.sort(reverse=True)
    lines = [f"{args.model}, B {args.batch} x T {args.length}, {len(rows)} linear layers; rho = 2^{math.log2(rho):.0f}.",
             "", "| layer (largest errors first) | max error / U^2 | max price |", "|---|---|---|"]
    lines += [f"| {name} | {err:.2e} | {price:.1e} |" for err, name, price in rows[:5]]
    lines += ["", f"- largest error / U^2 over all layers: {worst_error:.2e}, rho / that = {rho / worst_error:.1f}x",
              f"- price (bound clipped against / true norm - 1) over all samples and layers: median "
              f"{statistics.median(prices):.1e}, max {max(prices):.1e}"]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(f"cancellation_margin_T{args.length}", body)


if __name__ == "__main__":
    main()
