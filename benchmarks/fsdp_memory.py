"""python -m benchmarks.fsdp_memory [--layers 8] [--width 2048] [--before OLD_CHECKOUT] [--no-write]

Per-rank gradient memory of DP-SGD on FSDP2 (``fully_shard``), 2 processes on gloo/CPU: a stack of ``--layers``
Linear(width, width) layers, each its own FSDP unit, flat and per-layer clipping, sigma 1, 4 samples per rank.
After 3 warm-up steps, per rank (the larger of the two ranks is shown):

- held after the step: the storages behind ``p.grad``'s local shards, and the noise source's buffers;
- the clipped sums the tracker holds when the optimizer starts privatising (this rank's shards since the sums
  are reduce-scattered at the end of every micro-batch; full size before);
- peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs) above the resident size at the start
  of ``_privatise`` (reduce-scatter or all-reduce, noise, the gradient shards), and above the resident size
  after ``backward()`` for the whole ``optimizer.step()`` (the clipped sums built at flush included: every sum
  now, bucket by bucket; before, flat clipping built them all there and per-layer clipping during backward),
  and above the resident size before the step's forward for the whole step (forward, backward, step).

Workers run with MALLOC_MMAP_THRESHOLD_=65536, so every freed buffer goes back to the OS and resident memory
follows the live tensors. ``--before DIR``: also run the same measurement against another checkout (e.g. a
``git worktree`` of the commit before sharded gradients) for the "before" rows. Writes the "fsdp_memory"
section of benchmarks/RESULTS.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys

from benchmarks._harness import ROOT, proc_status_bytes, reset_rss_peak
from benchmarks._results import write_section

WORLD, PER_RANK, WARMUP = 2, 4, 3
MiB = 2**20


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def _worker(rank: int, port: int, layers: int, width: int, clipping: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dptrain

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    data = torch.utils.data.TensorDataset(torch.randn(64, width), torch.randn(64, width))
    loader = torch.utils.data.DataLoader(data, batch_size=PER_RANK)
    model, optimizer, _ = dptrain.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), data_loader=loader, max_grad_norm=1.0,
        noise_multiplier=1.0, poisson_sampling=False, loss_reduction="mean", clipping=clipping)
    seen = {}
    privatise = optimizer._privatise

    def measured(mechanism):  # peak of the flush so far, then of the privatisation alone
        seen["flush_hwm"] = proc_status_bytes("VmHWM")
        seen["sums_bytes"] = _storage_bytes(optimizer.tracker.clipped_sum.values())
        seen["privatise_entry"] = proc_status_bytes("VmRSS")
        reset_rss_peak()
        privatise(mechanism)
        seen["privatise_hwm"] = proc_status_bytes("VmHWM")

    x, y = data.tensors
    for step in range(WARMUP + 1):
        xs, ys = x[PER_RANK * (WORLD * step + rank):][:PER_RANK], y[PER_RANK * (WORLD * step + rank):][:PER_RANK]
        if step == WARMUP:
            before_forward = proc_status_bytes("VmRSS")
            reset_rss_peak()
        (model(xs) - ys).pow(2).mean(1).mean().backward()
        if step == WARMUP:
            optimizer._privatise = measured
            backward_hwm = proc_status_bytes("VmHWM")
            after_backward = proc_status_bytes("VmRSS")
            reset_rss_peak()
        optimizer.step()
        if step < WARMUP:
            optimizer.zero_grad()
    params = list(model.parameters())
    result = {
        "full_bytes": 4 * sum(p.numel() for p in params),
        "grad_bytes": _storage_bytes([p.grad.to_local() for p in params]),
        "noise_bytes": optimizer._noise.scratch_bytes(),
        "sums_bytes": seen["sums_bytes"],
        "privatise_peak": seen["privatise_hwm"] - seen["privatise_entry"],
        "step_peak": max(seen["flush_hwm"], seen["privatise_hwm"]) - after_backward,
        "whole_peak": max(backward_hwm, seen["flush_hwm"], seen["privatise_hwm"]) - before_forward,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _run(layers: int, width: int, clipping: str, out: str) -> None:
    """One configuration: 2 ranks, results in ``out``/rank*.json (runs in a fresh process)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, layers, width, clipping, out), nprocs=WORLD, join=True)


def measure(layers: int, width: int, clipping: str, checkout: str | None = None) -> dict:
    """Per-rank figures (the larger over ranks) of one configuration, ``dptrain`` imported from ``checkout``."""
    import tempfile

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # dptrain from ``checkout`` first, benchmarks from here
    paths = [checkout] if checkout is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as out:  # run by path: `python -m` would put this checkout's dptrain first
        subprocess.run([sys.executable, __file__, "--run", str(layers), str(width), clipping, out], env=env,
                       check=True, cwd=checkout or os.getcwd())
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def _table(rows) -> str:
    lines = ["| code | clipping | full fp32 | p.grad held / rank | noise buffers / rank | clipped sums at step | "
             "peak in privatise / rank | peak in step / rank | peak in forward to step / rank |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, clipping, r in rows:
        full = r["full_bytes"]

        def cell(key):
            return f"{r[key] / MiB:.1f} MiB ({r[key] / full:.2f}x)"

        lines.append(f"| {label} | {clipping} | {full / MiB:.1f} MiB | {cell('grad_bytes')} | {cell('noise_bytes')} | "
                     f"{cell('sums_bytes')} | {cell('privatise_peak')} | {cell('step_peak')} | {cell('whole_peak')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--before", default=None, help="another checkout to measure as 'before' (e.g. a git worktree)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from dptrain.fsdp import BUCKET_NUMEL
    rows = []
    for clipping in ("flat", "per_layer"):
        rows.append(("sharded (this tree)", clipping, measure(args.layers, args.width, clipping)))
        if args.before:
            rows.append(("before: full-size all-reduce", clipping, measure(args.layers, args.width, clipping,
                                                                           os.path.abspath(args.before))))
    before = ""
    if args.before:
        commit = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown commit"
        before = f" 'before' rows: `--before` checkout at {commit}."
    body = (f"FSDP2, {WORLD} processes on CPU gloo, {args.layers} x Linear({args.width}, {args.width}) (one FSDP unit "
            f"each), {PER_RANK} samples per rank, sigma 1; the step after {WARMUP} warm-up steps. The larger rank is "
            "shown; ratios are to the full fp32 size of the trainable parameters. Peaks are resident memory (VmHWM) "
            "above the start of `_privatise`, above the end of `backward()`, and over the whole measured step "
            "(forward, backward, `optimizer.step()`) above the start of its forward (FSDP2's all-gathered "
            "layers included)." + before + "\n\n" + _table(rows) + "\n\n"
            "This tree builds the clipped sums at the end of every micro-batch one bucket of parameters at a time "
            f"({BUCKET_NUMEL // 2**20 * 4} MiB of fp32), reduce-scatters the bucket and keeps this rank's rows only: "
            "the tracker holds 1/W of the full size. Before, the tracker held the full-size sums of the logical "
            "batch (built at the step with flat clipping, during backward per layer) until the step's "
            "reduce-scatter.")
    print(body)
    if not args.no_write:
        write_section("fsdp_memory", body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        _run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
