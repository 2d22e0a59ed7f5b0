"""Dirichlet client splits and the demo federation."""

import numpy as np
import pytest

from dptrain.federated import demo_federation, demo_label, dirichlet_split


def test_split_is_a_seeded_partition():
    labels = np.repeat(np.arange(4), 50)  # (200,)
    parts = dirichlet_split(labels, 5, 0.5, seed=3, min_size=5)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(200)) and min(len(p) for p in parts) >= 5
    assert parts == dirichlet_split(labels, 5, 0.5, seed=3, min_size=5)
    assert parts != dirichlet_split(labels, 5, 0.5, seed=4, min_size=5)


def test_small_alpha_is_more_skewed():
    labels = np.repeat(np.arange(4), 250)

    def skew(alpha):  # mean over clients of the largest label share
        out = []
        for seed in range(5):
            for p in dirichlet_split(labels, 4, alpha, seed=seed):
                if p:
                    out.append(np.bincount(labels[p], minlength=4).max() / len(p))
        return np.mean(out)

    assert skew(0.1) > skew(100.0) + 0.3


@pytest.mark.parametrize("args,match", [
    (([0, 1], 0, 0.5), "num_clients must be an integer >= 1"),
    (([0, 1], 2, 0.0), "alpha must be a finite number > 0"),
    (([], 2, 0.5), "non-empty 1-D"),
    (([0, 1, 1], 2, 0.5, 2), "cannot give 2 clients 2 records each"),
])
def test_split_errors(args, match):
    labels, n, alpha, *rest = args
    with pytest.raises(ValueError, match=match) as info:
        dirichlet_split(labels, n, alpha, seed=0, min_size=rest[0] if rest else 1)
    assert "\n" not in str(info.value)


def test_demo_federation_is_non_iid_with_held_out_records():
    parts, held = demo_federation(3, records=300, alpha=0.5, seed=0, eval_records=20, min_size=10)
    assert sum(len(p) for p in parts) == 300 and len(held) == 20 and min(len(p) for p in parts) >= 10
    shares = [np.bincount([demo_label(t) for t in p], minlength=4) / len(p) for p in parts]
    assert max(np.abs(a - b).max() for a in shares for b in shares) > 0.2  # template mix differs between clients
    assert {demo_label(t) for p in parts for t in p} == {0, 1, 2, 3}
    assert not set(held) & {t for p in parts for t in p}
