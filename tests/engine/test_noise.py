"""The parallel in-place noise source: right distribution, independent streams, reproducible, resumable, and
regenerable from its key alone."""

import collections
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from scipy import stats

from dptrain import native, secure_random
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
    monkeypatch.setattr(GaussianNoise, "CHUNK", 6)  # chunks that straddle tensor boundaries
    split = _draw(GaussianNoise(seed=4), [(5,), (3, 1), (0,), (11,), (2, 2)], std=1.5)
    whole = _draw(GaussianNoise(seed=4), [(23,)], std=1.5)
    assert torch.equal(split, whole)
    assert not torch.equal(whole[:7], whole[7:14])


def test_an_odd_chunk_is_refused(monkeypatch):
    """An odd chunk reads ceil(m / 2) blocks from an odd position: stream k would run into stream k + 1's blocks
    (the same noise on two coordinates, whose difference then carries none)."""
    monkeypatch.setattr(GaussianNoise, "CHUNK", 7)
    with pytest.raises(ValueError, match="CHUNK 7 would split a Box-Muller pair"):
        GaussianNoise(seed=0).add_([torch.zeros(100)], 1.0)


def test_strided_sums_are_refused():
    with pytest.raises(TypeError, match="contiguous"):
        GaussianNoise(seed=0).add_([torch.zeros(4, 3).T], 1.0)


def test_checkpoint_taken_mid_run_resumes_exactly():
    source = GaussianNoise(seed=11)
    _draw(source, [(400_001,)])
    source.sample(3, 1.0)
    state = source.state_dict()
    expected = _draw(source, [(400_000,)]), source.sample(5, 2.0)
    resumed = GaussianNoise(seed=None)
    resumed.load_state_dict(state)
    assert torch.equal(_draw(resumed, [(400_000,)]), expected[0]) and torch.equal(resumed.sample(5, 2.0), expected[1])


def test_a_checkpoint_of_mt19937_streams_is_refused_by_name():
    old = {"cpu": [torch.Generator().get_state() for _ in range(4)]}
    with pytest.raises(ValueError, match="mt19937 states of dptrain before its keystream noise"):
        GaussianNoise().load_state_dict(old)


def test_draws_never_reuse_a_keystream_block(monkeypatch):
    """Independence between draws: every block of the keystream under a key is read at most once, over draws of
    odd and even sizes, several tensors, statistic releases and a resume."""
    reads = []  # (key, first block, blocks)
    keystream = secure_random.Keystream

    class Recording(keystream):
        def __init__(self, workspace=None, *, key=None, block=0):
            super().__init__(workspace, key=key, block=block)
            self.key, self.block = key, block

        def _encrypt(self, size, name):
            assert size % 16 == 0, "a read that ends inside a block"
            reads.append((self.key, self.block, size // 16))
            self.block += size // 16
            return super()._encrypt(size, name)

    monkeypatch.setattr(secure_random, "Keystream", Recording)
    monkeypatch.setattr(GaussianNoise, "CHUNK", 1 << 10)
    source = GaussianNoise(seed=2)
    for shapes in ([(5001,)], [(3,), (7, 9)], [(1,)], [(40_000,)]):
        _draw(source, shapes)
        source.sample(3, 1.0)
    resumed = GaussianNoise()
    resumed.load_state_dict(source.state_dict())
    _draw(resumed, [(999,)])
    used = collections.defaultdict(list)
    for key, first, blocks in reads:
        used[key].extend(range(first, first + blocks))
    assert len(used) == 2, "one key for the sums and one for the releases"
    assert all(len(blocks) == len(set(blocks)) for blocks in used.values()), "a keystream block was read twice"


def test_the_noise_is_the_transform_of_the_keyed_keystream(monkeypatch):
    """The attacker's question: what regenerates the noise? The key and position alone: the noise of a seeded
    source is, value for value, two Box-Muller draws (computed here in fp64) of the AES-CTR keystream under its key
    from block 0 (one chunk per stream: stream k's pairs start at block cuts[k] / 2)."""
    monkeypatch.setattr(GaussianNoise, "CHUNK", 1 << 20)
    source, n = GaussianNoise(seed=6), 10_001
    key, block = source._keystream_at("cpu")
    drawn = _draw(source, [(n,)], std=3.0)
    pairs = (n + 1) // 2
    cuts = [2 * (pairs * k // 4) for k in range(4)] + [n]
    for k in range(4):
        count = cuts[k + 1] - cuts[k]
        words = secure_random.Keystream(key=key, block=block + cuts[k] // 2)._words(4 * ((count + 1) // 2),
                                                                                   torch.int32)
        expected = box_muller_fp64(words, count)
        torch.testing.assert_close(drawn[cuts[k]: cuts[k + 1]].double() / 3.0, expected, rtol=2.0**-18, atol=2.0**-18)
    assert source._blocks["cpu"] == block + pairs


def box_muller_fp64(words: torch.Tensor, n: int) -> torch.Tensor:
    """Oracle: n values, each (r_1 trig_1 + r_2 trig_2) / sqrt(2) of the planes (radius 1, angle 1, radius 2, angle 2)
    of 32-bit words, u = (low 24 bits + 1) 2^-24, in fp64 with Python's math."""
    low = (words.to(torch.int64) & 0xFFFFFF).add_(1).double().mul_(2.0**-24).view(4, -1)
    radius, angle = (-2 * low[0::2].log()).sqrt(), 2 * math.pi * low[1::2]  # (2 draws, pairs)
    halves = torch.cat([(radius * angle.cos()).sum(0), (radius * angle.sin()).sum(0)])
    return halves[:n] * 0.5**0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_c_transform_agrees_with_the_fp64_oracle(seed):
    """Every quadrant and radius: 2^20 keystream words through the C transform against the fp64 formula, within
    about one fp32 rounding of the radii (up to 5.8; torch's reference, which rounds 2 pi u first, within 4)."""
    if native.library() is None:
        pytest.skip("no C compiler here: the torch reference is what runs")
    key = bytes([seed]) * 32
    words = secure_random.Keystream(key=key)._words(1 << 20, torch.int32).clone()
    n = words.numel() // 2 - 1  # odd: the last pair's sine half is dropped
    native_values = secure_random.normals(secure_random.Keystream(key=key), n, 1.0, n + 1).double()
    reference = secure_random.normal_(torch.empty(n), secure_random.Keystream(key=key), 1.0).double()
    oracle = box_muller_fp64(words, n)
    scale = oracle.abs().clamp_min(1.0)
    assert float(((native_values - oracle).abs() / scale).max()) < 2.0**-20
    assert float(((reference - oracle).abs() / scale).max()) < 2.0**-18


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_build_without_per_cpu_clones_agrees_with_the_oracle(tmp_path, monkeypatch):
    """The fallback build for compilers or C libraries without ifunc clones (-DDPTRAIN_PLAIN: baseline x86-64 here)."""
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)
    plain = native._load(native._compile(["cc"], native._FLAGS + ["-DDPTRAIN_PLAIN"]))
    monkeypatch.setattr(native, "library", lambda: plain)
    key, n = bytes(range(32)), 100_001
    words = secure_random.Keystream(key=key)._words(4 * ((n + 1) // 2), torch.int32).clone()
    values = secure_random.normals(secure_random.Keystream(key=key), n, 1.0, n + 1).double()
    oracle = box_muller_fp64(words, n)
    assert float(((values - oracle).abs() / oracle.abs().clamp_min(1.0)).max()) < 2.0**-20


_PLANTED_SCALE_ADD = """
void scale_add(float *out, const float *values, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) out[i] = scale * out[i] + values[i];
}
"""
_PLANTED = {  # libraries an attacker (or a bad build) could leave under the cached name
    "zeros": "for (size_t i = 0; i < 2 * pairs; i++) noise[i] = 0.0f;",
    "wrong values": "for (size_t i = 0; i < 2 * pairs; i++) noise[i] = 0.7071f * (float)(w[i] & 1u);",
    "no tail": "for (size_t i = 0; i < 2 * (pairs - pairs % 16); i++) noise[i] = 0.0f;",
}


def _planted_source(body: str) -> str:
    return ("#include <stddef.h>\n#include <stdint.h>\n"
            "void keystream_normals(const uint32_t *w, size_t pairs, float scale, float *noise) {" + body + "}"
            + _PLANTED_SCALE_ADD)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("kind", sorted(_PLANTED))
def test_the_known_answer_test_refuses_wrong_transforms(kind, tmp_path):
    source = tmp_path / "planted.c"
    source.write_text(_planted_source(_PLANTED[kind]))
    library = tmp_path / "planted.so"
    subprocess.run(["cc", *native._FLAGS, "-o", str(library), str(source)], check=True)
    with pytest.raises(OSError, match="fails its known-answer test"):
        native._load(library)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_library_others_may_write_to_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)
    cached = native._build(["cc"])
    cached.chmod(0o666)
    with pytest.raises(OSError, match="is not a file of this user's alone .* mode 666"):
        native._load(cached)


@pytest.mark.skipif(shutil.which("cc") is None or os.environ.get("DPTRAIN_NATIVE") == "0",
                    reason="needs a C compiler and the C transform")
def test_a_library_planted_in_the_cache_is_refused_and_rebuilt(tmp_path, monkeypatch):
    """The attacker writes a library that adds no noise under the cached name: its known-answer test fails, the
    file is rebuilt from dptrain's source, and the noise is noise."""
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)
    cached = native._build(["cc"])
    planted = tmp_path / "planted.c"
    planted.write_text(_planted_source(_PLANTED["zeros"]))
    subprocess.run(["cc", *native._FLAGS, "-o", str(cached), str(planted)], check=True)
    planted_bytes = cached.read_bytes()
    with pytest.raises(OSError, match="fails its known-answer test"):
        native._load(cached)
    library = native.library
    library.cache_clear()
    try:
        lib = library()
        assert lib is not None and cached.read_bytes() != planted_bytes  # rebuilt in place
        monkeypatch.setattr(native, "library", lambda: lib)
        assert 0.9 < float(_draw(GaussianNoise(seed=1), [(20_000,)]).std()) < 1.1
    finally:
        library.cache_clear()


def test_the_library_is_checked_and_loaded_through_one_open_file(tmp_path, monkeypatch):
    """Nothing can swap the file between the owner check and the load (a parent folder others may write to would
    let them): a link is refused, and the loader gets the descriptor that was checked, not the name again."""
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)
    cached = native._build(["cc"])
    link = tmp_path / "link.so"
    link.symlink_to(cached)
    with pytest.raises(OSError):
        native._load(link)
    opened = []
    load = native.ctypes.CDLL
    monkeypatch.setattr(native.ctypes, "CDLL", lambda name: opened.append(name) or load(name))
    native._load(cached)
    assert opened == [f"/proc/self/fd/{native._LOADED_FDS[-1]}"] and os.path.samefile(opened[0], cached)


def test_a_cache_folder_others_may_write_to_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setattr(native, "_cache_dir", lambda: shared)
    with pytest.raises(PermissionError, match="is not this user's alone .* mode 777"):
        native._private_cache_dir()


def test_without_a_compiler_the_torch_reference_draws_the_same_noise(monkeypatch):
    """The same layout in longer calls: a resume on a machine without a compiler must not recombine the keystream
    blocks of a draw into other values (two releases from the same bits)."""
    monkeypatch.setattr(GaussianNoise, "CHUNK", 1 << 12)
    monkeypatch.setattr(GaussianNoise, "REFERENCE_CHUNK", 5 << 12)
    drawn = _draw(GaussianNoise(seed=9), [(150_001,)])
    monkeypatch.setattr(native, "library", lambda: None)
    fallback = _draw(GaussianNoise(seed=9), [(150_001,)])
    torch.testing.assert_close(fallback, drawn, rtol=0, atol=3e-6)  # the same keystream, torch's log, cos, sin


@pytest.mark.skipif(os.environ.get("DPTRAIN_NATIVE") == "0", reason="the C transform is switched off")
def test_a_missing_compiler_is_warned_about_once(monkeypatch):
    native.library.cache_clear()
    try:
        with monkeypatch.context() as patch:
            patch.setenv("CC", "/nonexistent/cc")
            patch.setattr(native, "_cache_dir", lambda: Path(tempfile.mkdtemp()))
            with pytest.warns(RuntimeWarning, match="C noise transform is unavailable.*nonexistent"):
                assert native.library() is None
            with warnings.catch_warnings(record=True) as again:
                warnings.simplefilter("always")
                assert native.library() is None
            assert again == [], "warned a second time"
    finally:
        native.library.cache_clear()
    assert native.library() is not None or shutil.which("cc") is None


_THREAD_PROBE = """
import os, threading, time, torch
from dptrain.noise import GaussianNoise
torch.set_num_threads(2)
torch.ones(1 << 20).add_(1)  # the training thread's own OpenMP team
before = len(os.listdir("/proc/self/task")), threading.active_count()
source = GaussianNoise(seed=1)
for _ in range(3):  # draws on the pool
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
    exactly the Python threads they start (the pool)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.split()
    os_threads, python_threads = int(out[0]), int(out[1])
    assert os_threads == python_threads
    assert python_threads >= 1 or native.library() is None, "the streams ran on the pool"


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


def test_secure_accelerator_path_draws_a_fresh_keystream_in_bounded_chunks(monkeypatch):
    """Secure mode on an accelerator (run here on CPU tensors): the CPU keystream in chunks of DEVICE_CHUNK / 2
    values across tensor boundaries, every position noised with the right law, a fresh key per draw."""
    monkeypatch.setattr(GaussianNoise, "DEVICE_CHUNK", 2000)
    source = GaussianNoise(secure=True)
    draws = []
    for _ in range(2):
        tensors = [torch.full((700,), 3.0), torch.full((40, 37), 3.0), torch.full((33,), 3.0)]  # 2213 values
        source._draw_and_add_secure_on_device(noise_module._FlatView(tensors), 2.0, 0.5, "dev", torch.device("cpu"))
        draws.append((torch.cat([t.flatten() for t in tensors]) - 1.5) / 2.0)
    assert all(bool((d != 0).all()) for d in draws), "a position was left without noise"
    # fresh entropy each run: a sound sampler fails this once in 10^6 runs
    assert stats.kstest(torch.cat(draws).numpy(), "norm").pvalue > 1e-6
    assert abs(float(torch.corrcoef(torch.stack(draws))[0, 1])) < 5 / 2213**0.5, "two draws shared a key"
    assert source._buffers["dev"].numel() == 1000


def test_insecure_seeds_key_every_rank_and_keystream_apart():
    """manual_seed kept 32 bits of a derived seed, so two ranks' mt19937 streams could collide (rank 833 stream 0 and
    rank 949 stream 1 of seed 24 did): derived keys are 32 bytes of SHAKE-256 of (seed, rank, name)."""
    keys = [GaussianNoise(seed=24, rank=rank)._keystream_at(name)[0] for rank in (833, 949) for name in
            ("cpu", "release")]
    assert len(set(keys)) == len(keys) and all(len(k) == 32 for k in keys)
    assert torch.equal(_draw(GaussianNoise(seed=24, rank=1), [(100,)]), _draw(GaussianNoise(seed=24, rank=1), [(100,)]))
