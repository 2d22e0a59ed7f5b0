"""The secret generators cannot be searched: torch's CPU ``manual_seed`` keeps only the low 32 bits of a seed, so
a generator seeded that way (even from OS entropy) is one of 2^32 states, and a brute force over them recovered
every noise stream of a released one-step update. Every secret mt19937 generator (the Poisson sampler's) must hold a
full-entropy state instead, and every CPU noise key 32 bytes of OS entropy; secure mode holds neither
(tests/privacy/test_secure_random.py).

Oracle: mt19937's seeding recurrence. A state set by ``manual_seed(s)`` has word[0] = s mod 2^32 and
word[i] = 1812433253 * (word[i-1] ^ (word[i-1] >> 30)) + i mod 2^32; a state drawn from 19968 random bits
satisfies it with probability 2^-32 per word.
"""

import os

import pytest
import torch

from dptrain.noise import GaussianNoise, secret_generator
from dptrain.sampling import PoissonBatchSampler

_OFFSET, _WORDS = 24, 624  # CPU generator state: seed u64, left i32, seeded i32, next u64, state[624] u64


def mt_words(gen: torch.Generator) -> list:
    raw = gen.get_state()[_OFFSET: _OFFSET + 8 * _WORDS].view(torch.int64)
    return [int(w) & 0xFFFFFFFF for w in raw]


def seeded_words_follow(words: list) -> int:
    """How many consecutive words follow mt19937's seeding recurrence from word[0]."""
    count = 0
    for i in range(1, len(words)):
        prev = words[i - 1]
        if words[i] != (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF:
            break
        count += 1
    return count


def test_the_oracle_recognises_a_manual_seed_state_even_from_a_63_bit_seed():
    gen = torch.Generator().manual_seed(0x7FFF_1234_5678_9ABC)
    assert seeded_words_follow(mt_words(gen)) == _WORDS - 1
    assert mt_words(gen)[0] == 0x5678_9ABC  # only the low 32 bits survive: 2^32 candidates


def _secret_cpu_generators():
    return {
        "sampler": [PoissonBatchSampler(100, 0.1).generator],
        "secret_generator": [secret_generator()],
    }


@pytest.mark.parametrize("name", list(_secret_cpu_generators()))
def test_every_secret_generator_holds_a_full_entropy_state(name):
    gens = _secret_cpu_generators()[name]
    for gen in gens:
        words = mt_words(gen)
        assert seeded_words_follow(words) == 0, f"{name}: a manual_seed state (32 bits of entropy)"
        assert len(set(words)) > 600  # 624 independent words (a collision among them has probability ~5e-5)
        assert gen.initial_seed() == 0  # the state's seed field tells nothing
    assert len({tuple(mt_words(g)) for g in gens}) == len(gens)  # streams never share a state


def test_full_entropy_draws_are_standard_normal_and_uniform():
    """Closed forms: N(0, 1) mean 0 and variance 1, U(0, 1) mean 1/2 and variance 1/12 (n = 10^6: 5 sigma)."""
    gen = secret_generator()
    x = torch.randn(10**6, generator=gen, dtype=torch.float64)
    u = torch.rand(10**6, generator=gen, dtype=torch.float64)
    assert abs(float(x.mean())) < 5e-3 and abs(float(x.var()) - 1) < 8e-3
    assert abs(float(u.mean()) - 0.5) < 1.5e-3 and abs(float(u.var()) - 1 / 12) < 4e-4


def test_every_noise_key_is_fresh_os_entropy(monkeypatch):
    """The sums' and the releases' keys are two separate reads of 32 bytes of os.urandom (no seed, no counter)."""
    reads = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: reads.append(n) or real(n))
    noise = GaussianNoise()
    keys = [noise._keystream_at(name)[0] for name in ("cpu", "release")]
    assert reads == [32, 32] and len(set(keys)) == 2
    assert GaussianNoise()._keystream_at("cpu")[0] not in keys


def test_a_saved_secret_state_still_resumes_exactly():
    noise = GaussianNoise()
    a, b = torch.zeros(300), torch.zeros(300)
    state = noise.state_dict()
    noise.add_([a], 1.0)
    again = GaussianNoise()
    again.load_state_dict(state)
    again.add_([b], 1.0)
    assert torch.equal(a, b)
