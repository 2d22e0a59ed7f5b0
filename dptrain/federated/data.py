"""Non-IID client splits: a Dirichlet label split, and the demo federation built on the bundled records.

The split (which record goes to which client) is drawn from a PUBLIC seed; in the demo each client's record
count N_k is public (it sets the client's sample rate and FedAvg weight). In a real deployment each site has
its own records and nobody draws a split.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from dptrain.validation import check_positive, check_positive_int

__all__ = ["dirichlet_split", "demo_label", "demo_federation", "DEMO_LABELS"]

DEMO_LABELS = ("patient-note", "dated-visit", "clinical-note", "canary")


def dirichlet_split(labels: Sequence[int], num_clients: int, alpha: float, *, seed: int,
                    min_size: int = 1, max_tries: int = 1000) -> List[List[int]]:
    """Indices per client: each label's records are shared out by proportions drawn from Dirichlet(alpha).

    Small ``alpha`` gives skewed (non-IID) clients. Draws again until every client has ``min_size`` records.
    """
    check_positive_int("num_clients", num_clients)
    check_positive("alpha", alpha)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, found shape {labels.shape}")
    if num_clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} records cannot give {num_clients} clients {min_size} records each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: List[List[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} clients {min_size} records "
                     f"in {max_tries} draws: use fewer clients, more records or a larger alpha")


def demo_label(text: str) -> int:
    """The demo record's template, as an index into :data:`DEMO_LABELS`."""
    if text.startswith("The secret code of"):
        return 3
    if text.startswith("Patient "):
        return 0
    if text.startswith("Clinical note"):
        return 2
    return 1  # "<date>: <name> (DOB ...) presented with ..."


def demo_federation(num_clients: int, *, records: int = 1200, alpha: float = 0.5, seed: int = 0,
                    eval_records: int = 100, min_size: int = 1) -> Tuple[List[List[str]], List[str]]:
    """``(texts of each client, held-out texts)``: the bundled synthetic records split by template, Dirichlet(alpha).

    The held-out records are drawn separately (no canaries) with seed ``seed + 1``.
    """
    from dptrain.finetune.data import synthetic_private_records

    texts = synthetic_private_records(records, seed=seed).records
    parts = dirichlet_split([demo_label(t) for t in texts], num_clients, alpha, seed=seed, min_size=min_size)
    held_out = synthetic_private_records(eval_records, seed=seed + 1, canary_repeats=()).records
    return [[texts[i] for i in p] for p in parts], held_out
