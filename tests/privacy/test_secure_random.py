"""Secure mode's random bits: AES-256-CTR under fresh keys, never a Twister; exact Bernoulli rates, Gaussian noise."""

import pytest
import torch
from scipy import stats

from dptrain import secure_random
from dptrain.noise import GaussianNoise
from dptrain.sampling import PoissonBatchSampler
from dptrain.sampling_rate import realizable_rate

P_FLOOR = 1e-6  # fresh entropy every run: a sound sampler fails a test at this level once in a million runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secure_normals_are_gaussian_with_the_requested_std(dtype):
    draw = secure_random.normal_(torch.empty(1 << 20, dtype=dtype), secure_random.Keystream(), 2.5)
    assert draw.dtype == dtype and draw.shape == (1 << 20,)
    assert stats.kstest(draw.numpy() / 2.5, "norm").pvalue > P_FLOOR
    partners = draw.view(2, -1)  # value i and i + n/2 share their Box-Muller pairs: uncorrelated all the same
    assert abs(float(torch.corrcoef(partners)[0, 1])) < 5 / 2**9.5


def test_keystreams_never_repeat_and_odd_lengths_are_whole():
    a, b = secure_random.Keystream(), secure_random.Keystream()
    first = a.uniforms(64, torch.float64).clone()  # a view of the stream's buffer otherwise
    assert not torch.equal(first, a.uniforms(64, torch.float64)) and not torch.equal(first, b.uniforms(64, torch.float64))
    odd = secure_random.normal_(torch.full((7,), float("nan")), a, 1.0)
    assert odd.isfinite().all()


def test_secure_bernoulli_realises_exactly_the_rate():
    rate, n = realizable_rate(0.3), 1 << 22
    mask = secure_random.bernoulli_mask(secure_random.Keystream(), n, rate)
    assert stats.binomtest(int(mask.sum()), n, rate).pvalue > P_FLOOR
    with pytest.raises(ValueError, match="2\\^-53"):
        secure_random.bernoulli_mask(secure_random.Keystream(), 8, 0.1)  # not on the grid: realizable_rate first


def test_secure_mode_never_draws_from_a_twister(monkeypatch):
    """Whoever knows 624 outputs of a Mersenne Twister knows the rest: secure mode must not touch one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a torch generator was used in secure mode")

    for name in ("normal_", "uniform_", "random_", "bernoulli_"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for name in ("rand", "randn", "randint", "randperm", "normal", "bernoulli"):
        monkeypatch.setattr(torch, name, refuse)
    source = GaussianNoise(secure=True)
    sums = [torch.zeros(3000), torch.zeros(7, 9)]
    source.add_(sums, 1.0)
    assert all(bool(s.ne(0).all()) for s in sums)
    assert source.sample(5, 1.0).dtype == torch.float64
    batches = list(PoissonBatchSampler(1000, 0.5, steps=3, secure=True))
    assert len(batches) == 3 and all(300 < len(b) < 700 for b in batches)


def test_a_keystream_opened_at_a_block_is_the_tail_of_the_one_from_block_zero():
    """The noise seeks: stream k of a draw opens the keystream at its own block. Oracle: AES-256 of the counter
    blocks themselves (ECB), big-endian as CTR counts."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    whole = secure_random.Keystream(key=key)._words(64, torch.int32).clone()  # 16 blocks
    assert torch.equal(secure_random.Keystream(key=key, block=5)._words(8, torch.int32), whole[20:28])
    counters = b"".join(b.to_bytes(16, "big") for b in range(16))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(counters)
    assert torch.equal(torch.frombuffer(bytearray(ecb), dtype=torch.int32), whole)
    with pytest.raises(ValueError, match="32 bytes, found 16"):
        secure_random.Keystream(key=bytes(16))
