"""Gaussian noise for the privatised gradient sums, drawn in place from independent parallel streams.

CPU noise is AES-256 in counter mode under a secret key (``secure_random.Keystream``), turned into Gaussians by a
vectorised C transform (``dptrain/csrc``; torch ops where no C compiler is found). The tensors of one device are one
flat vector of n values, which reads the n / 2 keystream blocks after the last draw's (16 bytes: two Box-Muller
draws for a pair of values), cut into ``STREAMS`` fixed slices drawn on a thread pool, ``CHUNK`` values at a time,
each added while still in cache. The numbers depend only on the key, the position, the std and the total size (up
to the last bits of the transform's arithmetic: C or torch), never on the thread count; no keystream block is read
twice, so the coordinates are independent, each the sum of two Box-Muller draws: N(0, std^2) as DP-SGD requires,
except in the tail beyond ~7 std (below).

Two draws per value: a Box-Muller transform of 24-bit uniforms (torch's CPU sampler; CUDA's uses 32 bits) is not a
Gaussian: its values lie on a lattice sparser than the fp32 grid (an attacker who knows the sum tells which of two
neighbouring sums a released pair of coordinates came from) and its tail stops at 5.77 std (a coordinate moved by
|v| leaves the support with probability ~1e-8 sqrt(|v| / std), ~1e-3 a step summed over 5M coordinates). Every value
is therefore the sum of two independent draws of std / sqrt(2), as Opacus's secure mode does with four: the pairs
then fill the grid and the support reaches 8.16 std, the density falling below the Gaussian's from ~7 std (a
probability ~1e-12 per coordinate; docs/architecture.md, "The noise's own floating point").

Entropy: the key comes from ``os.urandom`` (32 bytes); released noise tells nothing of it, where 624 outputs of a
Mersenne Twister give its whole state. An insecure seed (tests and debugging only: whoever knows it can subtract the
noise) makes the key its hash instead. The key and position are SECRET: they regenerate every later draw. Accelerator
tensors draw from torch's generator of their device (Philox), its whole key from OS entropy. With ``secure=True``
each draw (one per logical step) uses a fresh key, on every device, and no state is ever saved, so no file can
reproduce the noise.
"""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch

from dptrain import native, secure_random

__all__ = ["GaussianNoise", "secret_generator"]

_SQRT_HALF = 0.5**0.5
_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=GaussianNoise.STREAMS, thread_name_prefix="dptrain-noise")
    return _POOL


def secret_generator(device) -> torch.Generator:
    """A new generator on the accelerator ``device`` (Philox: its seed is its whole 64-bit key) keyed from OS
    entropy. CPU randomness is a keystream instead: a CPU generator (mt19937) is refused."""
    return _keyed_generator(device, os.urandom(8))


def _keyed_generator(device, key: bytes) -> torch.Generator:
    gen = torch.Generator(device=device)
    if gen.device.type == "cpu":
        raise ValueError("dptrain draws no CPU randomness from torch's mt19937 (624 outputs give its state); CPU noise "
                         "and batches read an AES-256-CTR keystream (secure_random.Keystream)")
    return gen.manual_seed(int.from_bytes(key, "little"))


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
    """Adds N(0, std^2) noise in place to lists of fp32 tensors; ``seed=None`` keys it from OS entropy.

    ``secure=True``: a keystream under a fresh OS-entropy key for every draw, no generator, no saved state (``seed``
    must then be None)."""

    STREAMS = 4  # slices of a CPU draw, each on its own thread when more than one thread may run
    CHUNK = 1 << 16  # values per transform call (even: a pair never straddles two); keystream and noise in cache
    REFERENCE_CHUNK = 1 << 20  # values a call of torch's ops (no C compiler): long calls (29 ms for 5.4M, not 83)
    DEVICE_CHUNK = 1 << 24  # draws per chunk on an accelerator (64 MiB: two calls of half as many values)

    def __init__(self, seed: Optional[int] = None, rank: int = 0, *, secure: bool = False):
        if secure and seed is not None:
            raise ValueError(f"secure noise draws fresh OS entropy for every step; found a fixed seed {seed!r}")
        self.seed, self.rank, self.secure = seed, rank, bool(secure)
        self._keys: Dict[str, bytes] = {}  # CPU keystreams by name ("cpu", "release"): the AES key (SECRET)
        self._blocks: Dict[str, int] = {}  # ... and the next unused block of each
        if not secure:  # keyed now, so that a state saved before the first draw resumes it exactly
            for name in ("cpu", "release"):
                self._keys[name] = secure_random.new_key(None if seed is None else f"{seed}/{rank}/{name}")
                self._blocks[name] = 0
        self._generators: Dict[str, torch.Generator] = {}  # an accelerator's generator, by device
        self._buffers: Dict[str, torch.Tensor] = {}
        self._work = [dict() for _ in range(self.STREAMS)]  # each stream thread's keystream buffers, reused

    def _keystream_at(self, name: str) -> "tuple[bytes, int]":
        """The key and first free block of the CPU keystream ``name``: a fresh key for every secure draw."""
        return (secure_random.new_key(), 0) if self.secure else (self._keys[name], self._blocks[name])

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = (secret_generator(device) if self.seed is None else
                                     _derived_generator(self.seed, self.rank, device))
        return self._generators[key]

    def sample(self, n: int, std: float) -> torch.Tensor:
        """n values of N(0, std^2) in float64 on the CPU from a keystream of their own (released statistics)."""
        key, block = self._keystream_at("release")
        out = secure_random.normal_(torch.empty(n, dtype=torch.float64), secure_random.Keystream(key=key, block=block),
                                    std)
        if not self.secure:
            self._blocks["release"] = block + secure_random.normal_bytes(n, torch.float64) // 16
        return out

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
            if device.type == "cpu":
                self._draw_and_add(flat, std, scale)
            elif self.secure:
                self._draw_and_add_secure_on_device(flat, std, scale, key, device)
            else:
                self._draw_and_add_on_device(self._generator(device), flat, std, scale, key, device)

    def _draw_and_add(self, flat: "_FlatView", std: float, scale: float) -> None:
        """The CPU path: stream k adds values [cuts[k], cuts[k + 1]) from the keystream block P + cuts[k] / 2 on, in
        blocks of CHUNK values (value j and j + CHUNK / 2 of a block share a Box-Muller pair), one block a call of
        the C transform, ``REFERENCE_CHUNK`` values a call of the torch reference: the same layout either way."""
        if self.CHUNK % 2:
            raise ValueError(f"CHUNK {self.CHUNK} would split a Box-Muller pair and read blocks twice; expected even")
        key, start = self._keystream_at("cpu")
        step = self.CHUNK if native.library() is not None else self.CHUNK * max(1, self.REFERENCE_CHUNK // self.CHUNK)
        pairs = (flat.numel + 1) // 2
        cuts = [2 * (pairs * k // self.STREAMS) for k in range(self.STREAMS)] + [flat.numel]

        def job(k: int) -> None:
            stream = secure_random.Keystream(self._work[k], key=key, block=start + cuts[k] // 2)
            for lo, hi in _chunks(cuts[k], cuts[k + 1], step):
                flat.add_(lo, secure_random.normals(stream, hi - lo, std, self.CHUNK), scale)

        _run_streams(job, [k for k in range(self.STREAMS) if cuts[k + 1] > cuts[k]])
        if not self.secure:
            self._blocks["cpu"] = start + pairs

    def _draw_and_add_secure_on_device(self, flat: "_FlatView", std: float, scale: float, key: str,
                                       device: torch.device) -> None:
        """Secure mode on an accelerator: a fresh keystream (made on the CPU, copied), ``DEVICE_CHUNK / 2`` values a
        call."""
        stream = secure_random.Keystream(self._work[0])
        scratch = self._scratch(key, min(flat.numel, self.DEVICE_CHUNK // 2), device)
        for lo, hi in _chunks(0, flat.numel, self.DEVICE_CHUNK // 2):
            flat.add_(lo, secure_random.normal_(scratch[: hi - lo], stream, std), scale)

    def _draw_and_add_on_device(self, gen, flat: "_FlatView", std: float, scale: float, key: str,
                                device: torch.device) -> None:
        """An accelerator's path: one generator, ``DEVICE_CHUNK`` draws per chunk (full-width kernels already),
        so the scratch stays that size instead of a second fp32 copy of the model's sums."""
        scratch = self._scratch(key, _draws(min(flat.numel, self.DEVICE_CHUNK // 2)), device)
        for lo, hi in _chunks(0, flat.numel, self.DEVICE_CHUNK // 2):
            flat.add_(lo, _normal_(scratch, hi - lo, std, gen), scale)

    def _scratch(self, key: str, numel: int, device: torch.device) -> torch.Tensor:
        """The reused fp32 buffer ``key``, ``numel`` values."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the old one first
            buffer = self._buffers[key] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer[:numel]

    def scratch_bytes(self) -> int:
        """Bytes this source keeps between draws (chunk buffers: a fixed size, not a copy of the sums)."""
        tensors = [*self._buffers.values(), *(t for work in self._work for t in work.values()
                                              if isinstance(t, torch.Tensor))]
        raw = sum(len(b) for work in self._work for b in work.values() if isinstance(b, (bytes, bytearray)))
        return raw + sum(t.untyped_storage().nbytes() for t in tensors)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Keys and positions of the CPU keystreams, an accelerator's generator states: SECRET. Empty in secure
        mode: nothing that could regenerate the noise is ever saved."""
        if self.secure:
            return {}
        state = {name: {"key": torch.frombuffer(bytearray(key), dtype=torch.uint8), "block": self._blocks[name]}
                 for name, key in self._keys.items()}
        state.update({device: gen.get_state() for device, gen in self._generators.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.secure:  # fresh entropy anyway: a saved state (if any) is not used
            return
        for name, saved in state.items():
            if name in ("cpu", "release"):
                if not isinstance(saved, dict):
                    raise ValueError(f"checkpoint holds the {name} noise as {type(saved).__name__} (mt19937 states "
                                     f"of dptrain before its keystream noise), expected a key and a block")
                self._keys[name], self._blocks[name] = bytes(saved["key"].tolist()), int(saved["block"])
            else:
                self._generator(torch.device(name)).set_state(saved)


def _derived_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """An insecure seed's accelerator generator for (rank, device): its key from SHAKE-256 of them."""
    return _keyed_generator(device, secure_random.new_key(f"{seed}/{rank}/{device}", 8))


def _run_streams(job, streams: List[int]) -> None:
    """``job(k)`` for every stream k: on the thread pool when more than one can run at a time and the C transform
    does the work (torch ops on the pool's threads would each start an OpenMP team: with more OpenMP threads alive
    than cores, libgomp stops spin-waiting and every later parallel op of the training thread pays a futex wake-up)."""
    if min(len(streams), torch.get_num_threads()) <= 1 or native.library() is None:
        for k in streams:
            job(k)
    else:
        list(_pool().map(job, streams))


def _chunks(lo: int, hi: int, size: int):
    """[lo, hi) in pieces of ``size`` (the last one shorter): the generator calls of one stream."""
    return ((start, min(start + size, hi)) for start in range(lo, hi, size))


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
            target, piece = part[start - offset : stop - offset], values[start - first : stop - first]
            lib = native.library() if target.device.type == "cpu" else None
            if lib is None:
                torch.add(piece, target, alpha=scale, out=target)
            else:  # serial on the calling thread
                lib.scale_add(target.data_ptr(), piece.data_ptr(), target.numel(), scale)
            start, i = stop, i + 1
