"""Gaussian noise for the privatised gradient sums, drawn in place from independent parallel streams.

One CPU generator fills roughly 250M normals a second, so for a model of a few million trainable parameters
the draw alone is several percent of a training step. Two things hide that cost on a CPU:

- Parallel streams: the tensors of one device are one flat vector cut into ``STREAMS`` fixed slices, each drawn
  by its own generator, ``CHUNK`` values at a call (on a thread pool, each chunk added while still in cache).
- Prefetch: the noise does not depend on the data, so right after one step's noise is added, the start of the
  next step's (same size and std) is drawn into a buffer by a thread of the lowest scheduling class (Linux
  ``SCHED_IDLE``), which runs only on cycles the training step leaves idle. The next ``add_`` adds what it drew
  and draws the rest itself if the size and std still match; otherwise the streams are rewound and drawn anew.
  How far ahead it may draw adapts: twice what it managed last time (so its buffer stays small in a loop with
  no idle cycles, and grows to the whole draw where there are pauses).

Either way the numbers depend only on the generators' states, the std and the total size, never on the thread
count or on whether the prefetch was used (the same generator calls in the same order); streams are seeded
independently, so the noise is i.i.d. N(0, std^2) per coordinate as DP-SGD requires. A prefetched draw is never
released: the checkpoint state is the generators' state from before it.

Two draws per value: torch's samplers are Box-Muller transforms of 24-bit (CPU fp32) or 32-bit (CUDA) uniforms, so
one draw is not a Gaussian: its values lie on a lattice sparser than the fp32 grid (an attacker who knows the sum
tells which of two neighbouring sums a released pair of coordinates came from) and its tail stops at 5.77 std (CPU:
a coordinate moved by |v| leaves the support with probability ~1e-8 sqrt(|v| / std), ~1e-3 a step summed over 5M
coordinates). Every value is therefore the sum of two independent draws of std / sqrt(2) (``_normal_``), as
Opacus's secure mode does with four: the pairs then fill the grid and the support reaches 8.16 std
(docs/architecture.md, "The noise's own floating point").

Entropy: every stream's whole state comes from the operating system's entropy (``os.urandom``): all 19968 bits
of a CPU generator's mt19937 state (its ``manual_seed`` keeps only the low 32 bits of a seed, few enough to try
them all), the 64-bit Philox key of a CUDA one. An insecure seed (tests and debugging only: whoever knows it can
subtract the noise) fills them from its hash instead. The generator states are SECRET:
they let anyone regenerate every later draw. With ``secure=True`` no generator is used: each draw (one per logical
step) reads an AES-256-CTR keystream under a fresh key (``secure_random``), whose outputs predict nothing of each
other (a Twister's do), and no state is ever saved, so no file can reproduce the noise.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import hashlib
import os
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch

from dptrain import secure_random

__all__ = ["GaussianNoise", "secret_generator", "reseed_from_entropy"]

_SQRT_HALF = 0.5**0.5
_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=GaussianNoise.STREAMS, thread_name_prefix="dptrain-noise")
    return _POOL


_MT_WORDS = 624  # mt19937's state: 624 32-bit words
_MT_STATE_OFFSET = 24  # CPU generator state bytes: seed u64, left i32, seeded i32, next u64, then state[624] u64


def reseed_from_entropy(gen: torch.Generator) -> torch.Generator:
    """Sets the whole state of ``gen`` from OS entropy: the 624 words of a CPU mt19937 (``initial_seed()`` then
    reads 0 and tells nothing), the 64-bit seed of a CUDA Philox generator (offset 0). Returns ``gen``."""
    return _set_whole_state(gen, os.urandom)


def _set_whole_state(gen: torch.Generator, random_bytes) -> torch.Generator:
    """``gen``'s whole state from ``random_bytes(n)`` (OS entropy, or an insecure seed's hash: ``manual_seed``
    would keep 32 bits of it, so two derived CPU seeds could collide)."""
    if gen.device.type != "cpu":
        gen.manual_seed(int.from_bytes(random_bytes(8), "little"))  # Philox: the seed is the whole key
        return gen
    state = torch.zeros_like(gen.get_state())  # (5056,) uint8; the cached normal samples after the words: invalid
    words = torch.frombuffer(bytearray(random_bytes(4 * _MT_WORDS)), dtype=torch.int32).to(torch.int64)
    words = words & 0xFFFFFFFF  # (624,) uint32 values, each stored in a u64 slot
    state[_MT_STATE_OFFSET: _MT_STATE_OFFSET + 8 * _MT_WORDS] = words.view(torch.uint8)
    state[8:16] = torch.tensor([1, 1], dtype=torch.int32).view(torch.uint8)  # left = 1 (twist first), seeded
    gen.set_state(state)
    return gen


def secret_generator(device="cpu") -> torch.Generator:
    """A new generator on ``device`` whose whole state comes from OS entropy (``reseed_from_entropy``)."""
    return reseed_from_entropy(torch.Generator(device=device))


def _draws(n: int) -> int:
    """Values ``_normal_`` draws for n: two calls of at least 16."""
    return 2 * max(n, 16)


def _normal_(scratch: torch.Tensor, n: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """``scratch[:n]`` <- n values of N(0, std^2), each the sum of two independent draws of std / sqrt(2) (why two:
    the module docstring). The draws are two generator calls of at least 16 values, so no value adds up one
    Box-Muller pair: torch pairs j and j + 8 within a call of 16 or more (one call of 16 for 8 values would sum each
    with its partner) and, below 16, caches a partner for the next call. ``scratch`` holds ``_draws(n)`` values."""
    m = _draws(n) // 2
    first, second = scratch[:m], scratch[m: 2 * m]
    first.normal_(0.0, std * _SQRT_HALF, generator=gen)
    second.normal_(0.0, std * _SQRT_HALF, generator=gen)
    return first[:n].add_(second[:n])


class GaussianNoise:
    """Adds N(0, std^2) noise in place to lists of fp32 tensors; ``seed=None`` seeds from OS entropy.

    ``secure=True``: a keystream under a fresh OS-entropy key for every draw, no generator, no saved state (``seed``
    must then be None)."""

    STREAMS = 4  # per CPU device; a CUDA device uses one stream (the kernel is parallel already)
    # Values per generator call (2 draws each: 128 KiB, still in the core's cache when added). Its ops stay below
    # torch's parallel grain (32768) on purpose: an op the helper threads run is then serial, and never starts an
    # OpenMP team of its own (with more OpenMP threads alive than cores, libgomp stops spin-waiting and every later
    # parallel op of the training thread pays a futex wake-up: AdamW took 1.6x as long for the rest of the process).
    CHUNK = 1 << 14
    PREFETCH = hasattr(os, "SCHED_IDLE")  # CPU only; needs an idle-class thread or it would steal compute
    PREFETCH_MAX_NUMEL = 1 << 24  # 64 MiB: larger models draw synchronously rather than hold a second copy
    PREFETCH_START = 1 << 20  # values a first prefetch may draw (4 MiB); then twice what the last one drew
    DEVICE_CHUNK = 1 << 24  # draws per chunk on an accelerator (64 MiB: two calls of half as many values)
    SECURE_CHUNK = 1 << 18  # values per call of a secure draw (its temporaries: ~10 MiB)
    SECURE_READ_AHEAD = 16  # chunks whose keystream is encrypted in one call (32 MiB)

    def __init__(self, seed: Optional[int] = None, rank: int = 0, *, secure: bool = False):
        if secure and seed is not None:
            raise ValueError(f"secure noise draws fresh OS entropy for every step; found a fixed seed {seed!r}")
        self.seed, self.rank, self.secure = seed, rank, bool(secure)
        self._streams: Dict[str, List[torch.Generator]] = {}
        self._buffers: Dict[str, torch.Tensor] = {}
        self._prefetch: Dict[str, _Prefetch] = {}
        self._prefetch_limit: Dict[str, int] = {}  # how far the next prefetch may draw
        self._worker: Optional[_IdleWorker] = None
        self._secure_work: dict = {}  # secure keystreams' buffers, kept from draw to draw

    def _generators(self, device: torch.device) -> List[torch.Generator]:
        key = str(device)
        if key not in self._streams:
            gens = []
            for k in range(self.STREAMS if device.type == "cpu" else 1):
                if self.seed is None:
                    gens.append(secret_generator(device))
                else:  # a whole state per (seed, rank, device, stream): ranks and streams never share noise
                    gens.append(_derived_generator(self.seed, self.rank, key, k, device))
            self._streams[key] = gens
        return self._streams[key]

    def sample(self, n: int, std: float) -> torch.Tensor:
        """n values of N(0, std^2) in float64 on the CPU from a stream of their own (released statistics)."""
        if self.secure:
            stream = secure_random.Keystream(self._secure_work)
            return secure_random.normal_(torch.empty(n, dtype=torch.float64), stream, std)
        (gen,) = self._generators_named("release")
        return _normal_(torch.empty(_draws(n), dtype=torch.float64), n, std, gen)

    def _generators_named(self, key: str) -> List[torch.Generator]:
        if key not in self._streams:
            self._streams[key] = [secret_generator() if self.seed is None else
                                  _derived_generator(self.seed, self.rank, key, 0, "cpu")]
        return self._streams[key]

    def add_(self, tensors: Sequence[torch.Tensor], std: float, *, scale: float = 1.0) -> None:
        """tensor <- scale * tensor + N(0, std^2 I) for every tensor (fp32, contiguous; in place, one pass)."""
        by_device: Dict[str, List[torch.Tensor]] = {}
        for t in tensors:
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError(f"noise is added in place to contiguous fp32 sums, found a {t.dtype} tensor of "
                                f"shape {tuple(t.shape)} (contiguous: {t.is_contiguous()})")
            by_device.setdefault(str(t.device), []).append(t)
        for key, group in by_device.items():
            device, flat = group[0].device, _FlatView(group)
            if self.secure:
                self._draw_and_add_secure(flat, std, scale, device)
                continue
            gens = self._generators(device)
            if device.type != "cpu":
                self._draw_and_add_on_device(gens[0], flat, std, scale, key, device)
                continue
            cuts = self._cuts(flat.numel, len(gens))
            prefetch = self._take_prefetch(key, flat.numel, std)
            if prefetch is not None:
                starts = prefetch.stop()  # the generators continue from there
                for k in range(len(gens)):
                    flat.add_(cuts[k], prefetch.buffer[cuts[k]: starts[k]], scale)
                drawn = sum(b - a for a, b in zip(cuts, starts))
                self._prefetch_limit[key] = max(self.PREFETCH_START, 2 * drawn)
            else:
                starts = cuts[:-1]
            self._draw_and_add(gens, flat, std, scale, key, cuts, starts)
            if self.PREFETCH and 0 < flat.numel <= self.PREFETCH_MAX_NUMEL:
                limit = min(flat.numel, self._prefetch_limit.get(key, self.PREFETCH_START))
                buffer = self._scratch("prefetch:" + key, limit, device, shrink=True)  # follows the limit
                prefetch = _Prefetch(gens, cuts, std, buffer, self.CHUNK)
                if self._worker is None:
                    self._worker = _IdleWorker(self)
                self._worker.submit(prefetch.run)
                self._prefetch[key] = prefetch

    def _draw_and_add_secure(self, flat: "_FlatView", std: float, scale: float, device: torch.device) -> None:
        """Secure mode: one keystream under a fresh key for the whole draw, ``SECURE_CHUNK`` values at a time
        (torch's parallel ops on the training thread; no prefetch, no generator)."""
        stream = secure_random.Keystream(self._secure_work)
        scratch = self._scratch("secure:" + str(device), min(flat.numel, self.SECURE_CHUNK), device)
        chunks = list(_chunks(0, flat.numel, self.SECURE_CHUNK))
        for w in range(0, len(chunks), self.SECURE_READ_AHEAD):  # the keystream of several chunks in one call
            window = chunks[w: w + self.SECURE_READ_AHEAD]
            stream.read_ahead(sum(secure_random.normal_bytes(hi - lo, torch.float32) for lo, hi in window))
            for lo, hi in window:
                flat.add_(lo, secure_random.normal_(scratch[: hi - lo], stream, std), scale)

    def _draw_and_add_on_device(self, gen, flat: "_FlatView", std: float, scale: float, key: str,
                                device: torch.device) -> None:
        """An accelerator's path: one generator, ``DEVICE_CHUNK`` draws per chunk (full-width kernels already),
        so the scratch stays that size instead of a second fp32 copy of the model's sums."""
        scratch = self._scratch(key, _draws(min(flat.numel, self.DEVICE_CHUNK // 2)), device)
        for lo, hi in _chunks(0, flat.numel, self.DEVICE_CHUNK // 2):
            flat.add_(lo, _normal_(scratch, hi - lo, std, gen), scale)

    def _draw_and_add(self, gens, flat: "_FlatView", std: float, scale: float, key: str, cuts: List[int],
                      starts: List[int]) -> None:
        """The synchronous path: stream k draws its slice from ``starts[k]`` on, CHUNK values at a time, each
        added while in cache."""
        draws = _draws(self.CHUNK)
        scratch = self._scratch(key, len(gens) * draws, torch.device("cpu")).view(len(gens), draws)

        def job(k: int) -> None:
            for lo, hi in _chunks(starts[k], cuts[k + 1], self.CHUNK):
                flat.add_(lo, _normal_(scratch[k], hi - lo, std, gens[k]), scale)

        _run_streams(job, [k for k in range(len(gens)) if cuts[k + 1] > starts[k]])

    @staticmethod
    def _cuts(numel: int, streams: int) -> List[int]:
        """Fixed stream boundaries of the flat vector: independent of threads."""
        return [numel * k // streams for k in range(streams + 1)]

    def _take_prefetch(self, key: str, numel: int, std: float) -> Optional["_Prefetch"]:
        """The pending prefetch if it was made for this size and std; else None, the streams rewound to before it."""
        prefetch = self._prefetch.pop(key, None)
        if prefetch is None:
            return None
        if prefetch.matches(numel, std):
            return prefetch
        prefetch.cancel()
        return None

    def _scratch(self, key: str, numel: int, device: torch.device, shrink: bool = False) -> torch.Tensor:
        """The reused fp32 buffer ``key``, ``numel`` values; ``shrink``: replaced when over 4x too large."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or (shrink and buffer.numel() > 4 * numel):
            self._buffers.pop(key, None)  # free the old one first
            buffer = self._buffers[key] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer[:numel]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Generator states (SECRET); a pending prefetch is not part of them (it is redrawn after a resume).
        Empty in secure mode: nothing that could regenerate the noise is ever saved."""
        if self.secure:
            return {}
        return {key: (self._prefetch[key].states if key in self._prefetch else [g.get_state() for g in gens])
                for key, gens in self._streams.items()}

    def load_state_dict(self, state: dict) -> None:
        if self.secure:  # fresh entropy anyway: a saved state (if any) is not used
            return
        for key, states in state.items():
            gens = self._generators_named(key) if key == "release" else self._generators(torch.device(key))
            if len(states) != len(gens):
                raise ValueError(f"checkpoint has {len(states)} noise streams for {key}, this version uses {len(gens)}")
            prefetch = self._prefetch.pop(key, None)
            if prefetch is not None:
                prefetch.cancel()
            for gen, s in zip(gens, states):
                gen.set_state(s)


def _derived_generator(seed: int, rank: int, key: str, stream: int, device) -> torch.Generator:
    """An insecure seed's generator for (rank, device, stream): its whole state from SHAKE-256 of them."""
    name = f"{seed}/{rank}/{key}/{stream}".encode()
    return _set_whole_state(torch.Generator(device=device), lambda n: hashlib.shake_256(name).digest(n))


def _run_streams(job, streams: List[int]) -> None:
    """``job(k)`` for every stream k: on the thread pool when more than one can run at a time."""
    if min(len(streams), torch.get_num_threads()) <= 1:
        for k in streams:
            job(k)
    else:
        list(_pool().map(job, streams))


def _chunks(lo: int, hi: int, size: int):
    """[lo, hi) in pieces of ``size`` (the last one shorter): the generator calls of one stream."""
    return ((start, min(start + size, hi)) for start in range(lo, hi, size))


class _IdleWorker:
    """A thread in the idle scheduling class that runs prefetch jobs in order. Started once per noise source
    (starting a thread costs milliseconds on a busy machine); it ends with its source, and at exit between two
    chunks, before the interpreter is torn down. If the idle class is refused, jobs are left to the next ``add_``."""

    def __init__(self, owner: "GaussianNoise"):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, args=(self._jobs,), name="dptrain-noise-prefetch",
                                        daemon=True)
        self._thread.start()
        weakref.finalize(owner, self._jobs.put, None)
        for thread in [t for t in _THREADS if not t.is_alive()]:
            del _THREADS[thread]
        _THREADS[self._thread] = self._jobs  # joined at exit even after its source is gone

    def submit(self, job) -> None:
        self._jobs.put(job)

    @staticmethod
    def _loop(jobs: "queue.SimpleQueue") -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only: runs on idle cycles
            idle = True
        except OSError:  # not allowed here: never compete with training, skip the jobs
            idle = False
        while True:
            job = jobs.get()
            if job is None:
                return
            if idle and not _EXITING.is_set():
                job()
            del job  # its tensors are freed here, never by a daemon thread during interpreter shutdown


_EXITING = threading.Event()  # jobs stop between chunks once set
_THREADS: "Dict[threading.Thread, queue.SimpleQueue]" = {}


@atexit.register
def _stop_workers() -> None:
    """Join every prefetch thread before the interpreter is torn down (a daemon thread that frees a tensor during
    finalization aborts the process), lifting it out of the idle class so it ends soon on a busy machine."""
    _EXITING.set()
    for thread, jobs in list(_THREADS.items()):
        jobs.put(None)
        try:
            os.sched_setscheduler(thread.native_id, os.SCHED_OTHER, os.sched_param(0))
        except (OSError, TypeError):  # already ended (native_id None) or not permitted
            pass
        thread.join()


class _Prefetch:
    """The start of the next step's draw, made by an idle-class thread that the training thread never waits for.

    The thread takes streams in order and draws each chunk into its own scratch, committing it to ``buffer``
    (positions of the flat vector below ``len(buffer)``, with the generator state after it) under a lock unless
    the prefetch was stopped. ``stop`` ends it and leaves every stream's generator at its last committed state
    (a fresh generator for a stream in progress: the thread may still hold the old one), for the caller to draw
    the rest. Same calls, same order as the synchronous path, so the same numbers. ``states`` are the
    generators' states before the prefetch (rewind, checkpoints).
    """

    def __init__(self, gens: List[torch.Generator], cuts: List[int], std: float, buffer: torch.Tensor, chunk: int):
        self.gens, self.cuts, self.std, self.buffer, self.chunk = gens, cuts, std, buffer, chunk
        self.states = [g.get_state() for g in gens]
        self._done = list(cuts[:-1])  # per stream: drawn and committed up to here
        self._resume = list(self.states)  # per stream: generator state at _done
        self._untaken = collections.deque(k for k in range(len(gens)) if cuts[k + 1] > cuts[k])
        self._lock = threading.Lock()
        self._stopped = False

    def matches(self, numel: int, std: float) -> bool:
        return numel == self.cuts[-1] and std == self.std

    def _take(self) -> Optional[int]:
        with self._lock:
            return None if self._stopped or not self._untaken else self._untaken.popleft()

    def run(self) -> None:
        """The idle thread's part: stream after stream, chunk after chunk, until stopped or the buffer is full."""
        scratch = torch.empty(_draws(self.chunk), dtype=torch.float32)
        while (k := self._take()) is not None:
            gen = self.gens[k]
            for lo, hi in _chunks(self.cuts[k], self.cuts[k + 1], self.chunk):
                if self._stopped or _EXITING.is_set() or hi > len(self.buffer):  # consumed, cancelled, full, exiting
                    return
                values = _normal_(scratch, hi - lo, self.std, gen)
                with self._lock:
                    if self._stopped:
                        return
                    self.buffer[lo:hi].copy_(values)
                    self._done[k], self._resume[k] = hi, gen.get_state()

    def stop(self) -> List[int]:
        """End the prefetch (without waiting for the thread); returns per stream how far it was drawn, every
        generator of ``gens`` being at that point."""
        with self._lock:
            self._stopped = True
            taken = [k for k in range(len(self.gens)) if k not in self._untaken]
        for k in taken:  # the thread may still be inside a call on these generators: continue on fresh ones
            if self._done[k] < self.cuts[k + 1]:
                self.gens[k] = _generator_at(self._resume[k])
        return list(self._done)

    def cancel(self) -> None:
        """Stop, and rewind the streams to before this draw (on fresh generators, for the same reason)."""
        with self._lock:
            self._stopped = True
        for k, state in enumerate(self.states):
            self.gens[k] = _generator_at(state)


def _generator_at(state: torch.Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


class _FlatView:
    """Several tensors seen as one flat vector; ``add_(start, values, scale)`` sets t <- scale * t + values on
    the positions [start, start + len(values)), across tensor boundaries."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.parts = [t.view(-1) for t in tensors]
        self.offsets = [0]
        for t in self.parts:
            self.offsets.append(self.offsets[-1] + t.numel())
        self.numel = self.offsets[-1]

    def add_(self, start: int, values: torch.Tensor, scale: float) -> None:
        first, end = start, start + values.numel()
        i = bisect.bisect_right(self.offsets, start) - 1
        while start < end:
            part, offset = self.parts[i], self.offsets[i]
            stop = min(end, offset + part.numel())
            target = part[start - offset : stop - offset]
            torch.add(values[start - first : stop - first], target, alpha=scale, out=target)
            start, i = stop, i + 1
