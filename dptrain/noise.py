"""Gaussian noise for the privatised gradient sums, drawn in place from independent parallel streams.

One CPU generator fills roughly 250M normals a second, so for a model of a few million trainable parameters
the draw alone is several percent of a training step, and a fresh noise tensor per parameter adds page-fault
cost on top. Here the noise of all tensors on one device is drawn into one reused flat buffer, cut into
``STREAMS`` fixed slices, each filled by its own generator on a thread pool. The numbers depend only on the
seed, the rank and the total size, never on the thread count; streams are seeded independently, so the noise
is i.i.d. N(0, std^2) per coordinate as DP-SGD requires.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

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

    def add_(self, tensors: Sequence[torch.Tensor], std: float,
             workspace: Optional[Callable[[int, torch.device], Optional[torch.Tensor]]] = None,
             *, scale: float = 1.0) -> None:
        """tensor <- scale * tensor + N(0, std^2 I) for every tensor (fp32, in place, one pass each), one shared
        draw per device.

        ``workspace(numel, device)`` may lend a scratch fp32 buffer for the draw (None: keep one here)."""
        by_device: Dict[str, List[torch.Tensor]] = {}
        for t in tensors:
            if t.dtype != torch.float32:
                raise TypeError(f"noise is added to fp32 sums, found a {t.dtype} tensor of shape {tuple(t.shape)}")
            by_device.setdefault(str(t.device), []).append(t)
        for key, group in by_device.items():
            total = sum(t.numel() for t in group)
            buffer = workspace(total, group[0].device) if workspace is not None else None
            if buffer is None:
                buffer = self._buffers.get(key)
                if buffer is None or buffer.numel() != total:
                    buffer = self._buffers[key] = torch.empty(total, dtype=torch.float32, device=group[0].device)
            self._fill(buffer, self._generators(group[0].device), std)
            start = 0
            for t in group:
                torch.add(buffer[start : start + t.numel()].view_as(t), t, alpha=scale, out=t)
                start += t.numel()

    def _fill(self, buffer: torch.Tensor, gens: List[torch.Generator], std: float) -> None:
        slices = buffer.tensor_split(len(gens))  # fixed cut: the draw does not depend on the thread count
        jobs = [(s, g) for s, g in zip(slices, gens) if s.numel()]
        workers = min(len(jobs), torch.get_num_threads())
        if workers <= 1:
            for s, g in jobs:
                s.normal_(0.0, std, generator=g)
            return
        list(_pool().map(lambda job: job[0].normal_(0.0, std, generator=job[1]), jobs))

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
