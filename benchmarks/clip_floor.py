"""What exact per-layer clipping costs by itself: each weight matrix of the engine_speed GPT-2, timed alone.

    python -m benchmarks.clip_floor            # writes the "clip_floor" section of RESULTS.md
    python -m benchmarks.clip_floor --reps 5   # quicker

For every weight matrix of the 4-layer GPT-2 of engine_speed (batch 8, length 128, width 256, vocab 8192), on the
same random layer inputs x (B, T, d_in) and output gradients g (B, T, d_out), three computations are timed:

- non-DP: the weight gradient g^T x, one GEMM over the B*T rows;
- instantiate (dptrain's CPU route): the per-sample gradients by one batched GEMM into a reused buffer, their
  norms, the clip factors and the clipped sum (one matrix-vector product);
- ghost: per-sample norms from the Gram matrices x_i x_i^T and g_i g_i^T, then one scaled GEMM
  (``dptrain.kernels.fused_clip_linear_grad``, the factored route).

Each repetition times a non-DP training step of the whole model first, then every (layer, route) in rotating
order, so that the shared machine's slow and quick phases hit all of them alike; medians over repetitions.
The cheaper exact route's extra time over non-DP, summed over the model's matrices, is a floor of what per-layer
clipping adds to a step on this machine: it leaves out norm layers, biases, the tied embedding's rows, the noise
and all bookkeeping. It is reported as a ratio to the non-DP step of the same run, alone and with two of the left-out
costs timed beside it (the noise for every parameter, the LayerNorms' per-sample gradients).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks._harness import rotation, timed
from benchmarks._results import write_section
from benchmarks.engine_speed import BATCH, LENGTH, VOCAB, _build  # the same model and sizes

# (name, d_in, d_out, matrices of this shape in the model)
LAYERS = [
    ("attn.c_attn", 256, 768, 4),
    ("attn.c_proj", 256, 256, 4),
    ("mlp.c_fc", 256, 1024, 4),
    ("mlp.c_proj", 1024, 256, 4),
    ("lm_head", 256, VOCAB, 1),
]
MAX_NORM = 0.1  # small enough that every sample is clipped (the usual DP regime)


def _routes(d_in: int, d_out: int):
    """The three computations for one layer shape, as zero-argument callables on fixed random data."""
    from dptrain import kernels
    from dptrain.grad_sample.contributions import Factored, per_sample_sq_norms, weighted_sum
    from dptrain.grad_sample.routes import RoutePlanner

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, LENGTH, d_in, generator=gen)  # (B, T, d_in)
    g = torch.randn(BATCH, LENGTH, d_out, generator=gen) / LENGTH  # (B, T, d_out)
    shape = torch.Size((d_out, d_in))
    weight = torch.nn.Parameter(torch.empty(shape))
    pending = {weight: [Factored(g, x, d_out, shape)]}  # per-sample gradient g_i^T x_i
    whole_batch = 4 * BATCH * d_in * d_out  # the dense route, one chunk
    planner = RoutePlanner(dense_budget_bytes=whole_batch, dense_pass_cost=-1e9, cache_bytes=whole_batch)
    routes = planner.plan(pending, BATCH, per_layer=True)
    assert weight in routes.dense and routes.chunk == BATCH, "one chunk of explicit per-sample gradients"

    def non_dp():
        return g.reshape(-1, d_out).T @ x.reshape(-1, d_in)  # (d_out, d_in)

    def instantiate():
        dense = planner.densify(routes, pending, slice(0, BATCH))[weight]  # (B, d_out, d_in)
        factors = kernels.clip_factors(per_sample_sq_norms([dense]).sqrt_(), MAX_NORM)  # (B,)
        return weighted_sum([dense], factors, shape)

    def ghost():
        return kernels.fused_clip_linear_grad(x, g, MAX_NORM, strategy="ghost", backend="torch")[0]

    # the same clipped sum, but for the ghost route's clip bound above the norm (its margin, ~1e-3 here)
    dense_sum = instantiate()
    assert float((dense_sum - ghost()).norm() / dense_sum.norm()) < 5e-3, "the routes' clipped sums differ"
    return {"non-DP": non_dp, "instantiate": instantiate, "ghost": ghost}


def _other_costs(model):
    """Two more costs every exact DP step pays here: the noise for all trainable parameters and the per-sample
    gradients of the 9 LayerNorms."""
    from torch import nn

    from dptrain.grad_sample.norms import LayerNormRule
    from dptrain.noise import GaussianNoise

    noise = GaussianNoise(seed=0)
    sums = [torch.zeros(p.shape) for p in model.parameters()]
    norm_layers = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    layer, rule = nn.LayerNorm(256), LayerNormRule()
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(BATCH, LENGTH, 256, generator=gen), torch.randn(BATCH, LENGTH, 256, generator=gen)
    return {
        f"noise, {sum(s.numel() for s in sums) / 1e6:.1f}M parameters": lambda: noise.add_(sums, 1.0, scale=1 / BATCH),
        f"LayerNorm per-sample gradients x {norm_layers}": lambda: [rule.contributions(layer, x, g)
                                                                  for _ in range(norm_layers)],
    }


def _training_step():
    """One non-DP AdamW step of the engine_speed model (tied GPT-2), as a callable, and the model."""
    import torch.nn.functional as F

    model = _build("gpt2-tied")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))

    def step():
        logits = model(input_ids=batch).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="repetitions (each times everything once)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    step, model = _training_step()
    jobs = {(name, route): fn for name, d_in, d_out, _ in LAYERS for route, fn in _routes(d_in, d_out).items()}
    jobs.update(((what, "extra"), fn) for what, fn in _other_costs(model).items())
    for fn in [step, step, *jobs.values()]:  # warm-up
        fn()
    step_times, times = [], {key: [] for key in jobs}
    for rep in range(args.reps):
        step_times.append(timed(step)[1])
        for key in rotation(list(jobs), rep):
            times[key].append(timed(jobs[key])[1])
    ms = {key: statistics.median(t) * 1000 for key, t in times.items()}
    step_ms = statistics.median(step_times) * 1000

    rows, totals = [], {"non-DP": 0.0, "instantiate": 0.0, "ghost": 0.0, "cheaper": 0.0}
    others = {name: value for (name, route), value in ms.items() if route == "extra"}
    for name, d_in, d_out, count in LAYERS:
        base, inst, ghost = ms[(name, "non-DP")], ms[(name, "instantiate")], ms[(name, "ghost")]
        for route, value in [("non-DP", base), ("instantiate", inst), ("ghost", ghost), ("cheaper", min(inst, ghost))]:
            totals[route] += count * value
        rows.append(f"| {name} | {d_in}x{d_out} | {count} | {base:.2f} | {inst:.2f} ({inst / base:.2f}x) "
                    f"| {ghost:.2f} ({ghost / base:.2f}x) | {min(inst, ghost) - base:+.2f} |")
    extra = totals["cheaper"] - totals["non-DP"]
    matrices = sum(count for *_, count in LAYERS)
    rows.append(f"| **model** | | {matrices} | {totals['non-DP']:.1f} | {totals['instantiate']:.1f} "
                f"| {totals['ghost']:.1f} | {extra:+.1f} |")
    body = (
        f"Batch {BATCH}, length {LENGTH}, 2 threads, fp32, every sample clipped; medians of {args.reps} repetitions, "
        "each timing a non-DP training step of the tied GPT-2 and then every (layer, route) in rotating order. "
        "Milliseconds per call; the model row sums over its matrices (count column).\n\n"
        "| matrix | d_in x d_out | count | non-DP weight grad | instantiate | ghost | cheaper exact - non-DP |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Non-DP training step in the same run: {step_ms:.0f} ms. The clipping arithmetic alone, at its cheaper exact "
        f"route per matrix, adds {extra:.0f} ms: a floor of {(step_ms + extra) / step_ms:.3f}x for per-layer clipping "
        "before norm layers, biases, the tied embedding, noise and bookkeeping. Two of those, timed in the same "
        "repetitions: " + "; ".join(f"{name} {value:.1f} ms" for name, value in others.items())
        + f" (with them: {(step_ms + extra + sum(others.values())) / step_ms:.3f}x)."
    )
    print(body)
    write_section("clip_floor", body)


if __name__ == "__main__":
    main()
