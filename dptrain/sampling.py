"""Poisson sampling and micro-batching for DP-SGD.

Poisson sampling includes every example independently with probability q in each logical batch, which is
what the subsampled-Gaussian accounting assumes; batches are therefore uneven and may be empty. One epoch is
``ceil(N / B)`` logical batches (``steps_per_epoch``, the convention of ``dptrain budget`` too). Micro-batching splits a logical batch into pieces of at most
``max_physical_batch_size`` rows and tells the DP optimizer which piece ends the logical batch.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from dptrain import distributed, secure_random
from dptrain.sampling_rate import realizable_rate
from dptrain.validation import check_fraction, check_positive_int

__all__ = ["PoissonBatchSampler", "DPDataLoader", "split_batch", "batch_length", "steps_per_epoch"]


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """ceil(N / B) in integers: one epoch of logical steps wherever steps are planned or counted (a float
    ceil(1 / (B / N)) can round up to one step more, e.g. N = 9800, B = 100 gives 99)."""
    return -(-int(dataset_size) // int(batch_size))


class PoissonBatchSampler(Sampler[List[int]]):
    """Yields index lists; each index is in a batch independently with probability ``sample_rate``: the comparison of
    53-bit keystream words with q 2^53 (``secure_random.bernoulli_mask``), exact for q on that grid."""

    def __init__(self, num_samples: int, sample_rate: float, *, steps: Optional[int] = None,
                 insecure_seed: Optional[int] = None, indices: Optional[List[int]] = None, secure: bool = False):
        """``indices``: sample only from these dataset indices (this rank's shard); default all. The batches come
        from AES-256-CTR under a SECRET key from OS entropy, resumable from its position; ``insecure_seed`` makes
        the key its hash (NOT private: tests and debugging); ``secure=True`` takes a fresh key for every batch and
        saves no state."""
        self.indices = torch.as_tensor(indices if indices is not None else range(num_samples), dtype=torch.long)
        num_samples = len(self.indices)
        if num_samples <= 0:
            raise ValueError(f"the dataset must not be empty, found {num_samples} samples")
        check_fraction("sample_rate", sample_rate, closed_right=True)
        if secure and insecure_seed is not None:
            raise ValueError(f"a secure sampler draws fresh OS entropy for every batch; found a seed {insecure_seed!r}")
        self.num_samples, self.sample_rate, self.secure = num_samples, realizable_rate(sample_rate), bool(secure)
        self.steps = steps if steps is not None else math.ceil(1 / sample_rate - 1e-9)  # ceil(N / B) for q = B / N
        self._key = None if secure else secure_random.new_key(None if insecure_seed is None else
                                                              f"sampler/{insecure_seed}")
        self._block = 0  # the keystream's next unused 16-byte block
        self._work: dict = {}  # the keystream's buffers, reused from batch to batch
        self.drawn = 0  # batches drawn in the current epoch
        self._resuming = False  # load_state_dict: the next iteration continues the saved epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        """One epoch of ``steps`` batches. Every iteration starts a new epoch (also after one abandoned midway,
        as the HF Trainer does), except the first after ``load_state_dict``, which finishes the saved one."""
        if not self._resuming:
            self.drawn = 0
        self._resuming = False
        while self.drawn < self.steps:
            stream = secure_random.Keystream(self._work, key=self._key, block=self._block)  # a fresh key if secure
            mask = secure_random.bernoulli_mask(stream, self.num_samples, self.sample_rate)  # (N,) bool
            self._block += -(-self.num_samples // 2)  # 8 bytes a sample
            self.drawn += 1
            yield self.indices[mask].tolist()

    def state_dict(self) -> dict:
        """The key and position are SECRET (they determine every batch); none is saved in secure mode."""
        if self.secure:
            return {"drawn": self.drawn}
        return {"key": torch.frombuffer(bytearray(self._key), dtype=torch.uint8), "block": self._block,
                "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        if not self.secure:
            if "key" not in state:
                raise ValueError("the checkpoint holds no sampler key (written in secure mode, or by dptrain before "
                                 "its keystream sampler): resume it with secure_mode=True")
            self._key, self._block = bytes(state["key"].tolist()), int(state["block"])
        self.drawn = int(state["drawn"])
        self._resuming = self.drawn < self.steps  # a finished epoch: the next iteration starts a new one


def batch_length(batch: Any) -> Optional[int]:
    """Rows in a collated batch: dim 0 of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        n = batch_length(v)
        if n is not None:
            return n
    return None


def split_batch(batch: Any, start: int, stop: int, rows: int) -> Any:
    """Rows [start, stop) of a collated batch (tensors, dicts, tuples/lists; lists of ``rows`` items are sliced)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == rows else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: split_batch(v, start, stop, rows) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        if len(batch) == rows and not any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in batch):
            return batch[start:stop]
        parts = [split_batch(v, start, stop, rows) for v in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


class _EmptySafeCollate:
    """Collates an empty index list into a batch with 0 rows shaped like a real one."""

    def __init__(self, collate_fn, dataset):
        self.collate_fn, self.dataset = collate_fn, dataset

    def __call__(self, samples):
        if samples:
            return self.collate_fn(samples)
        one = self.collate_fn([self.dataset[0]])
        return split_batch(one, 0, 0, 1)


class DPDataLoader:
    """Iterates (micro-)batches for DP training; ``len()`` is the number of LOGICAL batches per epoch. With
    ``max_physical_batch_size`` an epoch yields more items than that: iterate to the end of the epoch rather
    than stopping after ``len()`` items, or a logical batch would be cut (and merged into the next one)."""

    def __init__(
        self,
        data_loader: DataLoader,
        *,
        poisson_sampling: bool,
        sample_rate: float,
        insecure_seed: Optional[int] = None,
        max_physical_batch_size: Optional[int] = None,
        shard: Optional[tuple] = None,
        secure: bool = False,
        steps: Optional[int] = None,
        same_pieces_on_every_rank: bool = False,
    ):
        """``shard=(rank, world)``: Poisson-sample only this rank's indices rank, rank + world, ...; ``insecure_seed``:
        the sampler's (NOT private); ``steps``:
        logical batches per epoch (default ceil(1 / sample_rate)); ``same_pieces_on_every_rank``: split every
        logical batch into as many physical batches as the rank that needs the most (FSDP2, whose collectives in
        every forward and backward need all ranks in step), agreed by one collective per logical batch."""
        if max_physical_batch_size is not None:
            check_positive_int("max_physical_batch_size", max_physical_batch_size)
        self.dataset = data_loader.dataset
        self.sampler: Optional[PoissonBatchSampler] = None
        if poisson_sampling:
            rank, world = shard or (0, 1)
            self.sampler = PoissonBatchSampler(
                len(self.dataset), sample_rate, insecure_seed=insecure_seed,
                indices=list(range(rank, len(self.dataset), world)),
                secure=secure, steps=steps,
            )
            collate = data_loader.collate_fn or default_collate
            self.loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=_EmptySafeCollate(collate, self.dataset),
                num_workers=data_loader.num_workers,
                pin_memory=data_loader.pin_memory,
            )
        else:
            self.loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.same_pieces_on_every_rank = same_pieces_on_every_rank
        self.optimizer = None  # set by the engine: told which micro-batch ends a logical batch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            rows = batch_length(batch) or 0
            bounds = self._piece_bounds(rows)
            for k, (start, stop) in enumerate(bounds):
                if self.optimizer is not None:
                    self.optimizer.signal_skip_step(k < len(bounds) - 1)
                yield batch if len(bounds) == 1 else split_batch(batch, start, stop, rows)

    def _piece_bounds(self, rows: int) -> List[Tuple[int, int]]:
        """[start, stop) of each physical batch of a logical batch of ``rows`` rows: pieces of
        ``max_physical_batch_size`` rows and a remainder, or, agreed across ranks, the most pieces any rank needs,
        of near-equal sizes (some empty when a rank has fewer rows than pieces)."""
        size = self.max_physical_batch_size or max(rows, 1)
        pieces = max(1, -(-rows // size))
        if self.same_pieces_on_every_rank and self.max_physical_batch_size is not None:
            agreed = distributed.all_reduce_max(pieces)
            if agreed > pieces:
                return [(k * rows // agreed, (k + 1) * rows // agreed) for k in range(agreed)]
        return [(start, min(start + size, rows)) for start in range(0, max(rows, 1), size)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None and state:
            self.sampler.load_state_dict(state)
