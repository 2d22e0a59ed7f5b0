"""The parallel in-place noise source: right distribution, independent streams, reproducible, resumable."""

import pytest
import torch
from scipy import stats

from dptrain.noise import GaussianNoise


def _draw(source, shapes, std=1.0):
    tensors = [torch.zeros(s) for s in shapes]
    source.add_(tensors, std)
    return torch.cat([t.flatten() for t in tensors])


def test_noise_is_iid_gaussian_with_the_requested_std():
    draw = _draw(GaussianNoise(seed=3), [(300, 200), (1000,), (7, 11, 13)], std=2.5)
    assert stats.kstest(draw.numpy() / 2.5, "norm").pvalue > 1e-3
    quarter = draw.numel() // 4  # the stream boundaries: neighbouring slices are uncorrelated
    slices = draw[: 4 * quarter].view(4, quarter)
    corr = torch.corrcoef(slices)
    assert (corr - torch.eye(4)).abs().max() < 5 / quarter**0.5


def test_noise_is_added_in_place_to_the_existing_values():
    t = torch.full((1000,), 5.0)
    GaussianNoise(seed=0).add_([t], 0.01)
    assert abs(float(t.mean()) - 5.0) < 0.01 and 0.005 < float(t.std()) < 0.015


def test_scale_multiplies_the_existing_values_in_the_same_pass():
    values = torch.linspace(-3.0, 3.0, 2000)
    scaled, plain = values.clone(), values.clone()
    GaussianNoise(seed=5).add_([scaled], 0.2, scale=0.25)
    GaussianNoise(seed=5).add_([plain], 0.2)
    torch.testing.assert_close(scaled - plain, values * (0.25 - 1.0), rtol=0, atol=1e-6)  # same draw, t scaled


def test_same_seed_same_noise_whatever_the_thread_count():
    shapes = [(4000,), (50, 60)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _draw(GaussianNoise(seed=7), shapes)
        torch.set_num_threads(2)
        two = _draw(GaussianNoise(seed=7), shapes)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert not torch.equal(one, _draw(GaussianNoise(seed=8), shapes))
    assert not torch.equal(one, _draw(GaussianNoise(seed=7, rank=1), shapes)), "ranks never share noise"


def test_unseeded_sources_differ():
    assert not torch.equal(_draw(GaussianNoise(), [(100,)]), _draw(GaussianNoise(), [(100,)]))


def test_state_dict_resumes_the_stream_exactly():
    source = GaussianNoise(seed=1)
    _draw(source, [(500,)])
    state = source.state_dict()
    expected = _draw(source, [(500,)])
    resumed = GaussianNoise(seed=None)
    resumed.load_state_dict(state)
    assert torch.equal(_draw(resumed, [(500,)]), expected)


def test_non_fp32_sums_are_refused():
    with pytest.raises(TypeError, match="fp32"):
        GaussianNoise(seed=0).add_([torch.zeros(3, dtype=torch.float64)], 1.0)


def test_noise_depends_on_the_total_size_only_not_on_how_it_is_split(monkeypatch):
    monkeypatch.setattr(GaussianNoise, "CHUNK", 7)  # chunks that straddle tensor boundaries
    split = _draw(GaussianNoise(seed=4), [(5,), (3, 1), (0,), (11,), (2, 2)], std=1.5)
    whole = _draw(GaussianNoise(seed=4), [(23,)], std=1.5)
    assert torch.equal(split, whole)
    assert not torch.equal(whole[:7], whole[7:14])


def test_strided_sums_are_refused():
    with pytest.raises(TypeError, match="contiguous"):
        GaussianNoise(seed=0).add_([torch.zeros(4, 3).T], 1.0)
