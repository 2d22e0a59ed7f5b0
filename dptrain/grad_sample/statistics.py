"""The per-sample norms of a micro-batch, checked once at its end.

Clipping logs every norm vector it computes; the check at the end of the micro-batch (one synchronisation
instead of one per group) refuses a NaN or inf norm, naming the layers, and otherwise counts the clipped
samples per group. Both counts are private: they leave the library only through a noised release.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import nn

__all__ = ["NormEntry", "NormLog", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """A per-sample gradient norm was NaN or inf; the logical batch is dropped, nothing is accounted."""


class NormEntry(NamedTuple):
    group: str  # the group the clipped samples are counted for
    max_norm: float
    norms: torch.Tensor  # (b,) per-sample norms
    parts: Dict[nn.Parameter, torch.Tensor]  # {p: (b,) squared norms}, to name the layer of a NaN
    blame: Optional[nn.Parameter]  # the fused weight, whose squared norms are not in ``parts``


class NormLog:
    """This micro-batch's norm entries, and the samples and clipped counts since the last statistics reset."""

    def __init__(self, group_names: List[str], count_clipped: bool):
        self._group_names = group_names
        self._count_clipped = count_clipped  # automatic clipping normalises every sample: nothing to count
        self.entries: List[NormEntry] = []
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.num_samples = 0
        self.clipped_count: Dict[str, int] = {name: 0 for name in self._group_names}

    def check(self, name_of: Callable[[nn.Parameter], str], dropped: Callable[[], None], step: int) -> None:
        """Refuse a non-finite norm (``dropped()`` first forgets the batch), else count the clipped samples."""
        log, self.entries = self.entries, []
        if not log:
            return
        norms = torch.cat([e.norms for e in log])  # (entries * b,)
        if not math.isfinite(norms.sum(dtype=torch.float64)):  # norms are >= 0: an inf or a NaN cannot cancel out
            bad = [name for e in log if not torch.isfinite(e.norms).all() for name in _culprits(e, name_of)]
            dropped()
            raise NonFiniteGradientError(
                f"non-finite per-sample gradient norm in layer(s) {', '.join(dict.fromkeys(bad))} at step "
                f"{step}; the logical batch was dropped, no parameter changed and nothing was accounted"
            )
        if self._count_clipped:
            self._count(log, norms)

    def _count(self, log: List[NormEntry], norms: torch.Tensor) -> None:
        entry = torch.repeat_interleave(torch.arange(len(log)), torch.tensor([len(e.norms) for e in log]))
        limits = torch.tensor([e.max_norm for e in log], dtype=norms.dtype)[entry].to(norms.device)  # (entries*b,)
        clipped = torch.zeros(len(log), device=norms.device).index_add_(0, entry.to(norms.device),
                                                                       (norms > limits).float())
        for e, k in zip(log, clipped.tolist()):
            self.clipped_count[e.group] += int(k)


def _culprits(entry: NormEntry, name_of: Callable[[nn.Parameter], str]) -> List[str]:
    named = [name_of(p) for p, part in entry.parts.items() if not torch.isfinite(part).all()]
    return named or ([name_of(entry.blame)] if entry.blame is not None else [])
