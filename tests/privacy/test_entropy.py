"""The secrets cannot be searched or predicted. torch's CPU ``manual_seed`` keeps only the low 32 bits of a seed (a
brute force over them recovered every noise stream of a released one-step update), and 624 outputs of its mt19937
give the whole state. So every CPU secret is an AES-256 key of 32 bytes read from ``os.urandom``: the noise's (sums
and statistic releases), the Poisson sampler's; no CPU mt19937 is used at all; secure mode keeps none
(tests/privacy/test_secure_random.py).
"""

import os

import pytest
import torch

from dptrain.noise import GaussianNoise, secret_generator
from dptrain.sampling import PoissonBatchSampler


@pytest.fixture
def urandom_reads(monkeypatch):
    reads = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: reads.append(n) or real(n))
    return reads


def test_every_noise_key_is_fresh_os_entropy(urandom_reads):
    """The sums' and the releases' keys are two separate reads of 32 bytes of os.urandom (no seed, no counter)."""
    noise = GaussianNoise()
    keys = [noise._keystream_at(name)[0] for name in ("cpu", "release")]
    assert urandom_reads == [32, 32] and len(set(keys)) == 2
    assert GaussianNoise()._keystream_at("cpu")[0] not in keys


def test_the_sampler_key_is_fresh_os_entropy_and_its_batches_follow_it(urandom_reads):
    sampler = PoissonBatchSampler(500, 0.3, steps=3)
    assert urandom_reads == [32]
    key = sampler.state_dict()["key"]
    assert key.dtype == torch.uint8 and key.numel() == 32
    other = PoissonBatchSampler(500, 0.3, steps=3)
    assert not torch.equal(other.state_dict()["key"], key) and list(other) != list(sampler)


def test_no_cpu_twister_is_handed_out():
    with pytest.raises(ValueError, match="no CPU randomness from torch's mt19937"):
        secret_generator("cpu")


def test_a_saved_secret_state_still_resumes_exactly():
    noise = GaussianNoise()
    a, b = torch.zeros(300), torch.zeros(300)
    state = noise.state_dict()
    noise.add_([a], 1.0)
    again = GaussianNoise()
    again.load_state_dict(state)
    again.add_([b], 1.0)
    assert torch.equal(a, b)
