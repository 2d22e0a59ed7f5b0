"""The attacker who knows the clipped sum checks whether a released value could have come from the noise sampler.

torch's CPU sampler is a Box-Muller transform of 24-bit uniforms (53-bit in fp64) in blocks of 16: values j and j + 8
of a block are r cos(theta), r sin(theta) with exp(-r^2 / 2) = 1 - k 2^-24 for an integer k. Given a released pair
and a hypothesis for the sum under it, the attacker subtracts the sum, inverts r and measures how far
2^24 exp(-r^2 / 2) is from an integer. Where r >= 4 the inversion is sharp (~0.01): the true hypothesis lands on
integers, a neighbouring one (the sum moved by a clipped sample spread over the coordinates) uniformly. One draw per
value loses to this; dptrain's noise (two draws per value) must look like the wrong hypothesis under the true one.
"""

import pytest
import torch

from dptrain import noise as noise_module
from dptrain.noise import GaussianNoise

N = 1 << 21  # noise values: ~180 tail pairs (r >= 4) per million values
UNIFORM_RESIDUAL = 0.25  # mean distance to the nearest integer of a uniform real
UNIFORM_SE_PER_PAIR = (1 / 48) ** 0.5  # its standard deviation


def lattice_residual(values: torch.Tensor, mantissa_bits: int, block: int = 16) -> tuple:
    """(mean distance of 2^bits exp(-r^2 / 2) to an integer over the tail pairs, their count) for values of unit
    std whose Box-Muller partners are j and j + block / 2 of each block (torch's CPU samplers: 16)."""
    blocks = values.to(torch.float64).view(-1, 2, block // 2)  # (N / block, partner, block / 2)
    r_sq = blocks[:, 0] ** 2 + blocks[:, 1] ** 2  # (N / block, block / 2)
    tail = r_sq[r_sq >= 16.0]
    scaled = torch.exp(-tail / 2) * 2.0**mantissa_bits
    return float((scaled - scaled.round()).abs().mean()), tail.numel()


def spread_sample(seed: int) -> torch.Tensor:
    """A clipped sample of norm 1 spread evenly over N coordinates with random signs (the neighbour's difference)."""
    signs = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs.to(torch.float32) / N**0.5


def test_the_attack_tells_the_true_sum_from_its_neighbour_on_one_torch_draw():
    """The attack's power, on torch's sampler as dptrain used it before two draws per value."""
    noise = torch.empty(N).normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    released = noise  # the true sum is 0 here; its neighbour is -v
    true_residual, pairs = lattice_residual(released, 24)
    wrong_residual, _ = lattice_residual(released + spread_sample(1), 24)
    se = UNIFORM_SE_PER_PAIR / pairs**0.5
    assert pairs > 200
    assert true_residual < 0.05, "the sampler's lattice is visible under the true sum"
    assert abs(wrong_residual - UNIFORM_RESIDUAL) < 5 * se, "and invisible under a neighbouring one"


@pytest.mark.parametrize("secure", [False, True])
def test_dptrain_noise_hides_the_lattice_under_the_true_sum(secure):
    released = torch.zeros(N)
    source = GaussianNoise(secure=True) if secure else GaussianNoise(seed=0)
    source.add_([released], 1.0)  # the true sum 0 plus the noise a step adds
    # the partners: j and j + CHUNK / 2 of each block of CHUNK values (stream slices, N / 4, are whole blocks here)
    residual, pairs = lattice_residual(released, 24, GaussianNoise.CHUNK)
    se = UNIFORM_SE_PER_PAIR / pairs**0.5
    assert pairs > 200
    assert abs(residual - UNIFORM_RESIDUAL) < 5 * se, f"mean residual {residual:.4f} over {pairs} pairs"


def test_released_statistics_hide_the_fp64_lattice():
    """Statistic releases are float64: the same attack at 53 bits, on one fp64 draw and on dptrain's."""
    one_draw = torch.randn(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    residual, pairs = lattice_residual(one_draw, 53)
    assert pairs > 200 and residual < 0.05, "one fp64 draw shows its lattice"
    for source in (GaussianNoise(seed=0), GaussianNoise(secure=True)):
        residual, pairs = lattice_residual(source.sample(N, 1.0), 53, N)  # one call: partners j, j + N / 2
        assert abs(residual - UNIFORM_RESIDUAL) < 5 * UNIFORM_SE_PER_PAIR / pairs**0.5


@pytest.mark.parametrize("n", [1, 8])
def test_no_value_adds_up_one_box_muller_pair(n):
    """The accelerators' path (torch's generators): two draws in one call of 2 n would pair each value with its own
    partner, r (cos + sin), whose tail still stops at one draw's edge: at n = 8 the call is one block of 16 (partners
    j, j + 8), at n = 1 torch's small-size path returns a pair's second value from its cache. Oracle: the call of 2 n
    torch makes from the same state."""
    one_call = torch.empty(2 * n).normal_(0.0, 0.5**0.5, generator=torch.Generator().manual_seed(3))
    partner_sums = one_call[:n] + one_call[n:]
    values = noise_module._normal_(torch.empty(noise_module._draws(n)), n, 1.0, torch.Generator().manual_seed(3))
    assert not torch.isclose(values, partner_sums).any()
