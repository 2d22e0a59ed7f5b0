"""What the noise costs: dptrain's sources against one torch draw, alone and right after a parallel GEMM.

    python -m benchmarks.noise_speed             # writes the "noise_speed" section of RESULTS.md
    python -m benchmarks.noise_speed --reps 10   # quicker

Three ways to add N(0, 1) to an fp32 vector of engine_speed's GPT-2 size (5.4M values), 2 threads:

- one torch draw: ``normal_`` of the whole vector (what dptrain drew before every value became two draws; a
  Box-Muller of 24-bit uniforms whose tail stops at 5.77 std: docs/architecture.md);
- two torch draws: two ``normal_`` calls of std / sqrt(2) summed (dptrain's sound noise as torch would draw it);
- default: ``GaussianNoise.add_``, AES-256-CTR keystream turned into two Box-Muller draws per value by the C
  transform, 4 streams on the thread pool;
- secure: the same under a fresh key per draw;
- torch reference: the default with the C transform switched off (no compiler): Box-Muller in torch's ops.

Each is timed alone and right after a (2048 x 2048) GEMM on both threads, as a step's noise follows its backward:
libgomp's worker then spins on the second core for a while and the noise threads share it. Every repetition runs
the methods in rotating order; medians and quartiles over repetitions.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks._harness import rotation, timed
from benchmarks._results import write_section

VALUES = 5_400_000  # engine_speed's GPT-2: its trainable parameters


def _methods(values: torch.Tensor) -> dict:
    from dptrain import native
    from dptrain.noise import GaussianNoise

    default, secure, reference = GaussianNoise(), GaussianNoise(secure=True), GaussianNoise()
    generator, second = torch.Generator().manual_seed(0), torch.empty_like(values)

    def two_torch_draws():
        values.normal_(0.0, 0.5**0.5, generator=generator).add_(second.normal_(0.0, 0.5**0.5, generator=generator))

    def torch_reference():
        library, native.library = native.library, lambda: None
        try:
            reference.add_([values], 1.0)
        finally:
            native.library = library

    return {
        "one torch draw": lambda: values.normal_(0.0, 1.0, generator=generator),
        "two torch draws": two_torch_draws,
        "default (keystream, C transform)": lambda: default.add_([values], 1.0),
        "secure (fresh key, C transform)": lambda: secure.add_([values], 1.0),
        "torch reference (no compiler)": torch_reference,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.reps < 2:
        parser.error(f"--reps must be at least 2 (quartiles need two timings), found {args.reps}")
    torch.set_num_threads(2)
    values = torch.zeros(VALUES)
    methods = _methods(values)
    a = torch.randn(2048, 2048)
    conditions = {"alone": lambda: None, "after a parallel GEMM": lambda: a @ a}
    times = {(c, m): [] for c in conditions for m in methods}
    for turn in range(args.reps + 1):
        for condition, before in conditions.items():
            for name in rotation(list(methods), turn):
                before()
                _, seconds = timed(methods[name])
                if turn:  # the first turn warms up
                    times[condition, name].append(seconds * 1e3)
    rows = ["| condition | method | median ms | quartiles ms |", "|---|---|---|---|"]
    for (condition, name), ms in times.items():
        q1, _, q3 = statistics.quantiles(ms, n=4)
        rows.append(f"| {condition} | {name} | {statistics.median(ms):.1f} | {q1:.1f}-{q3:.1f} |")
    body = (f"N(0, 1) added to {VALUES:,} fp32 values, 2 threads, {args.reps} repetitions in rotating order. "
            "Every dptrain row: two Box-Muller draws per value from an AES-256-CTR keystream (the module "
            "docstring).\n\n" + "\n".join(rows))
    print(body)
    write_section("noise_speed", body)


if __name__ == "__main__":
    main()
