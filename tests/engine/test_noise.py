"""The parallel in-place noise source: right distribution, independent streams, reproducible, resumable."""

import os
import threading
import time

import pytest
import torch
from scipy import stats

from dptrain import noise as noise_module
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


def _steps(prefetch, calls, monkeypatch, seed=3):
    """One source, several add_ calls of (size, std, pause after); the drawn noise of each."""
    monkeypatch.setattr(GaussianNoise, "PREFETCH", prefetch)
    source, out = GaussianNoise(seed=seed), []
    for size, std, pause in calls:
        out.append(_draw(source, [(size,)], std))
        time.sleep(pause)
    return out


# (size, std, pause): taken over mid-draw (no pause), finished in the background, a new std, a new size
PREFETCH_CALLS = [(300_007, 1.0, 0.0), (300_007, 1.0, 0.2), (300_007, 1.0, 0.0), (300_007, 2.0, 0.01),
                  (100_000, 2.0, 0.0), (100_000, 2.0, 0.0)]


@pytest.mark.skipif(not GaussianNoise.PREFETCH, reason="prefetch needs Linux SCHED_IDLE")
@pytest.mark.parametrize("start", [1 << 20, 3 << 12], ids=["whole", "partial"])
def test_prefetched_noise_is_the_noise_drawn_on_demand(monkeypatch, start):
    monkeypatch.setattr(GaussianNoise, "CHUNK", 1 << 12)  # many chunks: the takeover lands mid-stream
    monkeypatch.setattr(GaussianNoise, "PREFETCH_START", start)  # partial: 3 chunks, then twice what was drawn
    on_demand = _steps(False, PREFETCH_CALLS, monkeypatch)
    prefetched = _steps(True, PREFETCH_CALLS, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(on_demand, prefetched))


@pytest.mark.skipif(not GaussianNoise.PREFETCH, reason="prefetch needs Linux SCHED_IDLE")
def test_a_stream_the_prefetch_left_half_done_is_continued_where_it_stopped(monkeypatch):
    monkeypatch.setattr(GaussianNoise, "CHUNK", 1000)  # 4 streams of 2500: 3 chunks each
    committed, release = threading.Event(), threading.Event()
    chunks = noise_module._chunks

    def pausing_chunks(lo, hi, size):  # the prefetch thread stops after committing stream 0's first chunk
        for i, piece in enumerate(chunks(lo, hi, size)):
            if i == 1 and threading.current_thread().name == "dptrain-noise-prefetch":
                committed.set()
                release.wait(10)
            yield piece

    monkeypatch.setattr(noise_module, "_chunks", pausing_chunks)
    on_demand = _steps(False, [(10_000, 1.0, 0.0)] * 2, monkeypatch)
    monkeypatch.setattr(GaussianNoise, "PREFETCH", True)
    source = GaussianNoise(seed=3)
    first = _draw(source, [(10_000,)])
    assert committed.wait(10)
    second = _draw(source, [(10_000,)])  # takes stream 0 over from its second chunk, on a fresh generator
    release.set()
    assert torch.equal(first, on_demand[0]) and torch.equal(second, on_demand[1])


@pytest.mark.skipif(not GaussianNoise.PREFETCH, reason="prefetch needs Linux SCHED_IDLE")
def test_prefetch_runs_in_the_idle_class_or_not_at_all(monkeypatch):
    policies = []

    def refuse(pid, policy, param):
        policies.append(policy)
        raise PermissionError("not here")

    background_draws = []
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(noise_module._Prefetch, "run", lambda self: background_draws.append(self))
    on_demand = _steps(False, PREFETCH_CALLS[:3], monkeypatch)
    refused = _steps(True, PREFETCH_CALLS[:3], monkeypatch)  # the training thread draws it all itself
    time.sleep(0.1)  # time for a worker that ignored the refusal to run its jobs
    assert policies and set(policies) == {os.SCHED_IDLE}
    assert background_draws == [], "a worker outside the idle class must not compete with training"
    assert all(torch.equal(a, b) for a, b in zip(on_demand, refused))


def test_checkpoint_taken_while_a_prefetch_is_pending_resumes_exactly():
    source = GaussianNoise(seed=11)
    _draw(source, [(400_000,)])  # starts prefetching the next draw
    state = source.state_dict()
    expected = _draw(source, [(400_000,)])
    resumed = GaussianNoise(seed=None)
    resumed.load_state_dict(state)
    assert torch.equal(_draw(resumed, [(400_000,)]), expected)


_THREAD_PROBE = """
import os, threading, time, torch
from dptrain.noise import GaussianNoise
torch.set_num_threads(2)
torch.ones(1 << 20).add_(1)  # the training thread's own OpenMP team
before = len(os.listdir("/proc/self/task")), threading.active_count()
source = GaussianNoise(seed=1)
for _ in range(3):  # on-demand draws on the pool, prefetches on the idle thread
    source.add_([torch.zeros(1_000_000)], 1.0)
    time.sleep(0.2)
after = len(os.listdir("/proc/self/task")), threading.active_count()
print(after[0] - before[0], after[1] - before[1])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="counts Linux threads of torch's OpenMP backend")
def test_noise_threads_start_no_openmp_team_of_their_own():
    """An op a helper thread runs in parallel gives it an OpenMP team; with more OpenMP threads than cores, libgomp
    stops spin-waiting and every parallel op of training pays a wake-up. The OS threads the draws add must be
    exactly the Python threads they start (pool and prefetch thread)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.split()
    os_threads, python_threads = int(out[0]), int(out[1])
    assert python_threads >= 1 and os_threads == python_threads


@pytest.mark.skipif(not GaussianNoise.PREFETCH, reason="prefetch needs Linux SCHED_IDLE")
def test_prefetch_buffer_follows_what_the_idle_thread_manages(monkeypatch):
    """A loop without idle cycles keeps a small buffer (twice what was drawn ahead); pauses let it grow to the
    whole draw, doubling each step."""
    monkeypatch.setattr(GaussianNoise, "CHUNK", 1 << 10)
    monkeypatch.setattr(GaussianNoise, "PREFETCH_START", 1 << 12)
    size, source = 1 << 16, GaussianNoise(seed=2)
    limits = []
    for _ in range(6):  # the idle thread gets time: every prefetch fills its buffer
        _draw(source, [(size,)])
        prefetch = source._prefetch["cpu"]
        limits.append(len(prefetch.buffer))
        deadline = time.monotonic() + 10
        while sum(d - c for d, c in zip(prefetch._done, prefetch.cuts)) < len(prefetch.buffer):
            assert time.monotonic() < deadline, "the idle thread never filled the prefetch buffer"
            time.sleep(0.01)
    assert limits == [1 << 12, 1 << 13, 1 << 14, 1 << 15, 1 << 16, 1 << 16]
    monkeypatch.setattr(noise_module._Prefetch, "run", lambda self: None)  # no idle cycles at all
    _draw(source, [(size,)])  # the last prefetch (whole) was used; the next one cannot draw anything
    _draw(source, [(size,)])
    assert len(source._prefetch["cpu"].buffer) == 1 << 12


def test_accelerator_path_draws_in_bounded_chunks_covering_every_position(monkeypatch):
    """The path CUDA tensors take (run here on CPU tensors): chunks of DEVICE_CHUNK values across tensor
    boundaries, every position noised once with the right law, consecutive chunks independent, and a scratch of
    one chunk, not a second copy of the sums."""
    monkeypatch.setattr(GaussianNoise, "DEVICE_CHUNK", 1000)
    source = GaussianNoise(seed=5)
    tensors = [torch.full((700,), 3.0), torch.full((40, 37), 3.0), torch.full((33,), 3.0)]  # 2213 values
    gen = torch.Generator().manual_seed(11)
    source._draw_and_add_on_device(gen, noise_module._FlatView(tensors), 2.0, 0.5, "dev", torch.device("cpu"))
    draw = (torch.cat([t.flatten() for t in tensors]) - 1.5) / 2.0  # scale 0.5 applied to the old values
    assert bool((draw != 0).all()), "a position was left without noise"
    assert stats.kstest(draw.numpy(), "norm").pvalue > 1e-3
    corr = torch.corrcoef(draw[:2000].view(2, 1000))[0, 1]
    assert abs(float(corr)) < 5 / 1000**0.5, "two chunks drew the same values"
    assert source._buffers["dev"].numel() == 1000


def test_insecure_seeds_set_whole_generator_states():
    """manual_seed keeps 32 bits of a derived seed, so two (rank, stream) pairs could share a state (rank 833 stream
    0 and rank 949 stream 1 of seed 24 did): every derived CPU stream now holds a whole 624-word state."""
    states = {}
    for rank in (833, 949):
        for k, gen in enumerate(GaussianNoise(seed=24, rank=rank)._generators(torch.device("cpu"))):
            states[(rank, k)] = bytes(gen.get_state()[24: 24 + 8 * 624].numpy())  # the 624 words, not the seed field
    assert len(set(states.values())) == len(states)
    assert torch.equal(_draw(GaussianNoise(seed=24, rank=1), [(100,)]), _draw(GaussianNoise(seed=24, rank=1), [(100,)]))
