"""GPU benchmark of dptrain.kernels: per-op throughput and model-level DP step throughput (issue 4).

    python -m benchmarks.kernels_gpu                 # on an NVIDIA GPU: both parts, writes the "kernels_gpu" section
    python -m benchmarks.kernels_gpu --part ops      # only (1), per-op figures
    python -m benchmarks.kernels_gpu --smoke         # tiny CPU configuration of (1) and (2): proves the script runs
    python -m benchmarks.kernels_gpu --part model --methods dptrain-per_layer --profile   # where a step's time goes

(1) Per op, bf16, Llama-7B-like layers (d_out x d_in = 4096x4096, 11008x4096, 4096x11008), T in 512..2048 and
    B*T = --tokens: time of the plain weight-gradient GEMM g^T x (what non-DP training does), the Triton ops
    (norms by ghost and by instantiation, scaled sum, fused clip) and their torch references; fused / GEMM ratio
    (floor 1.15x) and peak extra memory.
(2) Model level: a ~1B Llama-style decoder (LlamaConfig, bf16, SGD), tokens/s and peak memory of one optimizer
    step: non-DP, dptrain per_layer, dptrain flat, Opacus ghost clipping; each in its own subprocess. Floors:
    per_layer >= 0.9x non-DP throughput, peak memory <= 1.05x non-DP.

Without CUDA (and without --smoke) it exits with status 2 and says so; --smoke never writes RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchmarks._harness import WorkerProcess, prepared_lm_step, reply, time_steps

LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (d_out, d_in)
SEQ_LENS = [512, 1024, 2048]
SMOKE_LAYERS = [(96, 64), (64, 160)]
SMOKE_SEQ_LENS = [16, 48]


# ----------------------------------------------------------------------------------------------- timing helpers
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: str, warmup: int, iters: int) -> float:
    """Median wall time of fn() in ms (CUDA events on the GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    if device != "cuda":
        return 1e3 * statistics.median(time_steps(fn, iters))
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mb(fn, device: str) -> float:
    """Peak memory allocated by fn() above what was allocated before it, MB (CUDA only)."""
    import torch

    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------------------------- (1) per-op
def bench_ops(device: str, layers, seq_lens, tokens: int, warmup: int, iters: int, dtype_name: str) -> list[dict]:
    import torch

    from dptrain import kernels as K

    dtype = getattr(torch, dtype_name)
    triton_ok = device == "cuda" or K._common.INTERPRETED
    rows = []
    for d_out, d_in in layers:
        for T in seq_lens:
            B = max(1, tokens // T)
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(B, T, d_in, device=device, dtype=dtype, generator=gen)  # (B, T, d_in)
            g = torch.randn(B, T, d_out, device=device, dtype=dtype, generator=gen)  # (B, T, d_out)
            scale = torch.rand(B, device=device)
            strategy = K.choose_linear_strategy(T, d_in, d_out)
            max_norm = 0.5 * float(K.per_sample_linear_grad_norms(x, g, backend="torch").median())

            def gemm():
                return g.reshape(-1, d_out).T @ x.reshape(-1, d_in)  # (d_out, d_in) non-DP weight grad

            ops = {"gemm": gemm}
            for backend in (["triton"] if triton_ok else []) + ["torch"]:
                for strat in ("ghost", "instantiate"):
                    ops[f"norms_{strat}_{backend}"] = (
                        lambda b=backend, s=strat: K.per_sample_linear_grad_norms(x, g, strategy=s, backend=b)
                    )
                ops[f"scaled_{backend}"] = lambda b=backend: K.scaled_linear_grad(x, g, scale, backend=b)
                ops[f"fused_{backend}"] = lambda b=backend: K.fused_clip_linear_grad(x, g, max_norm, backend=b)
            row = {"d_out": d_out, "d_in": d_in, "T": T, "B": B, "auto": strategy}
            for name, fn in ops.items():
                try:
                    row[f"{name}_ms"] = _time_ms(fn, device, warmup, iters)
                    row[f"{name}_mb"] = _peak_extra_mb(fn, device)
                except Exception as exc:  # an OOM of a torch reference must not stop the table
                    row[f"{name}_ms"] = float("nan")
                    row[f"{name}_err"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                    if device == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x, g
    return rows


def ops_table(rows: list[dict]) -> str:
    backend = "triton" if any("fused_triton_ms" in r for r in rows) else "torch"
    head = (
        f"| d_out x d_in | T | B | auto | GEMM ms | norms ghost ms ({backend} / torch) | norms inst. ms ({backend} / torch) "
        f"| scaled ms ({backend} / torch) | fused clip ms ({backend} / torch) | fused / GEMM | fused extra MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        def pair(op):
            return f"{r.get(f'{op}_{backend}_ms', float('nan')):.2f} / {r.get(f'{op}_torch_ms', float('nan')):.2f}"

        fused = r.get(f"fused_{backend}_ms", float("nan"))
        lines.append(
            f"| {r['d_out']}x{r['d_in']} | {r['T']} | {r['B']} | {r['auto']} | {r['gemm_ms']:.2f} | {pair('norms_ghost')} "
            f"| {pair('norms_instantiate')} | {pair('scaled')} | {pair('fused')} | {fused / r['gemm_ms']:.2f}x "
            f"| {r.get(f'fused_{backend}_mb', float('nan')):.0f} |"
        )
    errors = [f"- {r['d_out']}x{r['d_in']} T={r['T']} {k[:-4]}: {v}" for r in rows for k, v in r.items() if k.endswith("_err")]
    return head + "\n".join(lines) + ("\n\nFailed cells:\n" + "\n".join(errors) if errors else "")


# ----------------------------------------------------------------------------------------------- (2) model level
MODEL_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B shape
MODEL_SMOKE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256)


def model_worker(method: str, smoke: bool, batch: int, seq_len: int, steps: int, profile: bool = False) -> dict:
    """One method in this process: build the model, make it private, time optimizer steps back to back; with
    ``profile``, then the op table (torch.profiler) of 3 more steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    config = LlamaConfig(**(MODEL_SMOKE if smoke else MODEL_1B), max_position_embeddings=seq_len)
    with torch.device(device):  # initialised where it runs: a 1B model's CPU init would take longer than its steps
        model = LlamaForCausalLM(config).to(dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (batch * 4, seq_len), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    step = prepared_lm_step(method, model, optimizer, ids, batch, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_s = statistics.median(time_steps(step, steps, sync=lambda: _sync(device)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    row = {"step_s": step_s, "tokens_per_s": batch * seq_len / step_s, "peak_gb": peak, "params": n_params}
    if profile:
        row["profile"] = _profile(step, device)
    return row


def _profile(step, device: str, steps: int = 3, rows: int = 30) -> str:
    """torch.profiler's table of ``steps`` steps, the ops of most device time first (CPU time on the CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


MODEL_METHODS = ["nondp", "dptrain-per_layer", "dptrain-flat", "opacus-ghost"]


def bench_model(smoke: bool, batch: int, seq_len: int, steps: int, methods=MODEL_METHODS,
                profile: bool = False) -> list[dict]:
    rows = []
    for method in methods:
        worker = WorkerProcess("kernels_gpu", "--model-worker", method, "--batch", str(batch), "--seq-len",
                               str(seq_len), "--steps", str(steps), *(["--smoke"] if smoke else []),
                               *(["--profile"] if profile else []))
        row = {"method": method, **worker.ask()}  # the figures, or {"error": <its last stderr line>}
        worker.close()
        table = row.pop("profile", None)
        print(json.dumps(row), flush=True)
        if table:
            print(f"profile of {method}:\n{table}", flush=True)
        rows.append(row)
    return rows


def model_table(rows: list[dict], batch: int, seq_len: int, dtype: str) -> str:
    base = next((r for r in rows if r["method"] == "nondp" and "error" not in r), None)
    params = f"{base['params'] / 1e9:.2f}B parameters, " if base else ""
    out = [f"Llama-style decoder, {params}batch {batch} x {seq_len} tokens, SGD, {dtype}.\n",
           "| method | step s | tokens/s | x non-DP throughput | peak GB | x non-DP memory |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | failed: {r['error']} | | | | |")
            continue
        rel_t = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        rel_m = r["peak_gb"] / base["peak_gb"] if base else float("nan")
        out.append(f"| {r['method']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {rel_t:.2f} | {r['peak_gb']:.2f} | {rel_m:.2f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["ops", "model", "all"], default="all")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU configuration; writes nothing")
    parser.add_argument("--tokens", type=int, default=8192, help="B*T per op call (part 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (part 2)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (part 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (part 2)")
    parser.add_argument("--methods", nargs="+", choices=MODEL_METHODS, default=MODEL_METHODS, help="(part 2)")
    parser.add_argument("--profile", action="store_true", help="(part 2) print each method's op table too")
    parser.add_argument("--model-worker", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave RESULTS.md alone")
    args = parser.parse_args()

    import torch

    if args.model_worker:
        reply(model_worker(args.model_worker, args.smoke, args.batch, args.seq_len, args.steps, args.profile))
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("kernels_gpu: no CUDA GPU found; these figures need an NVIDIA GPU. Run with --smoke for a tiny CPU "
              "check that the script works (it writes nothing).", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    sections = []
    if args.part in ("ops", "all"):
        if args.smoke:
            rows = bench_ops("cpu", SMOKE_LAYERS, SMOKE_SEQ_LENS, 96, 1, 2, "float32")
        else:
            rows = bench_ops(device, LAYERS, SEQ_LENS, args.tokens, args.warmup, args.iters, args.dtype)
        sections.append(f"### (1) per-op, {'float32 (smoke)' if args.smoke else args.dtype}, B*T = "
                        f"{96 if args.smoke else args.tokens}\n\n" + ops_table(rows))
    if args.part in ("model", "all"):
        batch, seq_len, steps = (2, 32, 1) if args.smoke else (args.batch, args.seq_len, args.steps)
        sections.append("### (2) model level\n\n" + model_table(
            bench_model(args.smoke, batch, seq_len, steps, args.methods, args.profile), batch, seq_len,
            "float32 (smoke)" if args.smoke else "bf16"
        ))
    body = "\n\n".join(sections)
    print(body)
    if device == "cuda" and not args.no_write:
        from benchmarks._results import write_section

        write_section("kernels_gpu", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
