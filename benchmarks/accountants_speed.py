"""Accountant speed and agreement: our RDP / PLD vs dp_accounting's PLD and Opacus' PRV, same run.

Run: python -m benchmarks.accountants_speed            (about 5 minutes on 2 cores; --quick for a smoke run)
Writes the "accountants" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings

from benchmarks._harness import timed
from benchmarks._results import write_section

from dptrain.accountants import PLDAccountant, RDPAccountant, calibrate_noise, compute_epsilon
from dptrain.accountants import _pld_math, rdp

warnings.simplefilter("ignore")


def clear_caches():
    """Each timing starts cold: no cached per-step RDP vectors or PLDs."""
    rdp._rdp_cached.cache_clear()
    _pld_math.step_pld.cache_clear()


def dp_accounting_pld(q, sigma, steps, delta, h=1e-4):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=h)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def dp_accounting_calibrate(q, steps, delta, target, h=1e-4):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    return dp_accounting.calibrate_dp_mechanism(
        lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=h),
        lambda s: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps),
        target, delta, bracket_interval=dp_accounting.ExplicitBracketInterval(0.3, 20.0), tol=1e-3,
    )


def opacus_prv(q, sigma, steps, delta):
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def opacus_prv_calibrate(q, steps, delta, target):
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                accountant="prv", epsilon_tolerance=0.01 * target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid (smoke test)")
    args = parser.parse_args()
    lines = []

    # 1. RDP: one epsilon for 2e5 steps, cold cache
    rdp_times = []
    for q, sigma in [(1e-4, 0.5), (1e-3, 1.0), (0.01, 2.0), (0.256, 1.5), (1.0, 5.0)]:
        clear_caches()
        _, dt = timed(lambda: RDPAccountant().step(noise_multiplier=sigma, sample_rate=q, steps=200_000)
                      .get_epsilon(1e-5))
        rdp_times.append(dt)
    lines += ["### RDP epsilon, 2e5 steps (cold cache, 197 orders 1.1..4096)", "",
              f"- max {1e3 * max(rdp_times):.1f} ms, median {1e3 * sorted(rdp_times)[2]:.1f} ms over 5 settings "
              f"(target < 50 ms)", ""]

    # 2. PLD epsilon over the grid q x sigma x steps x delta
    qs = [1e-4, 1e-2, 1.0] if args.quick else [1e-4, 1e-3, 1e-2, 0.1, 1.0]
    sigmas = [0.5, 5.0] if args.quick else [0.5, 1.0, 2.0, 5.0]
    steps_list = [1000, 200_000]
    deltas = [1e-5, 1e-7]
    worst = (0.0, None)
    times = []
    for q, sigma, steps, delta in itertools.product(qs, sigmas, steps_list, deltas):
        clear_caches()
        eps, dt = timed(lambda: PLDAccountant().step(noise_multiplier=sigma, sample_rate=q, steps=steps)
                        .get_epsilon(delta))
        times.append(dt)
        if dt > worst[0]:
            worst = (dt, (q, sigma, steps, delta, eps))
    times.sort()
    lines += [f"### PLD epsilon over {len(times)} settings (q in {qs}, sigma in {sigmas}, steps in {steps_list}, "
              f"delta in {deltas}; cold cache)", "",
              f"- median {times[len(times) // 2]:.3f} s, max {worst[0]:.3f} s at (q, sigma, steps, delta) = "
              f"{worst[1][:4]} (target < 2 s)", ""]

    # 3. agreement and speed against dp_accounting PLD (h = 1e-4) and Opacus PRV on the same settings
    compare = [(1e-3, 1.0, 10_000, 1e-5), (0.01, 1.0, 10_000, 1e-6), (0.1, 2.0, 5000, 1e-5),
               (0.256, 1.5, 3000, 1e-5), (1e-4, 0.5, 200_000, 1e-5)]
    if args.quick:
        compare = compare[:2]
    lines += ["### epsilon: ours vs dp_accounting PLD (h=1e-4) and Opacus PRV", "",
              "| q | sigma | steps | delta | RDP | PLD (ours) | s | dp_accounting PLD | s | Opacus PRV | s "
              "| ours/dpa - 1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for q, sigma, steps, delta in compare:
        clear_caches()
        e_rdp = compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta)
        e_ours, t_ours = timed(lambda: compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps,
                                                        delta=delta, accountant="pld"))
        e_dpa, t_dpa = timed(lambda: dp_accounting_pld(q, sigma, steps, delta))
        try:
            e_prv, t_prv = timed(lambda: opacus_prv(q, sigma, steps, delta))
        except Exception as err:  # noqa: BLE001 -- report, do not stop the benchmark
            e_prv, t_prv = float("nan"), float("nan")
            print(f"Opacus PRV failed on {(q, sigma, steps, delta)}: {err}", file=sys.stderr)
        lines.append(f"| {q:g} | {sigma:g} | {steps} | {delta:g} | {e_rdp:.5g} | {e_ours:.6g} | {t_ours:.2f} | "
                     f"{e_dpa:.6g} | {t_dpa:.2f} | {e_prv:.6g} | {t_prv:.2f} | {e_ours / e_dpa - 1:+.2e} |")
        print(lines[-1], flush=True)
    lines.append("")

    # 4. calibration of sigma: ours (PLD) vs dp_accounting PLD vs Opacus PRV
    calib = [(1e-3, 10_000, 1e-5, 1.0), (0.01, 10_000, 1e-6, 3.0), (1e-4, 200_000, 1e-5, 2.0)]
    if args.quick:
        calib = calib[:1]
    lines += ["### calibration of sigma for a target epsilon", "",
              "| q | steps | delta | target eps | ours PLD sigma | s | eps(sigma) | dp_accounting sigma | s "
              "| speed-up | Opacus PRV sigma | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for q, steps, delta, target in calib:
        clear_caches()
        s_ours, t_ours = timed(lambda: calibrate_noise(target_epsilon=target, sample_rate=q, steps=steps,
                                                        delta=delta, accountant="pld"))
        e_check = compute_epsilon(sample_rate=q, noise_multiplier=s_ours, steps=steps, delta=delta, accountant="pld")
        s_dpa, t_dpa = timed(lambda: dp_accounting_calibrate(q, steps, delta, target))
        try:
            s_prv, t_prv = timed(lambda: opacus_prv_calibrate(q, steps, delta, target))
        except Exception as err:  # noqa: BLE001
            s_prv, t_prv = float("nan"), float("nan")
            print(f"Opacus PRV calibration failed on {(q, steps, delta, target)}: {err}", file=sys.stderr)
        lines.append(f"| {q:g} | {steps} | {delta:g} | {target:g} | {s_ours:.5f} | {t_ours:.2f} | {e_check:.5f} | "
                     f"{s_dpa:.5f} | {t_dpa:.2f} | {t_dpa / t_ours:.1f}x | {s_prv:.5f} | {t_prv:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", "Notes: ours and dp_accounting are both pessimistic (upper bounds); a negative difference means "
              "ours is tighter. Opacus PRV uses its default eps_error=0.01 and is not an upper bound. Timings on a "
              "shared machine are noisy; cold caches for every timing."]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("accountants", body)


if __name__ == "__main__":
    main()
