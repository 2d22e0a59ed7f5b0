"""Gaussian noise for the privatised gradient sums, drawn in place from independent parallel streams.

One CPU generator fills roughly 250M normals a second, so for a model of a few million trainable parameters
the draw alone is several percent of a training step, and a full-size noise buffer costs a cold extra pass on
top. Here the tensors of one device are treated as one flat vector cut into ``STREAMS`` fixed slices; each
slice is drawn by its own generator on a thread pool, ``CHUNK`` values at a time into a small scratch buffer,
and each chunk is added to its tensors while it is still in cache. The numbers depend only on the seed, the
rank and the total size, never on the thread count; streams are seeded independently, so the noise is i.i.d.
N(0, std^2) per coordinate as DP-SGD requires.
"""

from __future__ import annotations

import bisect
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["GaussianNoise"]

_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=GaussianNoise.STREAMS, thread_name_prefix="dptrain-noise")
    return _POOL


class GaussianNoise:
    """Adds N(0, std^2) noise in place to lists of fp32 tensors; ``seed=None`` seeds from OS entropy."""

    STREAMS = 4  # per CPU device; a CUDA device uses one stream (the kernel is parallel already)
    CHUNK = 1 << 17  # values drawn at a time per CPU stream (512 KiB: still in the core's cache when added)

    def __init__(self, seed: Optional[int] = None, rank: int = 0):
        self.seed, self.rank = seed, rank
        self._streams: Dict[str, List[torch.Generator]] = {}
        self._buffers: Dict[str, torch.Tensor] = {}

    def _generators(self, device: torch.device) -> List[torch.Generator]:
        key = str(device)
        if key not in self._streams:
            gens = []
            for k in range(self.STREAMS if device.type == "cpu" else 1):
                gen = torch.Generator(device=device)
                if self.seed is None:
                    gen.seed()
                else:  # a distinct seed per (seed, rank, device, stream): ranks and streams never share noise
                    digest = hashlib.sha256(f"{self.seed}/{self.rank}/{key}/{k}".encode()).digest()
                    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                gens.append(gen)
            self._streams[key] = gens
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
            gens = self._generators(device)
            if device.type != "cpu":  # one draw: the device kernel is parallel already
                buffer = self._scratch(key, flat.numel, device)
                buffer.normal_(0.0, std, generator=gens[0])
                flat.add_(0, buffer, scale)
                continue
            scratch = self._scratch(key, len(gens) * self.CHUNK, device).view(len(gens), self.CHUNK)
            cuts = [flat.numel * k // len(gens) for k in range(len(gens) + 1)]  # fixed: independent of threads

            def job(k: int) -> None:
                for lo in range(cuts[k], cuts[k + 1], self.CHUNK):
                    chunk = scratch[k, : min(self.CHUNK, cuts[k + 1] - lo)]
                    chunk.normal_(0.0, std, generator=gens[k])
                    flat.add_(lo, chunk, scale)  # while the chunk is still in cache

            jobs = [k for k in range(len(gens)) if cuts[k + 1] > cuts[k]]
            if min(len(jobs), torch.get_num_threads()) <= 1:
                for k in jobs:
                    job(k)
            else:
                list(_pool().map(job, jobs))

    def _scratch(self, key: str, numel: int, device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer[:numel]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {key: [g.get_state() for g in gens] for key, gens in self._streams.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, states in state.items():
            gens = self._generators(torch.device(key))
            if len(states) != len(gens):
                raise ValueError(f"checkpoint has {len(states)} noise streams for {key}, this version uses {len(gens)}")
            for gen, s in zip(gens, states):
                gen.set_state(s)


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
